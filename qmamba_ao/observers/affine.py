"""Shared affine-quantization math: integer ranges, qparams from a range, fake quantization.

Every quantizer in :mod:`qmamba_ao.observers` ends in the same affine grid
``x_q = (clamp(round(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale``
(LtSQ applies it to a transformed value). Keeping the math in one module means one convention for
zero inclusion, eps and dtypes: scale is float32, zero_point int32, the same types torch's
``fake_quantize_per_*_affine`` kernels and integer backends use.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = [
    "EPS",
    "AFFINE_QSCHEMES",
    "MIN_BITS",
    "MAX_BITS",
    "check_bits",
    "int_range",
    "bits_of_range",
    "resolve_quant_range",
    "is_symmetric",
    "is_per_channel",
    "qparams_from_minmax",
    "fake_quantize",
    "fake_quantize_steps",
    "FrozenAffineQuant",
]

#: Smallest scale handed out (same default as torch.ao: float32 machine epsilon).
EPS = float(torch.finfo(torch.float32).eps)
MIN_BITS, MAX_BITS = 2, 8

_DTYPE_RANGES = {
    torch.quint8: (0, 255),
    torch.uint8: (0, 255),
    torch.qint8: (-128, 127),
    torch.int8: (-128, 127),
}


def check_bits(bits: int) -> int:
    """Validate a bit width; qmamba-ao quantizers support 2..8 bits only."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}; got {bits!r}")
    return bits


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Full integer range of ``bits`` bits: ``[-2^(b-1), 2^(b-1)-1]`` signed, ``[0, 2^b-1]`` unsigned."""
    check_bits(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def bits_of_range(quant_min: int, quant_max: int) -> int:
    """Bits needed to store ``[quant_min, quant_max]``; raises unless it is 2..8 and contains 0."""
    quant_min, quant_max = int(quant_min), int(quant_max)
    if quant_min >= quant_max:
        raise ValueError(f"quant_min ({quant_min}) must be smaller than quant_max ({quant_max})")
    if not quant_min <= 0 <= quant_max:
        raise ValueError(f"the integer range [{quant_min}, {quant_max}] must contain 0 (affine zero point)")
    bits = math.ceil(math.log2(quant_max - quant_min + 1))
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"integer range [{quant_min}, {quant_max}] needs {bits} bits; qmamba-ao quantizers support "
            f"{MIN_BITS}..{MAX_BITS} bits"
        )
    return bits


def resolve_quant_range(
    dtype: torch.dtype = torch.quint8,
    quant_min: Optional[int] = None,
    quant_max: Optional[int] = None,
    bits: Optional[int] = None,
) -> tuple[int, int]:
    """Integer range from torch.ao-style arguments.

    ``quant_min``/``quant_max`` win when given (both or neither); otherwise ``bits`` (default 8)
    picks the full range of that many bits with the signedness of ``dtype``. The range must fit
    ``dtype`` and need 2..8 bits.
    """
    if dtype not in _DTYPE_RANGES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_RANGES)}; got {dtype}")
    if (quant_min is None) != (quant_max is None):
        raise ValueError("give both quant_min and quant_max, or neither")
    lo, hi = _DTYPE_RANGES[dtype]
    if quant_min is None:
        qmin, qmax = int_range(8 if bits is None else bits, signed=lo < 0)
    else:
        qmin, qmax = int(quant_min), int(quant_max)  # type: ignore[arg-type]
    if qmin < lo or qmax > hi:
        raise ValueError(f"integer range [{qmin}, {qmax}] does not fit {dtype} ([{lo}, {hi}])")
    n = bits_of_range(qmin, qmax)
    if bits is not None and check_bits(bits) != n:
        raise ValueError(f"bits={bits} disagrees with the integer range [{qmin}, {qmax}] ({n} bits)")
    return qmin, qmax


#: The affine qschemes, per tensor then per channel.
AFFINE_QSCHEMES = (
    torch.per_tensor_affine,
    torch.per_tensor_symmetric,
    torch.per_channel_affine,
    torch.per_channel_symmetric,
)


def is_symmetric(qscheme: torch.qscheme) -> bool:
    return qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def is_per_channel(qscheme: torch.qscheme) -> bool:
    return qscheme in (torch.per_channel_affine, torch.per_channel_symmetric)


def qparams_from_minmax(
    min_val: Tensor,
    max_val: Tensor,
    quant_min: int,
    quant_max: int,
    symmetric: bool = False,
    eps: float = EPS,
) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) covering ``[min_val, max_val]``, elementwise.

    The range is widened to contain 0 so that zero is exactly representable (padding, ReLU-like
    zeros and the LtSQ anchor ``T(1) = 0`` all rely on it). Symmetric: ``scale = max|.| / ((qmax -
    qmin) / 2)`` with the zero point at 0 for signed ranges and at the middle for unsigned ones.
    Affine: ``scale = (max - min) / (qmax - qmin)``, ``zero_point = qmin - round(min / scale)``.
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float64)
    max_val = torch.as_tensor(max_val, dtype=torch.float64, device=min_val.device)
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (amax / ((quant_max - quant_min) / 2.0)).clamp(min=eps)
        mid = 0 if quant_min < 0 else (quant_min + quant_max + 1) // 2
        zero_point = torch.full_like(scale, float(mid))
    else:
        scale = ((hi - lo) / float(quant_max - quant_min)).clamp(min=eps)
        zero_point = (quant_min - torch.round(lo / scale)).clamp(quant_min, quant_max)
    return scale.to(torch.float32), zero_point.to(torch.int32)


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
) -> Tensor:
    """Quantize-dequantize ``x`` on the affine grid; per tensor, or per slice along ``axis``.

    Thin wrapper over ``torch.fake_quantize_per_{tensor,channel}_affine`` (the ops torch.ao and
    its exporters understand) that fixes the parameter dtypes and keeps ``x``'s dtype.
    """
    dtype = x.dtype
    xf = x if dtype in (torch.float32, torch.float16, torch.bfloat16) else x.to(torch.float32)
    scale = scale.to(device=x.device, dtype=torch.float32)
    zero_point = zero_point.to(device=x.device, dtype=torch.int32)
    if axis is None and xf.dtype == torch.float32 and not (torch.is_grad_enabled() and xf.requires_grad):
        # Same arithmetic as the fused op (x * (1/s) + z, round half to even, clamp, - z, * s), and
        # bit-identical to it, but without the gradient mask the op always builds: ~6x faster
        # on the per-step hidden-state path.
        inv = (1.0 / scale.reshape(())).item()
        z = int(zero_point.reshape(()))
        out = torch.round(xf * inv + z).clamp_(quant_min, quant_max).sub_(z).mul_(scale.reshape(()).item())
        return out.to(dtype)
    if axis is None:
        out = torch.fake_quantize_per_tensor_affine(xf, scale.reshape(()), zero_point.reshape(()), quant_min, quant_max)
    else:
        axis = axis % x.dim()
        if x.shape[axis] != scale.numel():
            raise ValueError(
                f"per-axis fake quantization along axis {axis}: tensor has {x.shape[axis]} entries there "
                f"but {scale.numel()} scales were calibrated"
            )
        out = torch.fake_quantize_per_channel_affine(
            xf, scale.reshape(-1), zero_point.reshape(-1), axis, quant_min, quant_max
        )
    return out.to(dtype)


def fake_quantize_steps(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """Fake-quantize each slice ``x[i]`` with its own ``scale[i]`` / ``zero_point[i]`` (a block of time
    steps stacked on axis 0), exactly as :func:`fake_quantize` would per tensor, slice by slice."""
    if x.shape[0] != scale.numel():
        raise ValueError(f"{x.shape[0]} stacked steps but {scale.numel()} scales")
    dtype = x.dtype
    scale = scale.to(device=x.device, dtype=torch.float32).reshape(-1)
    zero_point = zero_point.to(device=x.device, dtype=torch.int32).reshape(-1)
    if dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
        # The per-tensor fast path of fake_quantize, broadcast over the slices: the same float32
        # operations on the same values, hence the same results.
        view = (-1,) + (1,) * (x.dim() - 1)
        inv = (1.0 / scale).reshape(view)
        z = zero_point.to(torch.float32).reshape(view)
        return torch.round(x * inv + z).clamp_(quant_min, quant_max).sub_(z).mul_(scale.reshape(view))
    return fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=0)


class FrozenAffineQuant(nn.Module):
    """Fixed affine fake quantization (per tensor, or per slice along ``axis``).

    What the baseline observers in this package freeze into. Unlike calling the torch op
    directly it checks the per-axis length and says which calibrated length it expected.
    """

    def __init__(
        self, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, axis: Optional[int] = None
    ) -> None:
        super().__init__()
        bits_of_range(quant_min, quant_max)
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(-1).clone())
        self.quant_min, self.quant_max, self.axis = int(quant_min), int(quant_max), axis

    def extra_repr(self) -> str:
        return f"quant_min={self.quant_min}, quant_max={self.quant_max}, axis={self.axis}"

    #: ``forward(states, range(t0, t0 + k))`` takes ``k`` per-step tensors stacked on a new axis 0
    accepts_blocks = True

    @property
    def pointwise(self) -> bool:
        """Per tensor it acts element by element, so the scan may apply it block by block
        (``ScanHooks.pointwise``); per axis it needs the site's own layout."""
        return self.axis is None

    def forward(self, x: Tensor, steps: Optional[range] = None) -> Tensor:
        """Fake-quantize ``x``; with ``steps`` (a range), ``x`` is that many per-step tensors stacked on
        a new axis 0 (the scan's hidden states), each quantized as ``forward(x[i])`` would."""
        axis = self.axis
        if steps is not None:
            if not isinstance(steps, range) or x.dim() < 1 or len(steps) != x.shape[0]:
                raise ValueError(f"steps must be a range with one entry per slice of axis 0; got {steps!r}")
            axis = axis if axis is None or axis < 0 else axis + 1
        return fake_quantize(x, self.scale, self.zero_point, self.quant_min, self.quant_max, axis)
