"""Exportable conversion, torch.export, ONNX (run in onnxruntime) and bad input, on a tiny mixer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from toy_models import TinyMixer

from qmamba_ao import ptq
from qmamba_ao.export import (
    ExportError,
    check_exportable,
    export_onnx,
    export_program,
    float_exportable,
    onnx_session,
    quantize_for_export,
    run_onnx,
    to_exportable,
)
from qmamba_ao.export.exportable_scan import ExportableScan
from qmamba_ao.recipes import get_recipe

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


def _calibrated(w_bits: int, a_bits: int, recipe: str = "qmamba") -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = TinyMixer().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 12, 16, generator=g) for _ in range(3)]
    prepared = ptq.prepare(model, (batches[0],), recipe, w_bits, a_bits)
    ptq.calibrate(prepared, batches, progress=False)
    return prepared


@pytest.fixture(scope="module")
def prepared44():
    return _calibrated(4, 4)


@pytest.fixture(scope="module")
def prepared88():
    return _calibrated(8, 8)


@pytest.fixture(scope="module")
def x():
    return torch.randn(6, 12, 16, generator=torch.Generator().manual_seed(2))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_convert_swaps_scans_and_matches_the_simulated_model_at_8_bits(prepared88, x):
    exportable = to_exportable(prepared88)
    assert any(isinstance(m, ExportableScan) for m in exportable.modules())
    simulated = ptq.convert(copy.deepcopy(prepared88), reference=True)
    with torch.no_grad():
        assert _rel(exportable(x), simulated(x)) < 0.02
    check_exportable(exportable)  # no error


def test_narrow_ranges_are_enforced_in_pytorch(prepared44, x):
    """A 4-bit activation keeps at most 16 levels (the quint8 reference model can exceed them)."""
    exportable = to_exportable(prepared44)
    scan = next(m for m in exportable.modules() if isinstance(m, ExportableScan))
    assert scan.output is not None and scan.output.quant_max == 15
    with torch.no_grad():
        y = scan.output(torch.linspace(-100, 100, 1000))
    assert y.unique().numel() <= 16


def test_torch_export_with_a_dynamic_batch(prepared44, x):
    exportable = to_exportable(prepared44)
    program = export_program(exportable, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), exportable(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h_feedback", [False, True])
def test_scan_op_and_unrolled_loop_agree(h_feedback, x):
    torch.manual_seed(0)
    model = TinyMixer().eval()
    prepared = ptq.prepare(model, (x[:2],), "qmamba", 4, 4, h_feedback=h_feedback)
    ptq.calibrate(prepared, [x[:3], x[3:]], progress=False)
    with torch.no_grad():
        torch.testing.assert_close(to_exportable(prepared, "scan")(x), to_exportable(prepared, "unroll")(x))


@pytest.mark.parametrize("bits, recurrence", [(4, "scan"), (8, "unroll")])
def test_onnx_runs_in_onnxruntime_like_pytorch(bits, recurrence, prepared44, prepared88, x, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    exportable = to_exportable(prepared44 if bits == 4 else prepared88, recurrence)
    info = export_onnx(exportable, x[:2], tmp_path / "m.onnx")
    assert info.op_counts["QuantizeLinear"] > 0 and info.op_counts["DequantizeLinear"] > 0
    assert info.op_counts.get("Scan", 0) == (1 if recurrence == "scan" else 0)
    with torch.no_grad():
        expected = exportable(x)
    got = run_onnx(info.path, x)
    # Same grid, float rounding apart: at most a few values one quantization step away.
    assert _rel(got, expected) < 0.02
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    model = onnx.load(str(info.path))
    inits = {t.name: t for t in model.graph.initializer}
    per_axis = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[1] in inits and len(inits[n.input[1]].dims) == 1
    ]
    assert per_axis, "weights should be dequantized per output channel"
    if bits == 4:
        assert info.op_counts.get("Clip", 0) > 0  # the narrow range survives the export


def test_sub_8_bit_quantize_clips_in_onnxruntime(tmp_path):
    """The exporter's own QuantizeLinear would keep 0..255; the 4-bit range must be enforced."""
    pytest.importorskip("onnxruntime")
    qd = torch.ops.quantized_decomposed

    class Q4(nn.Module):
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            q = qd.quantize_per_tensor.default(v, 0.5, 3, 0, 15, torch.uint8)
            return qd.dequantize_per_tensor.default(q, 0.5, 3, 0, 15, torch.uint8)

    gm = torch.fx.symbolic_trace(Q4())
    v = torch.linspace(-10, 20, 61).reshape(1, 61)
    info = export_onnx(gm, v, tmp_path / "q4.onnx", dynamic_batch=False)
    got = run_onnx(info.path, v)
    torch.testing.assert_close(got, gm(v))
    assert got.max().item() == pytest.approx(0.5 * (15 - 3)) and got.min().item() == pytest.approx(-1.5)


