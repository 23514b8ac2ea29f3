"""torch.ao building blocks: the custom-module configs and the observer constructors recipes choose from.

What a recipe is (which observer goes where, which model rewrite comes first) lives in
:mod:`qmamba_ao.recipes`; everything here is independent of any recipe. The scan's QConfig carries a
:class:`~qmamba_ao.ssm.quantized.ScanQuantSpec` (one quantizer per internal site), which survives
``prepare_fx`` where a QConfig subclass would not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn
from torch.ao.quantization.fx.custom_config import ConvertCustomConfig, PrepareCustomConfig
from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver

from .observers import PercentileObserver, PerTokenObserver, int_range
from .ssm import SelectiveScan
from .ssm.quantized import FakeQuantizedSelectiveScan, ObservedSelectiveScan, QuantizedSelectiveScan, ScanQuantSpec

__all__ = [
    "prepare_custom_config",
    "convert_custom_config",
    "weight_observer",
    "activation_observer",
    "per_token_activation_observer",
    "reduce_range",
    "FIRST_LAST_PATTERNS",
]

ObserverCtor = Callable[..., nn.Module]

#: Modules that sit at the ends of the network and keep 8 bits by default (timm names of the
#: Vim and VMamba families): the patch embedding and the classifier head.
FIRST_LAST_PATTERNS = (r"^patch_embed\..*", r"^patch_embed$", r"^head$", r"^classifier\.head$")


def _require_scan(model: Optional[nn.Module], expected: type) -> None:
    if model is None:
        return
    if not any(isinstance(m, expected) for m in model.modules()):
        found = sorted({type(m).__name__ for m in model.modules()})[:12]
        raise ValueError(
            f"{type(model).__name__} contains no {expected.__name__} module, so qmamba-ao has nothing to "
            f"quantize inside a selective scan. Build the model from qmamba_ao.models (timm names such as "
            f"'vim_tiny_patch16_224') or convert foreign Mamba mixers first. Module types found: {found}"
        )


def prepare_custom_config(model: Optional[nn.Module] = None) -> PrepareCustomConfig:
    """PrepareCustomConfig mapping SelectiveScan -> ObservedSelectiveScan (an FX leaf).

    Pass ``model`` to check that it really contains a SelectiveScan.
    """
    _require_scan(model, SelectiveScan)
    return PrepareCustomConfig().set_float_to_observed_mapping(SelectiveScan, ObservedSelectiveScan)


def convert_custom_config(model: Optional[nn.Module] = None, *, float_output: bool = False) -> ConvertCustomConfig:
    """ConvertCustomConfig mapping ObservedSelectiveScan -> QuantizedSelectiveScan.

    ``float_output=True`` maps to :class:`~qmamba_ao.ssm.quantized.FakeQuantizedSelectiveScan`
    instead, whose output is fake-quantized float: the scan of the decomposed reference model,
    where no quantized tensor flows between modules. Pass the prepared ``model`` to check that it
    contains an observed scan.
    """
    _require_scan(model, ObservedSelectiveScan)
    quantized = FakeQuantizedSelectiveScan if float_output else QuantizedSelectiveScan
    return ConvertCustomConfig().set_observed_to_quantized_mapping(ObservedSelectiveScan, quantized)


# ----------------------------------------------------------------------------------------------
# Observer constructors
# ----------------------------------------------------------------------------------------------


def weight_observer(bits: int) -> ObserverCtor:
    """Symmetric per-output-channel weights in the narrow signed range ``[-(2^(b-1)-1), 2^(b-1)-1]``.

    The narrow range keeps the grid symmetric, and it matters for correctness: with the full range
    torch.ao's symmetric scale maps the largest weight to ``2^(b-1) - 0.5``, which rounds one level
    beyond ``quant_max``, and the x86 conversion stores it without clamping (a 6-bit weight
    becomes 32).
    """
    _, qmax = int_range(bits, signed=True)
    return PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-qmax, quant_max=qmax
    )


def activation_observer(kind: str, bits: int, percentile: float = 99.99) -> ObserverCtor:
    """Per-tensor asymmetric activations in an unsigned ``bits``-bit range (stored as quint8)."""
    qmin, qmax = int_range(bits, signed=False)
    common = dict(dtype=torch.quint8, quant_min=qmin, quant_max=qmax)
    if kind == "minmax":
        return MinMaxObserver.with_args(**common)
    if kind == "percentile":
        return PercentileObserver.with_args(percentile=percentile, **common)
    if kind == "histogram":
        return HistogramObserver.with_args(**common)
    raise ValueError(f"unknown activation observer kind {kind!r}; use 'minmax', 'percentile' or 'histogram'")


def per_token_activation_observer(bits: int, token_axis: int = 1) -> ObserverCtor:
    """Static per-token asymmetric activations (PTQ4VM's PTS): one calibrated min/max per token position.

    ``token_axis=1`` fits Linear inputs ``(batch, tokens, channels)``. torch.ao treats it as a
    per-channel activation (``ch_axis = token_axis``); the token count must stay fixed (Vim's is).
    """
    qmin, qmax = int_range(bits, signed=False)
    return PerTokenObserver.with_args(
        token_axis=token_axis, dtype=torch.quint8, qscheme=torch.per_channel_affine, quant_min=qmin, quant_max=qmax
    )


def reduce_range(ctor: Any) -> Any:
    """An 8-bit unsigned activation constructor narrowed to 0..127; other constructors unchanged.

    torch.ao's x86 kernels multiply uint8 activations by int8 weights and add pairs of products in
    16 bits on CPUs without VNNI (``255 * 127 * 2`` overflows ``int16``); torch.ao's own x86
    default observes activations with ``reduce_range=True`` (7 bits) for that reason. A static
    per-token 8-bit constructor becomes per-tensor min/max: the int8 kernels take one activation
    scale per tensor.
    """
    if isinstance(ctor, ScanQuantSpec):
        return ScanQuantSpec(reduce_range(ctor.activation), ctor.sites, h_feedback=ctor.h_feedback)
    probe = ctor()
    if isinstance(probe, PerTokenObserver) and (probe.quant_min, probe.quant_max) == (0, 255):
        return MinMaxObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=127)
    if getattr(probe, "dtype", None) == torch.quint8 and (probe.quant_min, probe.quant_max) == (0, 255):
        return ctor.with_args(quant_min=0, quant_max=127)
    return ctor
