"""torch.ao configuration factories: custom-module mappings (and, later, recipes)."""

from __future__ import annotations

from typing import Optional

from torch import nn
from torch.ao.quantization.fx.custom_config import ConvertCustomConfig, PrepareCustomConfig

from .ssm import SelectiveScan
from .ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan

__all__ = ["prepare_custom_config", "convert_custom_config"]


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


def convert_custom_config(model: Optional[nn.Module] = None) -> ConvertCustomConfig:
    """ConvertCustomConfig mapping ObservedSelectiveScan -> QuantizedSelectiveScan.

    Pass the prepared ``model`` to check that it contains an observed scan.
    """
    _require_scan(model, ObservedSelectiveScan)
    return ConvertCustomConfig().set_observed_to_quantized_mapping(ObservedSelectiveScan, QuantizedSelectiveScan)
