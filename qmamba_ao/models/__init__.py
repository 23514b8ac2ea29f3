"""Model definitions; importing this package registers them with timm."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from . import vim, vmamba
from .adapt import adapt_mamba, find_mamba_mixers
from .vim import BiMambaMixer, Block, VisionMamba, checkpoint_filter_fn

__all__ = [
    "adapt_mamba",
    "find_mamba_mixers",
    "BiMambaMixer",
    "Block",
    "VisionMamba",
    "checkpoint_filter_fn",
    "checkpoint_filter",
]

CheckpointFilter = Callable[[Mapping[str, Any], nn.Module], dict[str, Tensor]]

#: Model class -> the function converting its family's checkpoints (official layouts, wrapped
#: training checkpoints) into a state dict for a given model.
_CHECKPOINT_FILTERS: dict[type, CheckpointFilter] = {
    vim.VisionMamba: vim.checkpoint_filter_fn,
    vmamba.VSSM: vmamba.checkpoint_filter_fn,
}


def checkpoint_filter(model: nn.Module) -> CheckpointFilter:
    """The checkpoint converter of ``model``'s family: ``checkpoint_filter(model)(checkpoint, model)``.

    Looked up along the class hierarchy, so subclasses of a registered model use its converter.
    Raises ``TypeError`` naming the supported classes for any other model.
    """
    for cls in type(model).__mro__:
        if cls in _CHECKPOINT_FILTERS:
            return _CHECKPOINT_FILTERS[cls]
    supported = ", ".join(c.__name__ for c in _CHECKPOINT_FILTERS)
    raise TypeError(f"no checkpoint converter for {type(model).__name__}; supported model classes: {supported}")
