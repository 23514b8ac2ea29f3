"""Block-wise reconstruction: units, learning, where the learned values end, determinism, bad options."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qmamba_ao
from qmamba_ao import api
from qmamba_ao.cli import main
from qmamba_ao.observers import FrozenLtSQ, FrozenTGQ
from qmamba_ao.observers.learned import FixedQParamsObserver, FixedSite, learnable_fake_quantize
from qmamba_ao.ptq import convert, evaluate, prepare_calibrated
from qmamba_ao.reconstruct import _units, reconstruct

ITERS = 6


@pytest.fixture(scope="module")
def calibrated(vim, images):
    return prepare_calibrated(vim, images[:2], "qmamba", 4, 4, progress=False)


@pytest.fixture(scope="module")
def reconstructed(calibrated, images):
    prepared = copy.deepcopy(calibrated)
    report = reconstruct(prepared, images[:2], iters=ITERS, progress=False)
    return prepared, report


def test_lsq_gradients():
    x = torch.tensor([0.26, -0.4, 3.0])  # in range, in range, clipped above
    s = torch.tensor([0.5], requires_grad=True)
    z = torch.tensor([2])
    y = learnable_fake_quantize(x.requires_grad_(), s, z, 0, 7)
    assert torch.allclose(y, torch.tensor([0.5, -0.5, 2.5]))
    y.sum().backward()
    # LSQ: round(x/s) - x/s inside the range, quant_max - z when clipped above; x passes 1 / 0.
    assert torch.allclose(s.grad, torch.tensor([(1 - 0.52) + (-1 + 0.8) + (7 - 2)]))
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))


def test_units_follow_the_blocks(calibrated, vmamba, images):
    names = [u.name for u in _units(calibrated)]
    assert names[1:-1] == ["layers.0", "layers.1"]  # patch embedding first, the head last
    assert names[0].startswith("patch_embed") and "head" in names[-1]
    p = prepare_calibrated(vmamba, images[:1], "qmamba", 4, 4, progress=False)
    blocks = [u.name for u in _units(p) if ".blocks." in u.name]
    assert blocks == [f"layers.{i}.blocks.{j}" for i, n in enumerate((1, 1, 2, 1)) for j in range(n)]


def test_reconstruction_lowers_every_unit_loss(reconstructed):
    _, report = reconstructed
    learned = [(n, b, a) for n, p, b, a in report.units if p > 0]
    assert len(learned) == len(report.units)
    for name, before, after in learned:
        if name.startswith("layers."):  # the blocks (the ends have losses of 1e-4 and below: noise)
            assert after < before, name
    assert sum(a for _, _, a in learned) < sum(b for _, b, _ in learned)
    assert "layers.1" in report.table()


def test_learned_values_end_in_observers_and_converted_model(reconstructed, calibrated, images):
    prepared, _ = reconstructed
    fixed = [m for m in prepared.modules() if isinstance(m, FixedQParamsObserver)]
    sites = [m for m in prepared.modules() if isinstance(m, FixedSite)]
    assert fixed and len(sites) == 4 * 4  # 2 blocks x 2 scans x (dA, dBu, h, y)
    assert {type(s.quantizer) for s in sites} >= {FrozenLtSQ, FrozenTGQ}
    w = prepared.get_submodule("layers.0.mixer.in_proj.linear").qconfig.weight()
    assert (
        isinstance(w, FixedQParamsObserver)
        and w.scale.numel() == prepared.get_submodule("layers.0.mixer.in_proj.linear").out_features
    )
    q0, q1 = convert(copy.deepcopy(calibrated), reference=True), convert(copy.deepcopy(prepared), reference=True)
    x = images[2]
    assert not torch.equal(q0(x), q1(x))
    # the converted reference model carries the learned weight scales
    learned = prepared.get_submodule("layers.0.mixer.in_proj.linear").qconfig.weight().scale
    assert torch.allclose(q1.get_submodule("layers.0.mixer.in_proj.linear").weight_scale.float(), learned)
    # a state-dict round trip into the calibrated skeleton reproduces the reconstructed model
    skeleton = convert(copy.deepcopy(calibrated), reference=True)
    skeleton.load_state_dict(q1.state_dict())
    assert torch.equal(skeleton(x), q1(x))


def test_same_seed_same_result(calibrated, reconstructed, images):
    again = copy.deepcopy(calibrated)
    reconstruct(again, images[:2], iters=ITERS, progress=False)
    a = convert(again, reference=True).state_dict()
    b = convert(copy.deepcopy(reconstructed[0]), reference=True).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_reconstruction_helps_a_trained_model():
    model = api.build_model("vim_fmnist")
    calib, _ = api.load_images("fashion-mnist", "train", 64, 0, model)
    xe, ye = api.load_images("fashion-mnist", "test", 300, 0, model)
    batches = list(calib.split(32))
    prepared = prepare_calibrated(model, batches, "qmamba", 4, 4, progress=False)
    base = evaluate(convert(copy.deepcopy(prepared), reference=True), xe, ye, progress=False)["top1"]
    report = reconstruct(prepared, batches, iters=40, progress=False)
    learned = evaluate(convert(prepared, reference=True), xe, ye, progress=False)["top1"]
    assert sum(a for *_, a in report.units) < sum(b for _, _, b, _ in report.units)
    assert learned > base, (base, learned)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"iters": -1}, "iters=-1"),
        ({"iters": 2.5}, "iters=2.5"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"drop": 1.0}, "drop=1.0"),
    ],
)
def test_bad_options(calibrated, images, kwargs, message):
    prepared = copy.deepcopy(calibrated)
    with pytest.raises(ValueError, match=message):
        reconstruct(prepared, images[:1], progress=False, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        reconstruct(prepared, [], progress=False)
    with pytest.raises(TypeError, match="prepared model"):
        reconstruct(nn.Linear(2, 2), images[:1])


def test_quantize_takes_reconstruct(vim, images):
    with pytest.raises(ValueError, match="unknown reconstruction option"):
        qmamba_ao.quantize(vim, images[:1], "qmamba", 4, 4, reconstruct={"iter": 3}, progress=False)
    with pytest.raises(ValueError, match="use True, False or a dict"):
        qmamba_ao.quantize(vim, images[:1], "qmamba", 4, 4, reconstruct="yes", progress=False)
    with pytest.raises(ValueError, match="PT2E route"):
        qmamba_ao.quantize(vim, images[:1], "qmamba", 4, 4, route="pt2e", reconstruct=True, progress=False)
    q = qmamba_ao.quantize(vim, images[:1], "minmax", 4, 4, reconstruct={"iters": 2}, progress=False)
    assert torch.isfinite(q(images[2])).all()


def test_cli_reconstruct(capsys, tmp_path):
    out = tmp_path / "q.pt"
    args = ["--calib-size", "32", "--eval-size", "32", "--reconstruct", "--reconstruct-iters", "2"]
    assert main(["quantize", *args, "--bits", "w4a4", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "qmamba + reconstruction W4A4" in text
    quantized, record = api.load_quantized(out)
    assert "reconstruct" not in record["options"]
    xe, ye = api.load_images("fashion-mnist", "test", 32, 0, quantized)
    top1 = evaluate(quantized, xe, ye, progress=False)["top1"]
    assert f"{top1:.2f}" in text
    assert main(["compare", "--reconstruct-iters", "3", "--recipes", "minmax", "--bits", "w8a8"]) == 1
    assert "add --reconstruct" in capsys.readouterr().err
    assert main(["quantize", "--reconstruct", "--route", "pt2e"]) == 1
    assert "FX route" in capsys.readouterr().err


def test_learned_smoothing_is_folded(calibrated, images):
    """smoothing=True (PTQ4VM's JLSS): the learned factors move into the float scaling and the weights,
    so the prepared model still computes the float function."""
    prepared = copy.deepcopy(calibrated)
    x = images[2]
    before = prepared(x)
    scale0 = prepared.get_submodule("layers.0.mixer.in_proj.scale").scale.clone()
    reconstruct(prepared, images[:2], iters=4, smoothing=True, progress=False)
    scale1 = prepared.get_submodule("layers.0.mixer.in_proj.scale").scale
    assert not torch.equal(scale0, scale1)
    assert torch.allclose(prepared(x), before, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(convert(prepared, reference=True)(x)).all()


def test_reconstructed_model_lowers_and_exports(vim, images, tmp_path):
    """The learned qparams live in ordinary observers: convert_fx lowers the model to the x86 kernels, and
    the exportable conversion runs in onnxruntime like PyTorch."""
    pytest.importorskip("onnxruntime")
    from qmamba_ao.export import export_onnx, run_onnx, to_exportable

    x = images[2]
    prepared = prepare_calibrated(vim, images[:2], "percentile", 8, 8, progress=False)
    reference = copy.deepcopy(prepared)
    reconstruct(prepared, images[:2], iters=4, progress=False)
    lowered = convert(copy.deepcopy(prepared), reference=False)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized.modules") for m in lowered.modules())
    simulated = convert(copy.deepcopy(prepared), reference=True)
    with torch.no_grad():
        a, b = lowered(x), simulated(x)
    assert ((a - b).norm() / b.norm()).item() < 0.05
    assert not torch.equal(b, convert(reference, reference=True)(x))  # the learned values are in use
    exportable = to_exportable(prepared)
    info = export_onnx(exportable, x[:2], tmp_path / "rec.onnx")
    with torch.no_grad():
        expected = exportable(x)
    got = run_onnx(info.path, x)
    # Same grids; onnxruntime divides by the scale where torch multiplies by its inverse, so a value on a
    # rounding boundary may land one level apart and move a few 8-bit logits by a step or two.
    assert ((got - expected).norm() / expected.norm()).item() < 0.05
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75
