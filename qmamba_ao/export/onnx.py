"""ONNX export of a converted model (torch.export -> ONNX with the dynamo exporter) and an ORT runner.

The exporter's translation of ``quantized_decomposed.quantize_per_tensor`` emits a bare
QuantizeLinear, which saturates to the container's range (0..255 for uint8): a 4-bit (or 7-bit)
activation would silently keep values above its ``quant_max``. :func:`export_onnx` therefore
translates that op itself, adding ``Clip(quant_min, quant_max)`` on the integer tensor whenever
the range is narrower than the container. 4-bit values travel exactly, in int8/uint8 containers.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .exportable_scan import ExportError
from .lowering import check_exportable

__all__ = ["export_onnx", "export_program", "OnnxExport", "run_onnx", "onnx_session", "SUPPORTED_OPSETS", "require"]

#: Opsets the export is tested with: per-axis QuantizeLinear needs 13, the dynamo exporter 18.
SUPPORTED_OPSETS = range(18, 22)
DEFAULT_OPSET = 20

_INSTALL_HINT = "install the export extra: pip install 'qmamba-ao[export]' (onnx, onnxruntime, onnxscript)"

# ONNX TensorProto element types of the integer containers (TensorProto.UINT8 / INT8).
_ONNX_RANGES = {2: (0, 255), 3: (-128, 127)}


def require(*modules: str) -> None:
    """Raise ImportError naming the install command unless every module can be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}, which is not installed; {_INSTALL_HINT}")


def check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"opset {opset} is not supported; choose one of {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
            f"(default {DEFAULT_OPSET}): per-axis QuantizeLinear needs opset 13 and torch's ONNX exporter 18"
        )


def _translation_table(opset: int) -> dict:
    """quantize_per_tensor -> QuantizeLinear, followed by Clip when the range is narrower than the dtype."""
    import numpy as np
    import onnxscript
    from onnxscript import ir

    op = onnxscript.values.Opset("", opset)

    def const(value: int, onnx_dtype: int):
        np_dtype = np.uint8 if onnx_dtype == 2 else np.int8
        return op.Constant(value=ir.tensor(np.array(value, dtype=np_dtype)))

    def quantize_per_tensor(x, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: int):
        q = op.QuantizeLinear(x, op.Constant(value_float=float(scale)), const(zero_point, dtype))
        if (quant_min, quant_max) != _ONNX_RANGES.get(int(dtype), (quant_min, quant_max)):
            q = op.Clip(q, const(quant_min, dtype), const(quant_max, dtype))
        return q

    def quantize_per_tensor_tensor(x, scale, zero_point, quant_min: int, quant_max: int, dtype: int):
        # Scale and zero point as tensors (per-step qparams inside a Scan body).
        zp = op.Cast(zero_point, to=int(dtype))
        q = op.QuantizeLinear(x, op.CastLike(scale, x), zp)
        if (quant_min, quant_max) != _ONNX_RANGES.get(int(dtype), (quant_min, quant_max)):
            q = op.Clip(q, const(quant_min, dtype), const(quant_max, dtype))
        return q

    def dequantize_per_tensor_tensor(q, scale, zero_point, quant_min: int, quant_max: int, dtype: int, out_dtype=None):
        return op.DequantizeLinear(q, op.Cast(scale, to=1), op.Cast(zero_point, to=int(dtype)))

    qd = torch.ops.quantized_decomposed
    return {
        qd.quantize_per_tensor.default: quantize_per_tensor,
        qd.quantize_per_tensor.tensor: quantize_per_tensor_tensor,
        qd.dequantize_per_tensor.tensor: dequantize_per_tensor_tensor,
    }


