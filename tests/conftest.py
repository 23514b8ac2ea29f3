"""Shared fixtures: the vendored golden data, seeded reduced models, calibration images, the FX tracer.

Golden data (outputs of the official Vim and VMamba code, see ``tests/golden/README.md``) is only for
the tests that compare against the official models; a missing file fails those tests. Everything else
runs on seeded random models built here, so the suite needs nothing outside the repository.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import Tensor, nn
from toy_models import perturb

import qmamba_ao.models  # noqa: F401  (registers the timm names)
from qmamba_ao.ssm import SelectiveScan

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

#: the official reduced configurations the golden data was produced with (64x64 input, 10 classes)
VIM_REDUCED: dict[str, Any] = dict(img_size=64, depth=2, num_classes=10)
VMAMBA_REDUCED: dict[str, Any] = dict(dims=24, depths=[1, 1, 2, 1], num_classes=10)


#: Reconstruction steps per unit in unit tests: the flow and its bookkeeping are what they check; the
#: learning itself is measured by benchmarks/low_bit.py with the library default.
TEST_RECONSTRUCT_ITERS = 3


@pytest.fixture(autouse=True)
def _short_reconstruction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes that always reconstruct (ptq4vm's JLSS) run :data:`TEST_RECONSTRUCT_ITERS` steps per unit."""
    import sys

    monkeypatch.setattr(sys.modules["qmamba_ao.reconstruct"], "DEFAULT_ITERS", TEST_RECONSTRUCT_ITERS)


# -- golden data -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def golden_path() -> Callable[[str], Path]:
    """``golden_path(name)``: the vendored file's path; a missing file fails the test (never skips)."""

    def path(name: str) -> Path:
        file = GOLDEN_DIR / name
        if not file.is_file():
            pytest.fail(f"golden file {file} is missing; tests/golden/README.md says how it was produced")
        return file

    return path


@pytest.fixture(scope="session")
def golden_zeros(golden_path: Callable[[str], Path]) -> Callable[[str], dict[str, Tensor]]:
    """``golden_zeros(json_name)``: an official full-size state_dict, as zeros of the recorded key names and shapes."""

    def zeros(name: str) -> dict[str, Tensor]:
        return {k: torch.zeros(v) for k, v in json.loads(golden_path(name).read_text()).items()}

    return zeros


@pytest.fixture(scope="session")
def vim_golden(golden_path: Callable[[str], Path]) -> dict[str, Any]:
    """The official reduced Vim's config, weights, input, logits, intermediates and scan inputs (read only)."""
    return torch.load(golden_path("vim_reduced_reference.pt"), weights_only=True)


@pytest.fixture(scope="session")
def vmamba_golden(golden_path: Callable[[str], Path]) -> dict[str, Any]:
    """The official reduced VSSM's config, weights, inputs, logits, intermediates and scan inputs (read only)."""
    return torch.load(golden_path("vmamba_reduced_reference.pt"), weights_only=True)


# -- seeded models and data --------------------------------------------------------------------------


def _seeded(name: str, **kwargs: Any) -> nn.Module:
    """``name`` built under seed 0 and perturbed (every tensor distinct), without moving the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs)
    return perturb(model).eval()


@pytest.fixture(scope="session")
def vim() -> nn.Module:
    """A reduced Vim (depth 2, 64x64, 10 classes) with seeded random weights, eval mode.

    Shared by the whole session: tests copy it (``quantize`` / ``prepare`` do) and never modify it.
    """
    return _seeded("vim_tiny_patch16_224", **VIM_REDUCED)


@pytest.fixture(scope="session")
def vmamba() -> nn.Module:
    """A reduced VSSM (the s1l8 block type, stages 1/1/2/1, width 24) with seeded random weights, eval mode."""
    return _seeded("vmamba_tiny_s1l8", **VMAMBA_REDUCED)


@pytest.fixture(scope="session")
def images() -> list[Tensor]:
    """Three seeded batches of four 64x64 RGB images: two to calibrate on, the last one held out."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 64, 64, generator=g) for _ in range(3)]


# -- FX ----------------------------------------------------------------------------------------------


class ScanLeafTracer(torch.fx.Tracer):
    """What torch.ao's prepare_fx does for custom modules: keep every selective scan opaque."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SelectiveScan) or super().is_leaf_module(m, qualname)


@pytest.fixture(scope="session")
def fx_trace() -> Callable[[nn.Module], torch.fx.GraphModule]:
    """``fx_trace(model)``: the model symbolically traced with the scans as leaves."""

    def trace(model: nn.Module) -> torch.fx.GraphModule:
        return torch.fx.GraphModule(model, ScanLeafTracer().trace(model))

    return trace
