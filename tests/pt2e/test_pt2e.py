"""PT2E route: the exported scan, the frozen site quantizers as ops, agreement with the FX route,
the composable quantizer, the route switch and the missing-torchao error."""

from __future__ import annotations

import sys

import pytest
import torch

import qmamba_ao
from qmamba_ao import ptq
from qmamba_ao.observers import FrozenAffineQuant, FrozenLtSQ, FrozenTGQ
from qmamba_ao.pt2e.scan import exported_scan, scan_states
from qmamba_ao.ssm import SelectiveScan
from qmamba_ao.ssm.functional import selective_scan

pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e", reason="torchao is in the dev extra")

from qmamba_ao.pt2e import QMambaQuantizer, calibrate_pt2e, export_model, quantize_pt2e, site_qparams  # noqa: E402
from qmamba_ao.pt2e.observers import frozen_ops  # noqa: E402


def _scan_inputs(b: int = 2, d: int = 8, length: int = 7, n: int = 4, groups: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, d, length, generator=g),
        torch.randn(b, d, length, generator=g),
        torch.randn(b, groups, n, length, generator=g),
        torch.randn(b, groups, n, length, generator=g),
        torch.randn(b, d, length, generator=g),
    )


def test_exported_scan_computes_the_scan():
    scan = SelectiveScan(8, 4)
    u, delta, B, C, z = _scan_inputs()
    with torch.no_grad():
        want = scan(u, delta, B, C, z)
        got = exported_scan(u, delta, scan.A_log, B, C, scan.D, scan.delta_bias, True, z)
        ref = selective_scan(u, delta, -torch.exp(scan.A_log), B, C, scan.D, z, scan.delta_bias, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_scan_states_op_checks_shapes_and_exports_as_one_node():
    with pytest.raises(ValueError, match="one shape"):
        scan_states(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5))

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scan = SelectiveScan(8, 4)

        def forward(self, u, delta, B, C, z):
            return self.scan(u, delta, B, C, z)

    args = _scan_inputs()
    gm = torch.export.export(M().eval(), args).module()
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.ops.qmamba.scan_states.default) == 1
    sites = [(n.meta.get("custom") or {}).get("qmamba_site") for n in gm.graph.nodes]
    assert [s for s in sites if s] == ["u", "delta", "B", "C", "z", "dA", "dBu", "h", "y", "out"]


@pytest.mark.parametrize("kind", ["unit_power", "unit_log", "signed_power", "signed_log"])
def test_ltsq_ops_equal_the_frozen_module(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 5, 7, 4, generator=g) if kind.startswith("unit") else torch.randn(3, 5, 7, 4, generator=g)
    frozen = FrozenLtSQ(kind, 0.37, torch.tensor([0.043]), torch.tensor([3], dtype=torch.int32), 0, 15)
    assert torch.equal(frozen_ops(frozen, x, lambda name, t: t), frozen(x))


def test_affine_and_tgq_ops_equal_the_frozen_modules():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 9, 4, generator=g) * 3
    affine = FrozenAffineQuant(torch.tensor([0.21]), torch.tensor([7], dtype=torch.int32), 0, 15)
    assert torch.equal(frozen_ops(affine, x, lambda name, t: t), affine(x))
    scale = torch.tensor([0.05, 0.3, 0.11])
    zp = torch.tensor([2, 9, 5], dtype=torch.int32)
    index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    tgq = FrozenTGQ(scale, zp, index, 0, 15)
    per_step = torch.stack([tgq(x[:, :, t], t) for t in range(9)], dim=2)
    assert torch.equal(frozen_ops(tgq, x, lambda name, t: t), per_step)