def _example(model: nn.Module, example_inputs: Union[Tensor, tuple]) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def export_program(model: nn.Module, example_inputs: Union[Tensor, tuple], dynamic_batch: bool = True):
    """``torch.export.export`` of a converted model (from :func:`qmamba_ao.export.to_exportable`).

    ``dynamic_batch`` marks the first dimension of the first input as dynamic (size >= 1).
    """
    check_exportable(model)
    args = _example(model, example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = ({0: batch},) + tuple(None for _ in args[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False)


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: path, node counts by op type, seconds spent."""

    path: Path
    nodes: int
    op_counts: dict[str, int]
    seconds: float
    opset: int

    def summary(self) -> str:
        qdq = self.op_counts.get("QuantizeLinear", 0), self.op_counts.get("DequantizeLinear", 0)
        return (
            f"{self.path}: {self.nodes} nodes (QuantizeLinear {qdq[0]}, DequantizeLinear {qdq[1]}, "
            f"Clip {self.op_counts.get('Clip', 0)}), opset {self.opset}, exported in {self.seconds:.1f} s"
        )


def count_nodes(model: Any) -> dict[str, int]:
    """Op type -> count over the main graph and every subgraph / local function of an onnx.ModelProto."""
    counts: dict[str, int] = {}

    def walk(nodes: Sequence[Any]) -> None:
        for node in nodes:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if len(attr.g.node):
                    walk(attr.g.node)

    walk(model.graph.node)
    for fn in model.functions:
        walk(fn.node)
    return counts


def _strip_metadata(nodes: Sequence[Any]) -> None:
    for node in nodes:
        node.doc_string = ""
        del node.metadata_props[:]
        for attr in node.attribute:
            if len(attr.g.node):
                _strip_metadata(attr.g.node)


def export_onnx(
    model: nn.Module,
    example_inputs: Union[Tensor, tuple],
    path: Union[str, Path],
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    keep_metadata: bool = False,
) -> OnnxExport:
    """Export a converted model (from :func:`qmamba_ao.export.to_exportable`) to ONNX with QDQ nodes.

    Activations become per-tensor QuantizeLinear/DequantizeLinear (with a Clip for ranges narrower
    than the 8-bit container), weights per-axis pairs; each scan is unrolled over time or one Scan
    node, as :func:`qmamba_ao.export.to_exportable` chose. The exporter's per-node debugging metadata
    (source stack traces, FX node names: two thirds of the file) is dropped unless ``keep_metadata``.
    """
    from ..api import atomic_write, check_output

    require("onnx", "onnxscript")
    check_opset(opset)
    check_exportable(model)
    import onnx

    path = check_output(path, "file", "ONNX output")  # before the (long) export, not after it
    t0 = time.perf_counter()
    program = export_program(model, example_inputs, dynamic_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=opset,
            custom_translation_table=_translation_table(opset),
            optimize=True,
            verbose=False,
        )

    def write(tmp: Path) -> None:
        onnx_program.save(str(tmp), external_data=False)
        if not keep_metadata:
            proto = onnx.load(str(tmp), load_external_data=False)
            _strip_metadata(proto.graph.node)
            onnx.save(proto, str(tmp))

    atomic_write(path, write, label="ONNX output")
    seconds = time.perf_counter() - t0
    counts = count_nodes(onnx.load(str(path), load_external_data=False))
    return OnnxExport(path, sum(counts.values()), counts, seconds, opset)


def onnx_session(
    path: Union[str, Path],
    threads: Optional[int] = None,
    optimization: str = "basic",
    float_bias: bool = True,
) -> Any:
    """An onnxruntime CPU ``InferenceSession`` for an exported model (see :func:`run_onnx` for the options)."""
    require("onnxruntime")
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ValueError(f"optimization must be 'basic' or 'all'; got {optimization!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    disabled = ["WeightBiasQuantization"] if float_bias else []
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def run_onnx(
    path: Union[str, Path],
    images: Tensor,
    batch_size: int = 500,
    threads: Optional[int] = None,
    optimization: str = "basic",
    float_bias: bool = True,
) -> Tensor:
    """Logits of an exported model on ``images`` with onnxruntime's CPU provider.

    ``optimization="basic"`` (default) keeps every QuantizeLinear/DequantizeLinear pair as it is:
    the result follows the PyTorch model to float rounding. ``"all"`` lets onnxruntime fuse QDQ
    pairs into integer kernels; like torch.ao's x86 kernels, its uint8 x int8 kernels saturate on
    x86 CPUs without VNNI when activations use the full 8-bit range (export with
    :func:`qmamba_ao.export.x86_qconfig_mapping`'s 7-bit activations for those CPUs).

    ``float_bias=True`` turns off onnxruntime's ``WeightBiasQuantization`` pass, which rounds a
    float bias after QDQ weights to int32 with scale ``input_scale * weight_scale``: with 4-bit
    scales that rounding is coarse enough to change predictions, and PyTorch keeps the bias in float.
    """
    session = onnx_session(path, threads, optimization, float_bias)
    name = session.get_inputs()[0].name
    outs = [
        torch.from_numpy(session.run(None, {name: images[i : i + batch_size].numpy()})[0])
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outs)
