"""Small helpers shared across the package; they depend on torch only, so any module may import them."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["batch_input", "set_submodule"]


def batch_input(batch: Any) -> Tensor:
    """The model input of a calibration item: a tensor, or the first element of (input, target)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"calibration items must be input tensors or (input, target) pairs; got {type(batch).__name__}")


def set_submodule(root: nn.Module, dotted_name: str, new_module: nn.Module) -> None:
    """Replace the submodule ``dotted_name`` of ``root`` (e.g. ``layers.0.mixer.out_proj``) by ``new_module``."""
    parent, _, child = dotted_name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new_module)


def warm_vector_math() -> None:
    """Run one vectorised ``pow`` so that torch's ``log1p`` / ``expm1`` / ``softplus`` kernels run fast.

    Measured on the x86 CPUs of this project's machines with torch 2.14: until a vectorised ``pow``
    has run somewhere in the process (any thread), those three kernels run 4-14x slower than afterwards
    (``benchmarks/kernel_speed.py``), the same Sleef routine with the same results. The scan's softplus and
    LtSQ's log transforms sit in every forward, so the package does this once at import. The cause is
    inside torch's CPU build, not understood here; elsewhere this is one harmless 64-element ``pow``.
    """
    import torch

    torch.pow(torch.linspace(0.5, 1.5, 64), 0.37)