def test_bad_input_names_the_fix(prepared44, x, tmp_path, monkeypatch):
    float_model = TinyMixer().eval()
    with pytest.raises(ExportError, match="float model|not a quantized model"):
        export_onnx(float_model, x, tmp_path / "f.onnx")
    with pytest.raises(ExportError, match="prepared but not converted"):
        export_onnx(prepared44, x, tmp_path / "p.onnx")
    simulated = ptq.convert(copy.deepcopy(prepared44), reference=True)
    with pytest.raises(ExportError, match=r"qmamba_ao\.export\.to_exportable\(prepared\)"):
        export_program(simulated, x)
    exportable = to_exportable(prepared44)
    with pytest.raises(ExportError, match="opset 11 is not supported"):
        export_onnx(exportable, x, tmp_path / "o.onnx", opset=11)
    with pytest.raises(ExportError, match="needs a calibrated model"):
        to_exportable(float_model)

    import qmamba_ao.export.onnx as onnx_mod

    real = onnx_mod.importlib.util.find_spec
    monkeypatch.setattr(onnx_mod.importlib.util, "find_spec", lambda n: None if n == "onnx" else real(n))
    with pytest.raises(ImportError, match=r"pip install 'qmamba-ao\[export\]'"):
        export_onnx(exportable, x, tmp_path / "m.onnx")


@pytest.mark.parametrize("recurrence", ["scan", "unroll"])
def test_float_baseline_exports_and_runs_like_the_float_model(recurrence, x, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = TinyMixer().eval()
    baseline = float_exportable(model, recurrence)
    scans = [m for m in baseline.modules() if isinstance(m, ExportableScan)]
    assert scans and all(len(m.sites) == 0 and m.output is None for m in scans)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(baseline(x), expected, rtol=1e-5, atol=1e-6)
    info = export_onnx(baseline, x[:2], tmp_path / "f.onnx")
    assert info.op_counts.get("QuantizeLinear", 0) == 0
    assert info.op_counts.get("Scan", 0) == (len(scans) if recurrence == "scan" else 0)
    session = onnx_session(info.path, threads=1, optimization="all")
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_float_baseline_refuses_quantized_and_scanless_models(prepared44):
    with pytest.raises(ExportError, match="takes a float model"):
        float_exportable(prepared44)
    with pytest.raises(ExportError, match="holds no SelectiveScan"):
        float_exportable(nn.Linear(3, 3))
    with pytest.raises(ExportError, match="float_exportable"):
        check_exportable(TinyMixer().eval())


def test_quantize_for_export_matches_the_step_by_step_calls(x):
    torch.manual_seed(0)
    model = TinyMixer().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 12, 16, generator=g) for _ in range(3)]
    q = quantize_for_export(model, batches, "qmamba", 4, 4, progress=False)
    smoothed = get_recipe("qmamba").rewrite(model, batches)  # the recipe's float-equivalent rewrite
    prepared = ptq.prepare(smoothed, (batches[0],), "qmamba", 4, 4)
    ptq.calibrate(prepared, batches, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(q(x), to_exportable(prepared)(x))
