"""Baseline observers the QMamba quantizers are measured against.

* :class:`PercentileObserver` - clip at a percentile (Quamba clips the scan input at 99.999).
* :class:`MSEObserver` - uniform grid, clipping range chosen to minimise MSE.
* :class:`PerTokenObserver` - static per-token scales (PTQ4VM's linear-input quantizer).
* :class:`Log2Observer` - power-of-two levels, the usual log quantizer for skewed values.

All follow torch.ao's observer contract: ``forward`` records and returns its input unchanged,
``calculate_qparams()`` depends only on recorded statistics, state lives in buffers, and
``.with_args(...)`` builds constructors. ``to_frozen()`` returns the fixed quantizer a converted
model applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from ._base import HistogramMixin, QObserverBase, ReservoirMixin, SortedSample, site_label
from .affine import EPS, FrozenAffineQuant, bits_of_range

__all__ = ["PercentileObserver", "MSEObserver", "PerTokenObserver", "Log2Observer", "FrozenLog2Quant"]


def _default_qparams(n: int = 1) -> tuple[Tensor, Tensor]:
    return torch.ones(n, dtype=torch.float32), torch.zeros(n, dtype=torch.int32)


class _MinMaxTracking(QObserverBase):
    """Exact running min/max of everything observed (scalars)."""

    min_val: Tensor
    max_val: Tensor

    def _init_minmax(self) -> None:
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _record_minmax(self, x: Tensor) -> tuple[float, float]:
        lo, hi = torch.aminmax(x.detach())
        self._check_finite(lo, hi)
        self.min_val = torch.minimum(self.min_val, lo.to(self.min_val))
        self.max_val = torch.maximum(self.max_val, hi.to(self.max_val))
        return float(lo), float(hi)

    @property
    def has_data(self) -> bool:
        return bool(self.min_val <= self.max_val)

    def to_frozen(self) -> nn.Module:
        scale, zero_point = self.calculate_qparams()
        return FrozenAffineQuant(scale, zero_point, self.quant_min, self.quant_max).to(self.eps.device)


class PercentileObserver(HistogramMixin, _MinMaxTracking):
    """Uniform quantization clipped at a percentile.

    ``mode="abs"`` clips at the ``percentile``-th percentile of ``|x|`` (symmetric clip, as Quamba
    does); ``mode="tails"`` clips the low and high tails separately at ``100 - percentile`` and
    ``percentile``. Percentiles come from a histogram over a power-of-two range (``2 * bins`` bins),
    so memory stays fixed however much calibration data passes; the clip never exceeds the exact
    observed min/max. Resolution is ``range / bins``.
    """

    def __init__(
        self,
        percentile: float = 99.999,
        mode: str = "abs",
        bins: int = 2048,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        bits: Optional[int] = None,
        eps: float = EPS,
        is_dynamic: bool = False,
    ) -> None:
        super().__init__(dtype, qscheme, quant_min, quant_max, bits, eps, is_dynamic)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100]; got {percentile}")
        if mode not in ("abs", "tails"):
            raise ValueError(f"mode must be 'abs' or 'tails'; got {mode!r}")
        self.percentile, self.mode = float(percentile), mode
        self._init_minmax()
        self._init_histogram(bins)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x
        lo, hi = self._record_minmax(x)
        self._update_histogram(x, max(-lo, hi))
        return x

    def clip_range(self) -> tuple[float, float]:
        """The clipped ``(low, high)`` range the qparams cover."""
        lo, hi = float(self.min_val), float(self.max_val)
        q = self.percentile / 100.0
        if self.mode == "abs":
            c = self._hist_quantile(q, absolute=True)
            return max(lo, -c), min(hi, c)
        return max(lo, self._hist_quantile(1.0 - q, absolute=False)), min(hi, self._hist_quantile(q, absolute=False))

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if not self.has_data:
            self._warn_empty()
            return _default_qparams()
        lo, hi = self.clip_range()
        scale, zero_point = self._qparams(torch.tensor([lo]), torch.tensor([hi]))
        return scale, zero_point

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, mode={self.mode!r}, bins={self.bins}, " + super().extra_repr()


class MSEObserver(ReservoirMixin, _MinMaxTracking):
    """Uniform quantization whose range ``(a * min, a * max)`` minimises MSE over shrink factors ``a``.

    The MSE is measured exactly, for the grid each candidate gives, on a bounded sample of the
    calibration data: a uniform sample of ``sample_size`` values plus the ``tail_size`` smallest
    and largest values (deterministic given ``seed`` and the data order).
    """

    _resizable = ReservoirMixin._reservoir_buffers

    def __init__(
        self,
        shrink_factors: Optional[Sequence[float]] = None,
        sample_size: int = 65536,
        tail_size: int = 1024,
        seed: int = 0,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        bits: Optional[int] = None,
        eps: float = EPS,
        is_dynamic: bool = False,
    ) -> None:
        super().__init__(dtype, qscheme, quant_min, quant_max, bits, eps, is_dynamic)
        factors = tuple(1.0 - 0.01 * i for i in range(90)) if shrink_factors is None else tuple(shrink_factors)
        if not factors or any(not 0.0 < f <= 1.0 for f in factors):
            raise ValueError(f"shrink_factors must be a non-empty sequence in (0, 1]; got {shrink_factors}")
        self.shrink_factors = factors
        self._init_minmax()
        self._init_reservoir(sample_size, seed, tail_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x
        self._record_minmax(x)
        self._update_reservoir(x)
        return x

    def search(self) -> tuple[float, Tensor]:
        """``(best shrink factor, MSE per candidate)`` on the stored sample; pure."""
        a = torch.tensor(self.shrink_factors, dtype=torch.float64)
        scale, zero_point = self._qparams(a * float(self.min_val), a * float(self.max_val))
        codes = torch.arange(self.quant_min, self.quant_max + 1, dtype=torch.float64)
        s, z = scale.double()[:, None], zero_point.double()[:, None]
        mse = SortedSample(*self._weighted_sample()).mse(s * (codes - z), s * (codes[:-1] + 0.5 - z))
        return self.shrink_factors[int(torch.argmin(mse))], mse

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if not self.has_data:
            self._warn_empty()
            return _default_qparams()
        best, _ = self.search()
        return self._qparams(torch.tensor([best * float(self.min_val)]), torch.tensor([best * float(self.max_val)]))

    def extra_repr(self) -> str:
        return (
            f"shrink_factors={len(self.shrink_factors)} in [{min(self.shrink_factors):.3g}, "
            f"{max(self.shrink_factors):.3g}], sample_size={self.sample_size}, tail_size={self.tail_size}, "
            + super().extra_repr()
        )


class PerTokenObserver(QObserverBase):
    """Static per-token min/max along ``token_axis`` (one scale per token position).

    PTQ4VM's quantizer for linear inputs: tokens differ in range, so each position gets its own
    calibrated scale. ``token_axis`` must be non-negative (it doubles as torch.ao's ``ch_axis``).
    The number of tokens is fixed at the first batch; later batches and inference must match.
    """

    _resizable = ("min_val", "max_val")
    _per_channel = True

    min_val: Tensor
    max_val: Tensor

    def __init__(
        self,
        token_axis: int = 1,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_channel_affine,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        bits: Optional[int] = None,
        eps: float = EPS,
        is_dynamic: bool = False,
    ) -> None:
        super().__init__(dtype, qscheme, quant_min, quant_max, bits, eps, is_dynamic)
        if token_axis < 0:
            raise ValueError(f"token_axis must be >= 0 (it is used as ch_axis); got {token_axis}")
        self.token_axis = self.ch_axis = int(token_axis)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() <= self.token_axis:
            raise ValueError(f"PerTokenObserver(token_axis={self.token_axis}) got a tensor of shape {tuple(x.shape)}")
        if x.numel() == 0:
            return x
        tokens = x.detach().movedim(self.token_axis, 0).reshape(x.shape[self.token_axis], -1)
        lo, hi = torch.aminmax(tokens, dim=1)
        self._check_finite(lo, hi)
        lo, hi = lo.to(torch.float32), hi.to(torch.float32)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo, hi
        elif self.min_val.numel() != lo.numel():
            raise ValueError(
                f"{site_label(self)}: calibrated with {self.min_val.numel()} tokens along axis "
                f"{self.token_axis}, now got {lo.numel()}; static per-token scales need one token count: "
                "calibrate on images of one size"
            )
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        return x

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if self.min_val.numel() == 0:
            self._warn_empty()
            return _default_qparams()
        return self._qparams(self.min_val, self.max_val)

    def to_frozen(self) -> nn.Module:
        scale, zero_point = self.calculate_qparams()
        return FrozenAffineQuant(scale, zero_point, self.quant_min, self.quant_max, axis=self.token_axis).to(
            self.eps.device
        )

    def extra_repr(self) -> str:
        return f"token_axis={self.token_axis}, " + super().extra_repr()


def log2_quantize(v: Tensor, scale: Tensor, exponents: int, signed: bool) -> Tensor:
    """``sign(v) * scale * 2^e`` with ``e = clamp(round(log2(|v| / scale)), 1 - exponents, 0)``.

    Rounding is in the log domain (the usual log2 quantizer); magnitudes below half the smallest
    level become 0. Unsigned inputs are clamped at 0.
    """
    scale = scale.to(device=v.device, dtype=torch.float32).reshape(())
    mag = v.abs() if signed else v.clamp(min=0)
    y = mag / scale
    e_min = 1 - exponents
    e = torch.round(torch.log2(y.clamp(min=2.0 ** (e_min - 2)))).clamp(e_min, 0)
    q = torch.where(y < 2.0 ** (e_min - 1), torch.zeros_like(y), torch.exp2(e)) * scale
    return torch.sign(v) * q if signed else q


class FrozenLog2Quant(nn.Module):
    """Fixed power-of-two quantizer (optionally of ``1 - x``), see :class:`Log2Observer`."""

    def __init__(self, scale: Tensor, exponents: int, signed: bool, complement: bool) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(1).clone())
        self.exponents, self.signed, self.complement = int(exponents), bool(signed), bool(complement)

    def extra_repr(self) -> str:
        return f"exponents={self.exponents}, signed={self.signed}, complement={self.complement}"

    def forward(self, x: Tensor) -> Tensor:
        v = (1.0 - x) if self.complement else x
        q = log2_quantize(v.to(torch.float32), self.scale, self.exponents, self.signed)
        return ((1.0 - q) if self.complement else q).to(x.dtype)


class Log2Observer(_MinMaxTracking):
    """Power-of-two levels ``{0} U {scale * 2^-k}`` scaled to the observed max magnitude.

    With ``2^b`` codes: unsigned data uses one code for 0 and ``2^b - 1`` exponents; signed data
    spends one bit on the sign (``2^(b-1) - 1`` exponents per sign). ``complement=True`` quantizes
    ``1 - x`` instead (fine levels next to 1, e.g. for ``dA`` piled near 1). ``calculate_qparams()``
    returns ``(scale, 0)`` where scale is the largest level; the grid is not affine.
    """

    def __init__(
        self,
        complement: bool = False,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        bits: Optional[int] = None,
        eps: float = EPS,
        is_dynamic: bool = False,
    ) -> None:
        super().__init__(dtype, qscheme, quant_min, quant_max, bits, eps, is_dynamic)
        self.complement = bool(complement)
        self._init_minmax()

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() > 0:
            self._record_minmax(x)
        return x

    def _value_range(self) -> tuple[float, float]:
        lo, hi = float(self.min_val), float(self.max_val)
        return (1.0 - hi, 1.0 - lo) if self.complement else (lo, hi)

    def _signed(self) -> bool:
        return self._value_range()[0] < 0.0

    def _exponents(self) -> int:
        codes = self.quant_max - self.quant_min + 1
        return codes // 2 - 1 if self._signed() else codes - 1

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if not self.has_data:
            self._warn_empty()
            return _default_qparams()
        lo, hi = self._value_range()
        scale = max(abs(lo), abs(hi), float(self.eps))
        return torch.tensor([scale], dtype=torch.float32), torch.zeros(1, dtype=torch.int32)

    def to_frozen(self) -> nn.Module:
        scale, _ = self.calculate_qparams()
        bits_of_range(self.quant_min, self.quant_max)
        signed = self._signed() if self.has_data else False
        exps = self._exponents() if self.has_data else self.quant_max - self.quant_min
        return FrozenLog2Quant(scale, exps, signed, self.complement).to(self.eps.device)

    def extra_repr(self) -> str:
        return f"complement={self.complement}, " + super().extra_repr()
