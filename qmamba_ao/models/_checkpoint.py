"""Checkpoint-loading pieces shared by the model files (unwrapping, key reports, a replaced classifier)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["unwrap_checkpoint", "format_keys", "mismatch_lines", "drop_replaced_head"]


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict inside a training checkpoint, or ``checkpoint`` itself when it is one.

    Training scripts (the official Vim and VMamba ones, examples/train_fmnist.py) keep the weights
    under ``"model"``, EMA runs also under ``"model_ema"``; some tools use ``"state_dict"``. The
    first of those holding a non-empty mapping of tensors wins.
    """
    for name in ("model", "model_ema", "state_dict"):
        inner = checkpoint.get(name)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return inner
    return checkpoint


def format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def mismatch_lines(title: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    """The first lines of a "checkpoint does not fit" error; empty when everything fits."""
    if not (missing or unexpected or mismatched):
        return []
    lines = [title]
    if missing:
        lines.append(f"  missing keys: {format_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {format_keys(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches: {format_keys(mismatched)}")
    return lines


def drop_replaced_head(out: dict[str, Tensor], target: dict[str, Tensor], model: nn.Module, head: str) -> bool:
    """Drop the checkpoint's classifier ``{head}.weight``/``.bias`` from ``out`` when the model was
    built with a different ``num_classes`` than its pretrained config (as timm's loader does),
    instead of reporting it as a mismatch. Returns whether it was dropped."""
    head_keys = [k for k in (f"{head}.weight", f"{head}.bias") if k in out]
    pretrained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    head_mismatch = any(k in target and out[k].shape != target[k].shape for k in head_keys)
    if not (head_mismatch and pretrained_classes is not None and model.num_classes != pretrained_classes):
        return False
    warnings.warn(
        f"Dropping the checkpoint's classifier ({tuple(out[f'{head}.weight'].shape)}): the model has "
        f"num_classes={model.num_classes}; the new head keeps its random initialisation.",
        stacklevel=3,
    )
    for k in head_keys:
        del out[k]
    return True
