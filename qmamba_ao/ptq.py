"""``quantize``: a recipe's model rewrite, torch.ao's prepare_fx, calibration and conversion, with a progress bar.

Nothing here does what the standard calls cannot: a user can write the same calls by hand with
:func:`qmamba_ao.get_qconfig_mapping` and the two custom configs. The one thing :func:`quantize`
adds is a recipe's float-equivalent model rewrite (``qmamba`` / ``ptq4vm``: smoothing, ``quamba``:
Hadamard rotation), applied to a copy of the model before ``prepare_fx``; with the raw calls, apply
it yourself: ``model = qmamba_ao.get_recipe(recipe).rewrite(model, calib_data)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx, convert_fx, prepare_fx
from tqdm import tqdm

from ._utils import batch_input
from .observers.affine import is_per_channel
from .qconfig import convert_custom_config, prepare_custom_config
from .recipes import Recipe, get_recipe, list_recipes
from .ssm import is_float_scan
from .ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan

__all__ = ["quantize", "prepare", "calibrate", "convert", "prepare_calibrated", "evaluate"]


def prepare(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    recipe: Union[str, Recipe] = "qmamba",
    w_bits: int = 4,
    a_bits: int = 4,
    qconfig_mapping: Optional[QConfigMapping] = None,
    **options: Any,
) -> torch.fx.GraphModule:
    """``prepare_fx`` with the recipe's QConfigMapping and qmamba-ao's prepare config (model copied).

    A ``qconfig_mapping`` given explicitly (e.g. a recipe edited with ``set_module_name``) is used
    as it is, instead of the recipe.

    ``prepare`` does not apply a recipe's model rewrite (it has no calibration data): for
    ``qmamba`` / ``ptq4vm`` / ``quamba`` pass ``get_recipe(recipe).rewrite(model, calib_data)`` as
    ``model``, or use :func:`quantize`.
    """
    if qconfig_mapping is not None:
        mapping = qconfig_mapping
    else:
        mapping = get_recipe(recipe).qconfig_mapping(w_bits, a_bits, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        return prepare_fx(
            copy.deepcopy(model).eval(),
            mapping,
            example_inputs,
            prepare_custom_config=prepare_custom_config(model),
        )


def name_sites(prepared: nn.Module) -> None:
    """Give every scan-site observer its full name (``layers.3.mixer.scan.h``) for error messages."""
    for name, mod in prepared.named_modules():
        if isinstance(mod, ObservedSelectiveScan):
            for site, obs in mod.site_modules.items():
                obs.site_name = f"{name}.{site}"


@torch.inference_mode()
def calibrate(prepared: nn.Module, calib_data: Iterable[Any], progress: bool = True) -> int:
    """Run the prepared model over ``calib_data``; returns the number of batches seen."""
    name_sites(prepared)
    n = 0
    total = len(calib_data) if hasattr(calib_data, "__len__") else None  # type: ignore[arg-type]
    for batch in tqdm(calib_data, total=total, desc="calibrating", disable=not progress, unit="batch"):
        prepared(batch_input(batch))
        n += 1
    if n == 0:
        raise ValueError("calib_data is empty: give at least one batch of calibration images")
    return n


def per_channel_activations(prepared: nn.Module) -> list[str]:
    """Names of the activation observers of a prepared model that quantize per channel / per token."""
    return [
        name
        for name, m in prepared.named_modules()
        if name.rpartition(".")[2].startswith("activation_post_process") and is_per_channel(getattr(m, "qscheme", None))
    ]


def convert(prepared: nn.Module, reference: bool = False) -> torch.fx.GraphModule:
    """``convert_fx`` (x86 quantized kernels) or torch.ao's decomposed reference conversion, with qmamba-ao's config.

    torch.ao's x86 backend has no kernels for per-channel (per-token) activations, and its
    lowering moves shape ops such as ``transpose`` onto per-channel quantized tensors, which fails
    at run time. A prepared model with such observers (recipe ``ptq4vm``) is therefore converted
    as the reference model even when ``reference=False``, with a warning.

    The reference model's scans are :class:`~qmamba_ao.ssm.quantized.FakeQuantizedSelectiveScan`
    (``convert_custom_config(float_output=True)``), which return their fake-quantized output in float.
    """
    if not reference and per_channel_activations(prepared):
        warnings.warn(
            "the model quantizes activations per token (per channel), which torch.ao's x86 backend has no "
            "kernels for; converting to the reference model (simulated quantization) instead. "
            "Pass reference=True to silence this warning.",
            UserWarning,
            stacklevel=2,
        )
        reference = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        # A recipe may keep every scan in float (ptq4vm): then there is no observed scan to check for.
        checked = None if any(is_float_scan(m) for m in prepared.modules()) else prepared
        if not reference:
            return convert_fx(prepared, convert_custom_config=convert_custom_config(checked))
        cfg = convert_custom_config(checked, float_output=True)
        gm = _convert_to_reference_decomposed_fx(prepared, convert_custom_config=cfg)
        return _activation_qparams_as_buffers(_drop_scan_dequantize(gm))


def _activation_qparams_as_buffers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Move the per-tensor activation qparams of a decomposed graph from code literals into buffers.

    The decomposed conversion writes each activation's scale and zero point into the generated
    code, so a ``state_dict`` would not carry them and a saved model could not be restored. Here
    every such pair becomes two buffers read by the ``.tensor`` overload of the same op.
    """
    qd = torch.ops.quantized_decomposed
    overloads = {
        qd.quantize_per_tensor.default: qd.quantize_per_tensor.tensor,
        qd.dequantize_per_tensor.default: qd.dequantize_per_tensor.tensor,
    }
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in overloads:
            continue
        scale, zero_point = node.args[1], node.args[2]
        if not isinstance(scale, (int, float)) or not isinstance(zero_point, int):
            continue
        s = torch.tensor(float(scale), dtype=torch.float32)
        if s.item() != float(scale):  # keep the exact value the code had
            s = torch.tensor(float(scale), dtype=torch.float64)
        names = (f"_activation_scale_{count}", f"_activation_zero_point_{count}")
        gm.register_buffer(names[0], s)
        gm.register_buffer(names[1], torch.tensor(zero_point, dtype=torch.int64))
        count += 1
        with gm.graph.inserting_before(node):
            attrs = [gm.graph.get_attr(n) for n in names]
        node.args = (node.args[0], *attrs, *node.args[3:])
        node.target = overloads[node.target]
    gm.graph.lint()
    gm.recompile()
    return gm


