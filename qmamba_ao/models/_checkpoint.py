"""Checkpoint-loading pieces shared by the model files (unwrapping, renaming, a replaced classifier, the fit check)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Optional

from torch import Tensor, nn

__all__ = [
    "unwrap_checkpoint",
    "checkpoint_tensors",
    "format_keys",
    "mismatch_lines",
    "drop_replaced_head",
    "check_fit",
]


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


def checkpoint_tensors(
    checkpoint: Mapping[str, Any], convert: Callable[[str, Tensor], tuple[str, Tensor]]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of ``checkpoint`` (unwrapped, DDP ``module.`` prefix stripped) passed through
    ``convert(key, tensor) -> (key, tensor)``, and for each converted key where it came from
    (``"old.key (shape)"``), for error messages. Entries that are not tensors are skipped."""
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in unwrap_checkpoint(checkpoint).items():
        if not isinstance(value, Tensor):
            continue
        key = key[len("module.") :] if key.startswith("module.") else key
        new_key, new_value = convert(key, value)
        out[new_key] = new_value
        if new_key != key:
            origin[new_key] = f"{key} {tuple(value.shape)}"
    return out, origin


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


def drop_replaced_head(
    out: dict[str, Tensor], target: Mapping[str, Tensor], model: nn.Module, head: str, stacklevel: int = 3
) -> bool:
    """Drop the checkpoint's classifier ``{head}.weight``/``.bias`` from ``out`` when the model was
    built with a different ``num_classes`` than its pretrained config (as timm's loader does),
    instead of reporting it as a mismatch. Returns whether it was dropped. The warning names the
    code ``stacklevel`` frames up (3: the caller of the function calling this one)."""
    head_keys = [k for k in (f"{head}.weight", f"{head}.bias") if k in out]
    pretrained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    head_mismatch = any(k in target and out[k].shape != target[k].shape for k in head_keys)
    if not (head_mismatch and pretrained_classes is not None and model.num_classes != pretrained_classes):
        return False
    warnings.warn(
        f"Dropping the checkpoint's classifier ({tuple(out[f'{head}.weight'].shape)}): the model has "
        f"num_classes={model.num_classes}; the new head keeps its random initialisation.",
        stacklevel=stacklevel,
    )
    for k in head_keys:
        del out[k]
    return True


def check_fit(
    out: dict[str, Tensor],
    target: Mapping[str, Tensor],
    model: nn.Module,
    title: str,
    head: str,
    hints: Callable[[list[str]], list[str]],
    origin: Optional[Mapping[str, str]] = None,
) -> None:
    """Raise ``ValueError`` unless the converted checkpoint ``out`` fits ``target`` (the model's state
    dict) key for key and shape for shape; a silent partial load would give a model that runs but
    is wrong.

    The classifier ``head`` is first dropped from ``out`` where the model replaced it
    (:func:`drop_replaced_head`; its warning names the checkpoint filter's caller). The message is
    ``title``, the missing / unexpected / mis-shaped keys (a mis-shaped key with its ``origin``
    where given), then the lines ``hints(mis_shaped_keys)`` returns.
    """
    ignore_head = drop_replaced_head(out, target, model, head, stacklevel=4)
    missing = [k for k in target if k not in out and not (ignore_head and k.startswith(f"{head}."))]
    unexpected = [k for k in out if k not in target]
    bad = [k for k in out if k in target and out[k].shape != target[k].shape]
    origin = origin or {}
    mismatched = [
        f"{k}: checkpoint {tuple(out[k].shape)}"
        + (f" (from {origin[k]})" if k in origin else "")
        + f" vs model {tuple(target[k].shape)}"
        for k in bad
    ]
    lines = mismatch_lines(title, missing, unexpected, mismatched)
    if lines:
        raise ValueError("\n".join(lines + hints(bad)))
