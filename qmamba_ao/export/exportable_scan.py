"""An exportable form of the converted selective scan.

:class:`~qmamba_ao.ssm.quantized.QuantizedSelectiveScan` is built for fast PyTorch inference: LtSQ
works in place on one buffer, TGQ picks a group in Python per step, and the output is a
quantized tensor. None of that reaches torch.export or ONNX. :class:`ExportableScan` computes the
same function with plain tensor ops and ``quantized_decomposed`` quantize/dequantize pairs:

* affine sites: one quantize/dequantize pair (per tensor, or per axis);
* LtSQ sites: ``T_p`` -> affine pair in t-space -> ``T_p^{-1}`` (LtSQ is affine on a transformed value);
* TGQ on ``h``: per-axis pair along time on the stacked states when the quantized state only
  feeds the read-out, or one per-tensor pair per step when it feeds the recurrence;
* the scan output: the output observer's pair, returned as float (the next op's input pair follows).

The recurrence is unrolled over the calibrated sequence length (fixed for Vim).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from ..observers.affine import FrozenAffineQuant, bits_of_range, is_per_channel
from ..observers.ltsq import FrozenLtSQ, FrozenLtSQLog2, log2_inverse, log2_transform, ltsq_inverse, ltsq_transform
from ..observers.tgq import FrozenTGQ
from ..ssm.functional import INPUT_SITES
from ..ssm.modules import SelectiveScan, is_float_scan
from ..ssm.quantized import QuantizedSelectiveScan

__all__ = ["ExportableScan", "AffineQDQ", "LtSQQDQ", "Log2QDQ", "StepQDQ", "ExportError", "to_qdq"]

_qd = torch.ops.quantized_decomposed


class ExportError(ValueError):
    """A model or quantizer that cannot be lowered to an exportable graph; the message says why."""


def _int_dtype(quant_min: int) -> torch.dtype:
    """Container of an integer range: uint8 for unsigned ranges, int8 for signed ones."""
    return torch.int8 if quant_min < 0 else torch.uint8


class AffineQDQ(nn.Module):
    """Quantize then dequantize on a fixed affine grid with ``quantized_decomposed`` ops.

    Per tensor when ``axis`` is None (scale and zero point become graph constants), else per slice
    along ``axis`` (ONNX: per-axis QuantizeLinear/DequantizeLinear).
    """

    def __init__(
        self, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, axis: Optional[int] = None
    ) -> None:
        super().__init__()
        bits_of_range(quant_min, quant_max)
        scale = scale.detach().to(torch.float32).reshape(-1)
        zero_point = zero_point.detach().to(torch.int64).reshape(-1)
        if axis is None and scale.numel() != 1:
            raise ExportError(f"a per-tensor quantizer needs one scale; got {scale.numel()}")
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zero_point.clone())
        self.quant_min, self.quant_max, self.axis = int(quant_min), int(quant_max), axis
        self.dtype = _int_dtype(self.quant_min)
        self._s, self._z = float(scale[0]), int(zero_point[0])

    def extra_repr(self) -> str:
        return f"quant_min={self.quant_min}, quant_max={self.quant_max}, axis={self.axis}"

    def forward(self, x: Tensor) -> Tensor:
        lo, hi, dt = self.quant_min, self.quant_max, self.dtype
        if self.axis is None:
            q = _qd.quantize_per_tensor.default(x, self._s, self._z, lo, hi, dt)
            return _qd.dequantize_per_tensor.default(q, self._s, self._z, lo, hi, dt)
        axis = self.axis % x.dim()
        q = _qd.quantize_per_channel.default(x, self.scale, self.zero_point, axis, lo, hi, dt)
        return _qd.dequantize_per_channel.default(q, self.scale, self.zero_point, axis, lo, hi, dt)


class LtSQQDQ(nn.Module):
    """LtSQ as ``T_p^{-1}(QDQ(T_p(x)))``: the transform, a standard affine pair, the exact inverse."""

    def __init__(self, frozen: FrozenLtSQ | FrozenLtSQLog2) -> None:
        super().__init__()
        self.kind = frozen.kind
        self.param = float(frozen.param.reshape(()))
        self.qdq = AffineQDQ(frozen.scale, frozen.zero_point, frozen.quant_min, frozen.quant_max)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, param={self.param:.4g}"

    def forward(self, x: Tensor) -> Tensor:
        return ltsq_inverse(self.qdq(ltsq_transform(x, self.kind, self.param)), self.kind, self.param)


class Log2QDQ(LtSQQDQ):
    """LtSQ's log2 form as ``log2_inverse(QDQ(log2_transform(x)))``: the transform, a standard affine pair,
    the exact inverse."""

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "unit_log2":
            # -log2(1 - x) with 1 - x kept >= 2^-126: dA = 1 gets a finite code (126, or the top code below
            # 8 bits) instead of inf; its level is 1 either way in float32
            t = torch.log2((1.0 - x).clamp(min=2.0**-126)).neg()
        else:
            t = log2_transform(x, self.kind, self.param)
        return log2_inverse(self.qdq(t), self.kind, self.param)


class StepQDQ(nn.Module):
    """TGQ's temporal groups as per-step affine grids (the group table expanded to one entry per step)."""

    def __init__(self, frozen: FrozenTGQ) -> None:
        super().__init__()
        index = frozen.group_index
        self.time_axis = frozen.time_axis
        self.seq_len = index.numel()
        self.stacked = AffineQDQ(
            frozen.scale[index], frozen.zero_point[index], frozen.quant_min, frozen.quant_max, axis=frozen.time_axis
        )
        self.steps = nn.ModuleList(
            AffineQDQ(frozen.scale[g], frozen.zero_point[g], frozen.quant_min, frozen.quant_max) for g in index.tolist()
        )

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}"

    def forward(self, x: Tensor, t: Optional[int] = None) -> Tensor:
        return self.stacked(x) if t is None else self.steps[t](x)


