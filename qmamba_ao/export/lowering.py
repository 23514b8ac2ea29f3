"""From a calibrated (prepared) model to a converted model that torch.export and ONNX accept.

torch.ao's public reference conversion keeps quantized tensors (``torch.quantize_per_tensor`` with
a quint8 dtype) in the graph: neither torch.export nor the ONNX exporters handle them, and a quint8
tensor clamps to 0..255 whatever the observer's narrower range was. The decomposed reference
conversion writes ``quantized_decomposed`` quantize/dequantize ops on plain integer tensors with
the observer's ``quant_min``/``quant_max``, so sub-8-bit ranges are enforced. :func:`to_exportable`
starts from the library's reference model (:func:`qmamba_ao.convert` with ``reference=True``) and
swaps each converted scan for an :class:`ExportableScan`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import fx, nn
from torch.ao.quantization import QConfigMapping

from .. import ptq
from .._utils import set_submodule
from ..qconfig import reduce_range
from ..recipes import Recipe, get_recipe
from ..ssm.modules import SelectiveScan, is_float_scan
from ..ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan
from .exportable_scan import ExportableScan, ExportError

__all__ = [
    "to_exportable",
    "float_exportable",
    "quantize_for_export",
    "check_exportable",
    "x86_qconfig_mapping",
    "reduce_range",
]

_DECOMPOSED = "quantized_decomposed"


def _is_observer(mod: nn.Module) -> bool:
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    return isinstance(mod, (ObserverBase, FakeQuantizeBase))


def to_exportable(prepared: nn.Module, recurrence: str = "unroll") -> fx.GraphModule:
    """Convert a calibrated ``prepare_fx`` model into an exportable quantized GraphModule.

    The result runs in PyTorch (it is the quantized model the ONNX export is checked against), and
    goes to ``torch.export.export`` and :func:`qmamba_ao.export.export_onnx` as it is. ``prepared``
    is not modified. ``recurrence``: ``"unroll"`` (one set of ops per time step) or ``"scan"``
    (torch's scan op; ONNX: one Scan node per selective scan), see ``docs/export.md``.
    """
    if not isinstance(prepared, fx.GraphModule) or not _is_observer_model(prepared):
        raise ExportError(
            "to_exportable() needs a calibrated model from prepare_fx / qmamba_ao.prepare (it holds observers); "
            f"got {type(prepared).__name__} without observers. Use qmamba_ao.export.quantize_for_export(model, "
            "calib_data, recipe, w_bits, a_bits) to do prepare, calibration and conversion in one call."
        )
    # The library's reference model (decomposed QDQ, scans returning float) with exportable scans.
    gm = ptq.convert(copy.deepcopy(prepared), reference=True)
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, QuantizedSelectiveScan):
            output_range = mod.output_range if mod.output_dtype is not None else None
            set_submodule(gm, name, ExportableScan(mod, output_range, recurrence))
    gm.recompile()
    check_exportable(gm)
    return gm


def float_exportable(model: nn.Module, recurrence: str = "unroll") -> nn.Module:
    """A copy of a float model whose selective scans are :class:`ExportableScan` without sites.

    The float baseline of an export: :func:`qmamba_ao.export.export_onnx` accepts it, and it runs
    the same ops as :func:`to_exportable`'s scans minus the quantize/dequantize pairs, so that
    latency comparisons between the two measure quantization and nothing else. ``model`` is not
    modified.
    """
    scans = [name for name, m in model.named_modules() if isinstance(m, SelectiveScan)]
    if not scans:
        raise ExportError(f"{type(model).__name__} holds no SelectiveScan: nothing to make exportable")
    if _is_observer_model(model) or not all(is_float_scan(model.get_submodule(n)) for n in scans):
        raise ExportError(
            "float_exportable() takes a float model; this one was prepared or converted. Use "
            "qmamba_ao.export.to_exportable(prepared) for a quantized model."
        )
    out = copy.deepcopy(model)
    for name in scans:
        set_submodule(out, name, ExportableScan(out.get_submodule(name), recurrence=recurrence))
    return out


def _is_observer_model(model: nn.Module) -> bool:
    return any(_is_observer(m) for m in model.modules())


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ExportError`, saying what to do, unless ``model`` came from :func:`to_exportable`
    (or is :func:`float_exportable`'s float baseline)."""
    name = type(model).__name__
    if any(isinstance(m, ObservedSelectiveScan) for m in model.modules()) or _is_observer_model(model):
        raise ExportError(
            f"{name} still holds observers: it was prepared but not converted. Convert it with "
            "qmamba_ao.export.to_exportable(prepared) (not convert_fx / convert_to_reference_fx) before exporting."
        )
    if any(isinstance(m, QuantizedSelectiveScan) for m in model.modules()):
        raise ExportError(
            f"{name} holds QuantizedSelectiveScan modules (from convert_fx or qmamba_ao.quantize / ptq.convert): "
            "their fast PyTorch scan is not an exportable graph. Convert the calibrated prepared model with "
            "qmamba_ao.export.to_exportable(prepared), or use "
            "qmamba_ao.export.quantize_for_export(model, calib_data, ...)."
        )
    has_exportable_scan = any(isinstance(m, ExportableScan) for m in model.modules())
    if not has_exportable_scan and any(is_float_scan(m) for m in model.modules()):
        raise ExportError(
            f"{name} is a float model with float scans. Quantize it first with "
            "qmamba_ao.export.quantize_for_export(model, calib_data, recipe, w_bits, a_bits), or export "
            "the float baseline with qmamba_ao.export.float_exportable(model)."
        )
    if not isinstance(model, fx.GraphModule):
        if has_exportable_scan:
            return  # float_exportable's float baseline
        raise ExportError(
            f"{name} is not a quantized model (a float nn.Module?). Quantize it first with "
            "qmamba_ao.export.quantize_for_export(model, calib_data, recipe, w_bits, a_bits)."
        )
    targets = [n.target for n in model.graph.nodes if n.op in ("call_function", "call_method")]
    if any(t in (torch.quantize_per_tensor, torch.quantize_per_channel, "dequantize") for t in targets):
        raise ExportError(
            f"{name} was converted with convert_fx / convert_to_reference_fx: it quantizes with quantized "
            "tensors, which cannot be exported. Convert the prepared model with "
            "qmamba_ao.export.to_exportable(prepared)."
        )
    if not any(_DECOMPOSED in str(t) for t in targets) and not any(
        isinstance(m, ExportableScan) for m in model.modules()
    ):
        raise ExportError(
            f"{name} contains no quantize/dequantize ops: it is a float model. Quantize it first with "
            "qmamba_ao.export.quantize_for_export(model, calib_data, recipe, w_bits, a_bits)."
        )


def quantize_for_export(
    model: nn.Module,
    calib_data: Iterable[Any],
    recipe: Union[str, Recipe] = "qmamba",
    w_bits: int = 4,
    a_bits: int = 4,
    example_inputs: Optional[tuple[Any, ...]] = None,
    *,
    recurrence: str = "unroll",
    **kwargs: Any,
) -> fx.GraphModule:
    """:func:`qmamba_ao.quantize` with :func:`to_exportable` as the last step: an exportable quantized model.

    ``kwargs`` (``progress``, ``qconfig_mapping``, mapping options) go to :func:`qmamba_ao.ptq.prepare_calibrated`.
    """
    prepared = ptq.prepare_calibrated(model, calib_data, recipe, w_bits, a_bits, example_inputs, **kwargs)
    return to_exportable(prepared, recurrence)


def x86_qconfig_mapping(
    recipe: Union[str, Recipe] = "qmamba", w_bits: int = 8, a_bits: int = 8, **options: Any
) -> QConfigMapping:
    """A recipe's mapping with 7-bit activations for torch.ao's x86 kernels: :meth:`Recipe.x86_qconfig_mapping
    <qmamba_ao.recipes.Recipe.x86_qconfig_mapping>`."""
    return get_recipe(recipe).x86_qconfig_mapping(w_bits, a_bits, **options)
