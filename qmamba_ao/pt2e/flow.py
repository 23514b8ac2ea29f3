"""The PT2E flow end to end: recipe rewrite, ``torch.export``, ``prepare_pt2e``, calibration, ``convert_pt2e``.

:func:`quantize_pt2e` is the PT2E counterpart of :func:`qmamba_ao.quantize` (same recipe, same
calibration batches, same qparams); the calls it makes are the public ones, so the flow can be
written by hand::

    model = qmamba_ao.get_recipe("qmamba").rewrite(model, calib_batches)
    gm = torch.export.export(model.eval(), (calib_batches[0],)).module()
    prepared = prepare_pt2e(gm, QMambaQuantizer("qmamba", 4, 4))
    for x in calib_batches:
        prepared(x)
    quantized = convert_pt2e(prepared)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer
from tqdm import tqdm

from .._utils import batch_input
from ..ptq import check_calibration_batch, observer_names
from ..recipes import Recipe, get_recipe
from ..ssm.quantized import freeze_site
from .observers import RecipeObserver
from .quantizer import QMambaQuantizer

__all__ = ["export_model", "calibrate_pt2e", "quantize_pt2e", "site_qparams"]

#: largest batch the exported graph accepts (the batch dimension is dynamic)
MAX_BATCH = 1 << 16


def export_model(model: nn.Module, example_inputs: tuple[Any, ...], dynamic_batch: bool = True) -> torch.fx.GraphModule:
    """``torch.export.export(model.eval(), example_inputs).module()``, batch size dynamic by default.

    The scans appear in their decomposed form with marked quantization sites
    (:mod:`qmamba_ao.pt2e.scan`). A model in training mode is copied before ``eval()``. With a
    dynamic batch an example batch of one is traced as two copies (torch.export would fix a size-1
    dimension).
    """
    if model.training:
        model = copy.deepcopy(model).eval()
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        dynamic_shapes = tuple({0: batch} if isinstance(x, Tensor) else None for x in example_inputs)
        # torch.export specialises a dimension of size 1: trace a batch of one as a batch of two
        example_inputs = tuple(
            torch.cat([x, x]) if isinstance(x, Tensor) and x.dim() and x.shape[0] == 1 else x for x in example_inputs
        )
    return torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes).module()


@torch.no_grad()
def calibrate_pt2e(prepared: nn.Module, calib_data: Iterable[Any], progress: bool = True) -> int:
    """Run a ``prepare_pt2e`` model over ``calib_data`` (input batches or ``(input, target)`` pairs).

    Each batch is checked first (empty, NaN or Inf: ValueError naming the batch). Returns the
    number of batches. Single process: the FX route's cross-process merging does not apply here.
    """
    n = 0
    total = len(calib_data) if hasattr(calib_data, "__len__") else None  # type: ignore[arg-type]
    for batch in tqdm(calib_data, total=total, desc="calibrating", disable=not progress, unit="batch"):
        x = batch_input(batch)
        check_calibration_batch(n, x)
        prepared(x)
        n += 1
    if n == 0:
        raise ValueError("calib_data is empty: give at least one batch of calibration images")
    return n


def quantize_pt2e(
    model: nn.Module,
    calib_data: Iterable[Any],
    recipe: Union[str, Recipe] = "qmamba",
    w_bits: int = 4,
    a_bits: int = 4,
    example_inputs: Optional[tuple[Any, ...]] = None,
    progress: bool = True,
    quantizer: Optional[Quantizer] = None,
    **options: Any,
) -> torch.fx.GraphModule:
    """Quantize ``model`` through PT2E: the recipe's rewrite, export, ``prepare_pt2e``, calibration, ``convert_pt2e``.

    ``quantizer`` defaults to ``QMambaQuantizer(recipe, w_bits, a_bits, **options)``; pass another
    (e.g. a ``ComposableQuantizer`` with torchao's ``X86InductorQuantizer``) to change what is
    quantized; the recipe still chooses the rewrite. ``example_inputs`` default to the first
    calibration batch. Returns the converted graph (quantize / dequantize ops around float ops,
    runs eagerly and under ``torch.compile``).
    """
    recipe = get_recipe(recipe)
    if quantizer is None:  # bad options fail before the rewrite's float pass
        quantizer = QMambaQuantizer(recipe, w_bits, a_bits, **options)
    elif options:
        raise ValueError(
            f"mapping option(s) {', '.join(options)} have no effect next to an explicit quantizer: set them on it"
        )
    items = list(calib_data)
    if not items:
        raise ValueError("calib_data is empty: give at least one batch of calibration images")
    for i, item in enumerate(items):
        check_calibration_batch(i, batch_input(item))
    if example_inputs is None:
        example_inputs = (batch_input(items[0]),)
    if recipe.rewrites_model:
        model = recipe.rewrite(model, items)
    prepared = prepare_pt2e(export_model(model, example_inputs), quantizer)
    calibrate_pt2e(prepared, items, progress=progress)
    return convert_pt2e(prepared)


def _frozen_state(obs: nn.Module) -> dict[str, Tensor]:
    frozen = freeze_site(obs)
    return {k: v.detach().clone() for k, v in frozen.state_dict().items()}


def site_qparams(prepared: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Every activation / scan-site quantizer of a calibrated model, by site label, as the buffers of
    its frozen form (scale, zero point, and LtSQ's transform or TGQ's groups).

    Works on a ``prepare_pt2e`` model (labels ``input of layers.0.mixer.in_proj``,
    ``input 'u' of layers.0.mixer.scan``, ``layers.0.mixer.scan.dA``, ...) and on an FX-prepared one
    (labels from :func:`qmamba_ao.ptq.observer_names`), so that the two routes can be compared.
    Weight observers are left out (both routes compute them from the same weights).
    """
    out: dict[str, dict[str, Tensor]] = {}
    adapters = [m for m in prepared.modules() if isinstance(m, RecipeObserver)]
    if adapters:
        for m in adapters:
            if not m.label.startswith("weight of "):
                out.setdefault(m.label, _frozen_state(m.inner))
        return out
    for path, label in observer_names(prepared).items():
        out.setdefault(label, _frozen_state(prepared.get_submodule(path)))
    return out
