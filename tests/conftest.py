"""Shared fixtures: where the reference data extracted from the official code lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
_FALLBACK = Path("/work/shared/reference")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``$QMAMBA_REFERENCE``, else ``<repo>/../shared/reference``, else ``/work/shared/reference``."""
    env = os.environ.get("QMAMBA_REFERENCE")
    candidates = [Path(env)] if env else [_REPO.parent / "shared" / "reference", _FALLBACK]
    for path in candidates:
        if path.is_dir():
            return path
    pytest.skip(f"reference data not found (looked in {', '.join(map(str, candidates))}; set QMAMBA_REFERENCE)")


@pytest.fixture(scope="session")
def reduced_vim(reference_dir):
    """The official reduced Vim (depth 2, 64x64, 10 classes) with its reference weights, eval mode."""
    import timm
    import torch

    import qmamba_ao.models  # noqa: F401
    from qmamba_ao.models.vim import checkpoint_filter_fn

    ref = torch.load(reference_dir / "vim_reduced_reference.pt", weights_only=True)
    model = timm.create_model("vim_tiny_patch16_224", img_size=64, depth=2, num_classes=10).eval()
    model.load_state_dict(checkpoint_filter_fn(ref["state_dict"], model))
    return model
