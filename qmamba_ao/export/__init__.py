"""Deployment: exportable conversion, ONNX with QDQ nodes, torch.export, x86 lowering, packed weights.

Heavy optional dependencies (onnx, onnxscript, onnxruntime, safetensors) are imported only by the
functions that need them, with an error naming the install command when they are missing.
"""

from .exportable_scan import ExportableScan, ExportError
from .lowering import (
    check_exportable,
    float_exportable,
    quantize_for_export,
    reduce_range,
    to_exportable,
    x86_qconfig_mapping,
)
from .onnx import (
    DEFAULT_OPSET,
    SUPPORTED_OPSETS,
    OnnxExport,
    count_nodes,
    export_onnx,
    export_program,
    onnx_session,
    run_onnx,
)

__all__ = [
    "to_exportable",
    "float_exportable",
    "quantize_for_export",
    "check_exportable",
    "export_program",
    "export_onnx",
    "run_onnx",
    "onnx_session",
    "count_nodes",
    "OnnxExport",
    "DEFAULT_OPSET",
    "SUPPORTED_OPSETS",
    "ExportableScan",
    "ExportError",
    "x86_qconfig_mapping",
    "reduce_range",
]