def _drop_scan_dequantize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove the ``dequantize`` torch.ao writes after each converted scan: its output is already float.

    The reference model is torch.ao's *decomposed* reference conversion: quantize/dequantize pairs
    on plain integer tensors that clamp to each observer's ``quant_min``/``quant_max``. (The public
    ``convert_to_reference_fx`` stores activations in quint8 tensors, which clamp to 0..255 whatever
    the observer's range, so a 4-bit activation outside its calibrated range kept up to 256 levels.)
    There each scan fake-quantizes its own output, so the ``dequantize`` after it goes.
    """
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), QuantizedSelectiveScan):
            continue
        for user in list(node.users):
            if user.op == "call_method" and user.target == "dequantize":
                user.replace_all_uses_with(node)
                gm.graph.erase_node(user)
    gm.graph.lint()
    gm.recompile()
    return gm


def prepare_calibrated(
    model: nn.Module,
    calib_data: Iterable[Any],
    recipe: Union[str, Recipe] = "qmamba",
    w_bits: int = 4,
    a_bits: int = 4,
    example_inputs: Optional[tuple[Any, ...]] = None,
    progress: bool = True,
    qconfig_mapping: Optional[QConfigMapping] = None,
    **options: Any,
) -> torch.fx.GraphModule:
    """:func:`quantize` up to the conversion: the recipe's model rewrite, ``prepare_fx`` and calibration.

    ``calib_data``: an iterable of input batches or ``(input, target)`` pairs (a DataLoader works).
    ``example_inputs`` default to the first calibration batch. ``options`` go to
    :meth:`Recipe.qconfig_mapping <qmamba_ao.recipes.Recipe.qconfig_mapping>`. The same data gives
    identical qparams. The recipe's rewrite is applied to a copy of ``model`` with ``calib_data``,
    also when ``qconfig_mapping`` is given; an unknown recipe name next to an explicit mapping
    means no rewrite.
    """
    # An explicit mapping makes the recipe's name matter only for its rewrite.
    explicit_only = qconfig_mapping is not None and not isinstance(recipe, Recipe) and recipe not in list_recipes()
    if not explicit_only:
        recipe = get_recipe(recipe)
    rewrites = isinstance(recipe, Recipe) and recipe.rewrites_model
    if example_inputs is None or rewrites:
        items = list(calib_data)
        if not items:
            raise ValueError("calib_data is empty: give at least one batch of calibration images")
        calib_data = items
    if example_inputs is None:
        example_inputs = (batch_input(items[0])[:1],)
    if rewrites:
        model = recipe.rewrite(model, calib_data)
    prepared = prepare(model, example_inputs, recipe, w_bits, a_bits, qconfig_mapping, **options)
    calibrate(prepared, calib_data, progress=progress)
    return prepared


def quantize(
    model: nn.Module,
    calib_data: Iterable[Any],
    recipe: Union[str, Recipe] = "qmamba",
    w_bits: int = 4,
    a_bits: int = 4,
    example_inputs: Optional[tuple[Any, ...]] = None,
    reference: bool = True,
    **kwargs: Any,
) -> torch.fx.GraphModule:
    """Quantize ``model`` with a recipe: its model rewrite, ``prepare_fx``, calibration, conversion.

    Everything up to the conversion is :func:`prepare_calibrated`; ``kwargs`` (``progress``,
    ``qconfig_mapping`` and the mapping options such as ``h_feedback``) go there.

    ``reference=True`` (default) converts with torch.ao's decomposed reference conversion:
    quantize/dequantize around float ops, exact on every CPU, what accuracy tables should use.
    ``reference=False`` lowers to torch.ao's x86 int8 kernels (``convert_fx``); on CPUs without
    VNNI those kernels saturate with full-range 8-bit activations (torch.ao's own x86 default uses
    7-bit activations for that reason, see :meth:`Recipe.x86_qconfig_mapping
    <qmamba_ao.recipes.Recipe.x86_qconfig_mapping>`), so compare against the reference model before
    trusting a lowered W8A8 model.

    ``qmamba`` / ``ptq4vm`` / ``ptq4vm-naive-ssm`` quantize Linear inputs per token, which torch.ao's
    x86 backend has no kernels for: they are always converted to the reference (simulated) model,
    see :func:`convert`.
    """
    prepared = prepare_calibrated(model, calib_data, recipe, w_bits, a_bits, example_inputs, **kwargs)
    return convert(prepared, reference=reference)


@torch.inference_mode()
def evaluate(
    model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500, progress: bool = True, desc: str = "eval"
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (in %) and the predictions of ``model`` on in-memory images.

    Ties break towards the lower class index (as ``argmax`` in torch, NumPy and ONNX): with 4-bit
    outputs two classes often share the top logit, and an arbitrary tie order would make two
    runtimes that compute identical logits disagree on the prediction.
    """
    preds, correct1, correct5 = [], 0, 0
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, unit="batch"):
        logits = model(images[i : i + batch_size])
        if logits.is_quantized:
            logits = logits.dequantize()
        y = labels[i : i + batch_size]
        top = logits.sort(dim=-1, descending=True, stable=True).indices[:, :5]
        preds.append(top[:, 0])
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(-1).sum().item()
    n = len(images)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "preds": torch.cat(preds)}