@pytest.mark.parametrize("bits", [4, 8])
def test_pt2e_matches_fx_qparams_and_predictions(vim, images, bits):
    recipe = qmamba_ao.get_recipe("qmamba")
    calib, held_out = images[:2], images[2]
    model = recipe.rewrite(vim, calib)
    fx = ptq.prepare(model, (calib[0][:1],), recipe, bits, bits)
    ptq.calibrate(fx, calib, progress=False)
    prepared = pt2e.prepare_pt2e(export_model(model, (calib[0],)), QMambaQuantizer(recipe, bits, bits))
    calibrate_pt2e(prepared, calib, progress=False)
    fx_sites, pt_sites = site_qparams(fx), site_qparams(prepared)
    common = [k for k in pt_sites if k in fx_sites]
    assert len(common) >= 60  # 2 layers x 2 scans x (5 inputs + output + 4 sites) + linears and convs
    assert any(k.endswith(".dA") for k in common) and any(k.endswith(".h") for k in common)
    for k in common:
        assert fx_sites[k].keys() == pt_sites[k].keys(), k
        for name in fx_sites[k]:
            assert torch.equal(fx_sites[k][name], pt_sites[k][name]), (k, name)
    # labels only one route has: the same tensors named from the other side (see the README)
    assert all(k.startswith("output of patch_embed") for k in set(fx_sites) - set(pt_sites))
    assert not set(pt_sites) - set(fx_sites)
    with torch.no_grad():
        a = ptq.convert(fx, reference=True)(held_out)
        b = pt2e.convert_pt2e(prepared)(held_out)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    # The two graphs run the same ops in a different arrangement, so a value sitting on a rounding
    # boundary may land one level apart: at most one step of the 8-bit logits, in a few elements.
    step = float(fx_sites["output of head"]["scale"])
    diff = (a - b).abs()
    assert float(diff.max()) <= step * 1.001 and float((diff > 1e-5).float().mean()) <= 0.1, (diff.max(), step)


def test_vmamba_converts_and_agrees(vmamba, images):
    calib = images[:1]
    q_pt = ptq.quantize(vmamba, calib, "qmamba", 4, 4, route="pt2e", progress=False)
    q_fx = ptq.quantize(vmamba, calib, "qmamba", 4, 4, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(q_pt(images[2]), q_fx(images[2]), rtol=0, atol=1e-5)


def test_composes_with_x86_inductor_quantizer(vim, images):
    from torchao.quantization.pt2e.quantizer import ComposableQuantizer
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    x86 = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    quantizer = ComposableQuantizer([QMambaQuantizer("minmax", 8, 8, layers=False), x86])
    q = quantize_pt2e(vim, images[:1], "minmax", 8, 8, quantizer=quantizer, progress=False)
    targets = [str(n.target) for n in q.graph.nodes]
    assert any("quantize_per_tensor" in t for t in targets)  # the linears' int8 activations (x86)
    assert torch.ops.qmamba.scan_states.default in [n.target for n in q.graph.nodes]
    with torch.no_grad():
        out, ref = q(images[2]), vim(images[2])
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_errors():
    with pytest.raises(ValueError, match="h_feedback=True is not available on the PT2E route"):
        QMambaQuantizer("qmamba", 4, 4, h_feedback=True)
    with pytest.raises(ValueError, match="unknown recipe"):
        QMambaQuantizer("nope")
    with pytest.raises(ValueError, match="tgq_groups"):
        QMambaQuantizer("qmamba", 4, 4, tgq_groups=0)
    with pytest.raises(ValueError, match="route='pt2e'"):
        ptq.quantize(torch.nn.Linear(2, 2), [torch.zeros(1, 2)], route="pt2e", reference=False)
    with pytest.raises(ValueError, match="route="):
        ptq.quantize(torch.nn.Linear(2, 2), [torch.zeros(1, 2)], route="onnx")
    with pytest.raises(ValueError, match="calib_data is empty"):
        quantize_pt2e(torch.nn.Linear(2, 2), [], "minmax")


def test_without_torchao_pt2e_names_the_package_and_fx_still_works(monkeypatch, vim, images):
    for name in list(sys.modules):
        if name == "torchao" or name.startswith("torchao."):
            monkeypatch.setitem(sys.modules, name, None)  # import of any torchao module fails
    monkeypatch.setitem(sys.modules, "torchao", None)
    import qmamba_ao.pt2e as entry

    with pytest.raises(ImportError, match=r"pip install .*qmamba-ao\[pt2e\]"):
        entry.QMambaQuantizer  # noqa: B018
    with pytest.raises(ImportError, match="torchao"):
        ptq.quantize(vim, images[:1], "minmax", 8, 8, route="pt2e", progress=False)
    prepared = ptq.prepare(vim, (images[0][:1],), "minmax", 8, 8)  # the FX route needs no torchao
    assert ptq.observer_names(prepared)


def test_cli_quantize_route_pt2e(capsys, tmp_path):
    from qmamba_ao.cli import main

    assert main(["quantize", "--route", "pt2e", "--bits", "w8a8", "--calib-size", "8", "--eval-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "qmamba W8A8" in out and "agree %" in out
    target = tmp_path / "q.pt"
    assert main(["quantize", "--route", "pt2e", "--output", str(target), "--calib-size", "8"]) == 1
    assert "--output saves FX-route models" in capsys.readouterr().err
    assert not target.exists()
