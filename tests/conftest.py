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
