"""From a calibrated (prepared) model to a converted model that torch.export and ONNX accept.

torch.ao's public reference conversion keeps quantized tensors (``torch.quantize_per_tensor`` with
a quint8 dtype) in the graph: neither torch.export nor the ONNX exporters handle them, and a quint8
tensor clamps to 0..255 whatever the observer's narrower range was. The decomposed reference
conversion writes ``quantized_decomposed`` quantize/dequantize ops on plain integer tensors with
the observer's ``quant_min``/``quant_max``, so sub-8-bit ranges are enforced. Its converted scans
still return quantized tensors; :func:`convert` swaps each for an :class:`ExportableScan` and drops
the ``dequantize`` that followed it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping

from .. import ptq
from ..observers import PerTokenObserver
from ..qconfig import get_qconfig_mapping
from ..ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan, ScanQuantSpec
from .scan import ExportableScan, ExportError

__all__ = [
    "convert",
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


def convert(prepared: nn.Module, recurrence: str = "unroll") -> fx.GraphModule:
    """Convert a calibrated ``prepare_fx`` model into an exportable quantized GraphModule.

    The result runs in PyTorch (it is the quantized model the ONNX export is checked against), and
    goes to ``torch.export.export`` and :func:`qmamba_ao.export.export_onnx` as it is. ``prepared``
    is not modified. ``recurrence``: ``"unroll"`` (one set of ops per time step) or ``"scan"``
    (torch's scan op; ONNX: one Scan node per selective scan), see ``docs/export.md``.
    """
    if not isinstance(prepared, fx.GraphModule) or not any(_is_observer(m) for m in prepared.modules()):
        raise ExportError(
            "convert() needs a calibrated model from prepare_fx / qmamba_ao.prepare (it holds observers); "
            f"got {type(prepared).__name__} without observers. Use qmamba_ao.export.quantize_for_export(model, "
            "calib_data, recipe, w_bits, a_bits) to do prepare, calibration and conversion in one call."
        )
    # The library's reference model (decomposed QDQ, scans returning float) with exportable scans.
    gm = ptq.convert(copy.deepcopy(prepared), reference=True)
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, QuantizedSelectiveScan):
            output_range = mod.output_range if mod.output_dtype is not None else None
            _set_submodule(gm, name, ExportableScan(mod, output_range, recurrence))
    gm.recompile()
    check_exportable(gm)
    return gm


def _set_submodule(gm: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, new)


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ExportError`, saying what to do, unless ``model`` came from :func:`convert`."""
    name = type(model).__name__
    if any(isinstance(m, ObservedSelectiveScan) for m in model.modules()) or any(
        _is_observer(m) for m in model.modules()
    ):
        raise ExportError(
            f"{name} still holds observers: it was prepared but not converted. Convert it with "
            "qmamba_ao.export.convert(prepared) (not convert_fx / convert_to_reference_fx) before exporting."
        )
    if any(isinstance(m, QuantizedSelectiveScan) for m in model.modules()):
        raise ExportError(
            f"{name} holds QuantizedSelectiveScan modules (from convert_fx or qmamba_ao.quantize / ptq.convert): "
            "their fast PyTorch scan is not an exportable graph. Convert the calibrated prepared model with "
            "qmamba_ao.export.convert(prepared), or use qmamba_ao.export.quantize_for_export(model, calib_data, ...)."
        )
    if not isinstance(model, fx.GraphModule):
        raise ExportError(
            f"{name} is not a quantized model (a float nn.Module?). Quantize it first with "
            "qmamba_ao.export.quantize_for_export(model, calib_data, recipe, w_bits, a_bits)."
        )
    targets = [n.target for n in model.graph.nodes if n.op in ("call_function", "call_method")]
    if any(t in (torch.quantize_per_tensor, torch.quantize_per_channel, "dequantize") for t in targets):
        raise ExportError(
            f"{name} was converted with convert_fx / convert_to_reference_fx: it quantizes with quantized "
            "tensors, which cannot be exported. Convert the prepared model with qmamba_ao.export.convert(prepared)."
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
    recipe: str = "qmamba",
    w_bits: int = 4,
    a_bits: int = 4,
    example_inputs: Optional[tuple[Any, ...]] = None,
    progress: bool = True,
    qconfig_mapping: Optional[QConfigMapping] = None,
    recurrence: str = "unroll",
    **options: Any,
) -> fx.GraphModule:
    """:func:`qmamba_ao.quantize` with :func:`convert` as the last step: an exportable quantized model."""
    prepared = ptq.prepare_calibrated(
        model, calib_data, recipe, w_bits, a_bits, example_inputs, progress, qconfig_mapping, **options
    )
    return convert(prepared, recurrence)


# ----------------------------------------------------------------------------------------------
# x86 lowering (convert_fx to torch.ao's int8 kernels)
# ----------------------------------------------------------------------------------------------


def reduce_range(ctor: Any) -> Any:
    """An 8-bit unsigned activation constructor narrowed to 0..127; other constructors unchanged.

    torch.ao's x86 kernels multiply uint8 activations by int8 weights and add pairs of products in
    16 bits on CPUs without VNNI (``255 * 127 * 2`` overflows ``int16``); torch.ao's own x86
    default observes activations with ``reduce_range=True`` (7 bits) for that reason.
    """
    if isinstance(ctor, ScanQuantSpec):
        return ScanQuantSpec(reduce_range(ctor.activation), ctor.sites, h_feedback=ctor.h_feedback)
    probe = ctor()
    if isinstance(probe, PerTokenObserver) and (probe.quant_min, probe.quant_max) == (0, 255):
        # the int8 kernels take one activation scale per tensor
        return MinMaxObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=127)
    if getattr(probe, "dtype", None) == torch.quint8 and (probe.quant_min, probe.quant_max) == (0, 255):
        return ctor.with_args(quant_min=0, quant_max=127)
    return ctor


def x86_qconfig_mapping(recipe: str = "qmamba", w_bits: int = 8, a_bits: int = 8, **options: Any) -> QConfigMapping:
    """A recipe's QConfigMapping with every 8-bit activation observer (linear, conv and scan inputs and
    outputs) reduced to 7 bits, for ``convert_fx`` lowering to torch.ao's x86 int8 kernels.

    Static per-token Linear inputs (``qmamba``, ``ptq4vm*``) become per-tensor min/max: the
    kernels take one activation scale per tensor. The recipe's smoothing transform still applies.

    The scan's internal sites keep their bits: they run in float inside the scan module.
    """
    mapping = get_qconfig_mapping(recipe, w_bits, a_bits, **options)

    def narrow(qconfig: Optional[QConfig]) -> Optional[QConfig]:
        if qconfig is None:
            return None
        return QConfig(activation=reduce_range(qconfig.activation), weight=qconfig.weight)

    mapping.global_qconfig = narrow(mapping.global_qconfig)
    for table in (
        mapping.object_type_qconfigs,
        mapping.module_name_regex_qconfigs,
        mapping.module_name_qconfigs,
    ):
        for key in list(table):
            table[key] = narrow(table[key])
    for key in list(mapping.module_name_object_type_order_qconfigs):
        mapping.module_name_object_type_order_qconfigs[key] = narrow(
            mapping.module_name_object_type_order_qconfigs[key]
        )
    return mapping
