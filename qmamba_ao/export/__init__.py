"""Deployment: exportable conversion, ONNX with QDQ nodes, torch.export, x86 lowering, packed weights.

Heavy optional dependencies (onnx, onnxscript, onnxruntime, safetensors) are imported only by the
functions that need them, with an error naming the install command when they are missing.
"""

from .convert import check_exportable, convert, quantize_for_export, reduce_range, x86_qconfig_mapping
from .onnx import DEFAULT_OPSET, SUPPORTED_OPSETS, OnnxExport, count_nodes, export_onnx, export_program, run_onnx
from .scan import ExportableScan, ExportError

__all__ = [
    "convert",
    "quantize_for_export",
    "check_exportable",
    "export_program",
    "export_onnx",
    "run_onnx",
    "count_nodes",
    "OnnxExport",
    "DEFAULT_OPSET",
    "SUPPORTED_OPSETS",
    "ExportableScan",
    "ExportError",
    "x86_qconfig_mapping",
    "reduce_range",
]