def to_qdq(site: str, quantizer: nn.Module) -> nn.Module:
    """The exportable equivalent of a frozen site quantizer of a converted scan."""
    if isinstance(quantizer, FrozenLtSQ):
        return LtSQQDQ(quantizer)
    if isinstance(quantizer, FrozenLtSQLog2):
        return Log2QDQ(quantizer)
    if isinstance(quantizer, FrozenTGQ):
        return StepQDQ(quantizer)
    if isinstance(quantizer, FrozenAffineQuant):
        return AffineQDQ(
            quantizer.scale, quantizer.zero_point, quantizer.quant_min, quantizer.quant_max, quantizer.axis
        )
    if isinstance(quantizer, FakeQuantizeBase) and hasattr(quantizer, "scale") and hasattr(quantizer, "zero_point"):
        per_channel = is_per_channel(quantizer.qscheme)
        axis = int(quantizer.ch_axis) if per_channel else None
        return AffineQDQ(quantizer.scale, quantizer.zero_point, quantizer.quant_min, quantizer.quant_max, axis)
    raise ExportError(
        f"scan site {site!r} uses {type(quantizer).__name__}, which has no exportable form; supported are "
        "affine quantizers (FrozenAffineQuant, torch.ao fake-quant), LtSQ and TGQ. Choose a recipe whose "
        "site quantizers are among them."
    )


#: How :class:`ExportableScan` writes the recurrence: a Python loop that export unrolls into one
#: set of ops per step, or torch's ``scan`` higher-order op (ONNX: one Scan node with a small body).
RECURRENCES = ("unroll", "scan")


