"""Observers that hold given quantization parameters: where learned (reconstructed) qparams live.

After calibration a prepared model's observers compute their qparams from statistics. Reconstruction
(:func:`qmamba_ao.reconstruct`) then learns better values; they have to end where torch.ao's
``convert_fx`` and qmamba-ao's scan conversion look for qparams, without a special case there:

* :class:`FixedQParamsObserver` - a torch.ao observer (``ObserverBase``) whose ``calculate_qparams()``
  returns the stored ``scale`` / ``zero_point`` buffers, per tensor or per channel. It replaces an
  activation observer in the prepared graph, and, through ``with_args``, serves as the weight
  observer constructor of a layer's QConfig (``convert_fx`` builds weight observers from the QConfig).
* :class:`FixedSite` - a scan-site observer holding the frozen quantizer the converted scan will
  apply (:class:`~qmamba_ao.observers.affine.FrozenAffineQuant`, ``FrozenLtSQ``, ``FrozenTGQ``);
  ``to_frozen()`` hands out a copy.

Both keep the observer contract: ``forward`` returns its input unchanged, state lives in buffers.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.ao.quantization.observer import ObserverBase

from .affine import bits_of_range, is_per_channel

__all__ = ["FixedQParamsObserver", "FixedSite", "ste_round", "learnable_fake_quantize"]


def ste_round(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def learnable_fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, axis: Optional[int] = None
) -> Tensor:
    """Affine fake quantization differentiable in ``x`` and ``scale`` (LSQ's estimator).

    ``scale`` / ``zero_point`` hold one value, or one per slice along ``axis``. Inside the range the
    gradient w.r.t. ``x`` is 1 and w.r.t. ``scale`` is ``round(x/s) - x/s``; clipped values pass no
    gradient to ``x`` and ``quant_min - z`` or ``quant_max - z`` to ``scale``: the gradients of LSQ
    (Esser et al., 2020), which come out of autograd once rounding is straight-through.
    """
    if axis is not None and scale.numel() > 1:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    else:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    zero_point = zero_point.to(x.dtype)
    q = torch.clamp(ste_round(x / scale) + zero_point, quant_min, quant_max)
    return (q - zero_point) * scale


class FixedQParamsObserver(ObserverBase):
    """A torch.ao observer whose qparams are given, not computed: ``calculate_qparams()`` returns them.

    ``scale`` / ``zero_point`` are buffers (so a prepared model's ``state_dict`` carries them); one
    value for the per-tensor qschemes, one per slice along ``ch_axis`` for the per-channel ones.
    ``forward`` returns its input unchanged, as every observer's. Unlike torch.ao's own
    ``FixedQParamsObserver`` (one fixed scale per tensor), it takes per-channel qparams and any qscheme,
    which is what weights and static per-token activations need.
    """

    scale: Tensor
    zero_point: Tensor

    def __init__(
        self,
        scale: Tensor,
        zero_point: Tensor,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: int = 0,
        quant_max: int = 255,
        ch_axis: int = 0,
        is_dynamic: bool = False,
    ) -> None:
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        bits_of_range(quant_min, quant_max)
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1).clone()
        zero_point = torch.as_tensor(zero_point).detach().to(torch.int32).reshape(-1).clone()
        if scale.numel() != zero_point.numel() or scale.numel() == 0:
            raise ValueError(f"scale ({scale.numel()} values) and zero_point ({zero_point.numel()}) must match")
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError("scale must be finite and positive")
        if not is_per_channel(qscheme) and scale.numel() != 1:
            raise ValueError(f"qscheme {qscheme} takes one scale; got {scale.numel()}")
        self.qscheme = qscheme
        self.quant_min, self.quant_max, self.ch_axis = int(quant_min), int(quant_max), int(ch_axis)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    def forward(self, x: Tensor) -> Tensor:
        return x

    @torch.jit.export
    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.scale.clone(), self.zero_point.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for name in ("scale", "zero_point"):  # per-channel sizes come from the saved state
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"values={self.scale.numel()}, quant_min={self.quant_min}, quant_max={self.quant_max}, "
            f"qscheme={self.qscheme}, ch_axis={self.ch_axis}"
        )


class FixedSite(nn.Module):
    """A scan-site observer holding the fixed quantizer its converted scan applies.

    ``forward(x, t=None)`` returns ``x`` (as an observer; it takes the per-step and block calls the
    scan makes on its ``h`` site); ``to_frozen()`` returns a copy of ``quantizer``, so the scan's
    conversion (:func:`qmamba_ao.ssm.quantized.freeze_site`) needs nothing new.
    """

    per_step = True
    accepts_blocks = True

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.quant_min = getattr(quantizer, "quant_min", None)
        self.quant_max = getattr(quantizer, "quant_max", None)

    def forward(self, x: Tensor, t: Any = None) -> Tensor:
        return x

    def to_frozen(self) -> nn.Module:
        return copy.deepcopy(self.quantizer)