class ExportableScan(nn.Module):
    """Same math as a :class:`QuantizedSelectiveScan`, written with exportable ops; returns float.

    Built from a float :class:`SelectiveScan` it has no sites: the float model's exportable twin,
    the baseline a quantized export is timed against. ``recurrence``: see :data:`RECURRENCES`.
    """

    def __init__(
        self,
        scan: SelectiveScan,
        output_range: Optional[tuple[int, int]] = None,
        recurrence: str = "unroll",
    ) -> None:
        super().__init__()
        if recurrence not in RECURRENCES:
            raise ExportError(f"recurrence must be one of {RECURRENCES}; got {recurrence!r}")
        quantized = isinstance(scan, QuantizedSelectiveScan)
        if not quantized and not is_float_scan(scan):
            raise ExportError(
                f"ExportableScan takes a float SelectiveScan or a converted QuantizedSelectiveScan; got "
                f"{type(scan).__name__} (a prepared scan still observing: convert it first)"
            )
        self.recurrence = recurrence
        self.dim, self.d_state, self.delta_softplus = scan.dim, scan.d_state, scan.delta_softplus
        self.h_feedback = bool(getattr(scan, "h_feedback", False))
        self.register_buffer("A", -torch.exp(scan.A_log.detach().float()))
        self.register_buffer("D", scan.D.detach().float().clone())
        self.register_buffer("delta_bias", scan.delta_bias.detach().float().clone())
        sites = scan.site_modules.items() if quantized else ()
        self.sites = nn.ModuleDict({k: to_qdq(k, m) for k, m in sites})
        self.output: Optional[AffineQDQ] = None
        if quantized and scan.output_dtype is not None:
            if output_range is None:
                raise ExportError("the scan's output is quantized but its integer range is unknown")
            self.output = AffineQDQ(scan.output_scale, scan.output_zero_point, *output_range)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_state={self.d_state}, h_feedback={self.h_feedback}, recurrence={self.recurrence!r}"

    def _site(self, name: str) -> Optional[nn.Module]:
        return self.sites[name] if name in self.sites else None

    def forward(self, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Optional[Tensor] = None) -> Tensor:
        values = {"u": u, "delta": delta, "B": B, "C": C, "z": z}
        for name in INPUT_SITES:
            site = self._site(name)
            if site is not None and values[name] is not None:
                values[name] = site(values[name])
        u, delta, B, C, z = (values[k] for k in INPUT_SITES)
        b, d, length = u.shape
        g, n = B.shape[1], self.A.shape[1]
        delta = delta + self.delta_bias[None, :, None]
        if self.delta_softplus:
            delta = F.softplus(delta)
        # (b, g, N, L) -> (b, d, L, N), each group's B / C shared by its d // g channels.
        Bx = B.permute(0, 1, 3, 2).unsqueeze(2).expand(b, g, d // g, length, n).reshape(b, d, length, n)
        Cx = C.permute(0, 1, 3, 2).unsqueeze(2).expand(b, g, d // g, length, n).reshape(b, d, length, n)
        dA = torch.exp(delta.unsqueeze(-1) * self.A[None, :, None, :])
        if (site := self._site("dA")) is not None:
            dA = site(dA)
        dBu = (delta * u).unsqueeze(-1) * Bx
        if (site := self._site("dBu")) is not None:
            dBu = site(dBu)
        h_site = self._site("h")
        if isinstance(h_site, StepQDQ) and h_site.seq_len != length:
            raise ExportError(
                f"TGQ was calibrated on sequences of length {h_site.seq_len} but the scan got {length}; "
                "export with inputs of the calibrated size"
            )
        per_step = h_site is not None and self.h_feedback
        if self.recurrence == "scan":
            hs = self._scan_op(dA, dBu, h_site if per_step else None)
        else:
            h = u.new_zeros(b, d, n)
            states = []
            for t in range(length):
                h = dA[:, :, t] * h + dBu[:, :, t]
                if per_step:
                    h = h_site(h, t)  # type: ignore[misc]
                states.append(h)
            hs = torch.stack(states, dim=2)  # (b, d, L, N)
        if h_site is not None and not per_step:
            hs = h_site(hs)
        y = (hs * Cx).sum(-1) + u * self.D[None, :, None]
        if (site := self._site("y")) is not None:
            y = site(y)
        if z is not None:
            y = y * F.silu(z)
        return y if self.output is None else self.output(y)

    @staticmethod
    def _scan_op(dA: Tensor, dBu: Tensor, h_site: Optional[StepQDQ]) -> Tensor:
        """The recurrence as torch's ``scan`` op over time; with ``h_site`` the state is quantized each step."""
        from torch._higher_order_ops.scan import scan

        xs: list[Tensor] = [dA.permute(2, 0, 1, 3), dBu.permute(2, 0, 1, 3)]  # time-major (L, b, d, N)
        if h_site is not None:
            xs += [h_site.stacked.scale, h_site.stacked.zero_point]
            lo, hi, dt = h_site.stacked.quant_min, h_site.stacked.quant_max, h_site.stacked.dtype

        def step(h: Tensor, x: list[Tensor]) -> tuple[Tensor, Tensor]:
            h = x[0] * h + x[1]
            if h_site is not None:
                q = _qd.quantize_per_tensor.tensor(h, x[2], x[3], lo, hi, dt)
                h = _qd.dequantize_per_tensor.tensor(q, x[2], x[3], lo, hi, dt)
            return h, h.clone()

        _, hs = scan(step, torch.zeros_like(dBu[:, :, 0]), xs, dim=0)
        return hs.permute(1, 2, 0, 3)  # (b, d, L, N)
