"""VMamba: checkpoint compatibility, numerical match with the official code, cross-scan order, FX and torch.ao."""

from __future__ import annotations

import copy
import math
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import qmamba_ao
import qmamba_ao.models  # noqa: F401  (registers the timm names)
from qmamba_ao.models import vmamba
from qmamba_ao.models.vmamba import VMAMBA_FMNIST_ARCH, VSSM, checkpoint_filter_fn, cross_merge, cross_scan
from qmamba_ao.ssm import ScanHooks, SelectiveScan, selective_scan_ref
from qmamba_ao.ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")

REDUCED = dict(dims=24, depths=[1, 1, 2, 1], num_classes=10)
SMALL = dict(dims=16, depths=[1, 1, 1, 1], num_classes=5)
TWO_STAGES = dict(dims=16, depths=[1, 1], num_classes=5)  # enough for the torch.ao flow, half the graph
VARIANTS = (
    "vmamba_tiny_s1l8",
    "vmamba_small_s1l20",
    "vmamba_base_s1l20",
    "vmamba_tiny_s2l5",
    "vmamba_small_s2l15",
    "vmamba_base_s2l15",
    "vanilla_vmamba_tiny",
    "vanilla_vmamba_small",
    "vanilla_vmamba_base",
)
SS2D_RENAMES = {
    "x_proj_weight": "x_proj.weight",
    "dt_projs_weight": "dt_proj.weight",
    "dt_projs_bias": "scan.delta_bias",
    "A_logs": "scan.A_log",
    "Ds": "scan.D",
}


@pytest.fixture(scope="module")
def reduced_model(vmamba_golden: dict[str, Any]) -> VSSM:
    model = timm.create_model("vmamba_tiny_s1l8", **REDUCED).eval()
    model.load_state_dict(checkpoint_filter_fn(vmamba_golden["state_dict"], model), strict=True)
    return model


# -- official checkpoints: names and shapes --------------------------------------------------------


@pytest.mark.parametrize(
    ("json_name", "model_name"),
    [
        ("vmamba_tiny_state_dict.json", "vmamba_tiny_s1l8"),
        ("vmamba_tiny_s2l5_state_dict.json", "vmamba_tiny_s2l5"),
        ("vmamba_tiny_v0_state_dict.json", "vanilla_vmamba_tiny"),
    ],
)
def test_official_state_dict_loads_strictly(
    golden_zeros: Callable[[str], dict[str, Tensor]], json_name: str, model_name: str
) -> None:
    sd = golden_zeros(json_name)
    model = timm.create_model(model_name)
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in sd.values())
    converted = checkpoint_filter_fn(sd, model)
    model.load_state_dict(converted, strict=True)
    for wrapped in ({"model": sd}, {"model_ema": sd, "epoch": 1}, {f"module.{k}": v for k, v in sd.items()}):
        assert checkpoint_filter_fn(wrapped, model).keys() == converted.keys()
    for official, ours in SS2D_RENAMES.items():
        assert f"layers.2.blocks.1.op.{ours}" in converted
        assert f"layers.2.blocks.1.op.{official}" not in converted


def test_legacy_key_names_load(vmamba_golden: dict[str, Any], reduced_model: VSSM) -> None:
    legacy_rules = (
        ("patch_embed.0.", "patch_embed.proj."),
        ("patch_embed.2.", "patch_embed.norm."),
        ("classifier.norm.", "norm."),
        ("classifier.head.", "head."),
    )
    legacy = {}
    for key, value in vmamba_golden["state_dict"].items():
        for new, old in legacy_rules:
            if key.startswith(new):
                key = old + key[len(new) :]
        key = key.replace(".blocks.0.norm.", ".blocks.0.ln_1.").replace(".blocks.0.op.", ".blocks.0.self_attention.")
        legacy[key] = value
    assert "layers.2.blocks.0.ln_1.weight" in legacy and "norm.weight" in legacy
    out = checkpoint_filter_fn({"model": legacy}, reduced_model)
    expected = checkpoint_filter_fn(vmamba_golden["state_dict"], reduced_model)
    assert out.keys() == expected.keys()
    for k in out:
        assert torch.equal(out[k], expected[k]), k


def test_prefers_model_over_model_ema(vmamba_golden: dict[str, Any], reduced_model: VSSM) -> None:
    sd = vmamba_golden["state_dict"]
    ema = {k: torch.zeros_like(v) for k, v in sd.items()}
    out = checkpoint_filter_fn({"model": sd, "model_ema": ema}, reduced_model)
    torch.testing.assert_close(out["classifier.head.weight"], sd["classifier.head.weight"])
    out = checkpoint_filter_fn({"model_ema": ema}, reduced_model)
    assert out["classifier.head.weight"].abs().sum() == 0


def test_filter_is_idempotent(vmamba: VSSM) -> None:
    sd = vmamba.state_dict()
    assert checkpoint_filter_fn(sd, vmamba).keys() == sd.keys()


# -- numerical match with the official model -------------------------------------------------------


@pytest.mark.parametrize(("inp", "out"), [("input", "logits"), ("input_nonsquare", "logits_nonsquare")])
def test_reduced_logits_match_official(reduced_model: VSSM, vmamba_golden: dict[str, Any], inp: str, out: str) -> None:
    assert vmamba_golden["config"]["forward_type"] == reduced_model.forward_type
    with torch.no_grad():
        logits = reduced_model(vmamba_golden[inp])
    torch.testing.assert_close(logits, vmamba_golden[out], rtol=1e-4, atol=1e-5)


def test_reduced_intermediates_match_official(reduced_model: VSSM, vmamba_golden: dict[str, Any]) -> None:
    got: dict[str, Tensor] = {}

    def keep(name: str):
        return lambda m, a, out: got.__setitem__(name, out.permute(0, 3, 1, 2))  # channel-first, as stored

    handles = [reduced_model.patch_embed.register_forward_hook(keep("patch_embed"))]
    for i, layer in enumerate(reduced_model.layers):
        handles.append(layer.blocks.register_forward_hook(keep(f"stage{i}_blocks")))
    head = reduced_model.classifier.head
    handles.append(head.register_forward_pre_hook(lambda m, a: got.__setitem__("features", a[0])))
    try:
        with torch.no_grad():
            reduced_model(vmamba_golden["input"])
    finally:
        for h in handles:
            h.remove()
    expected = vmamba_golden["intermediates"]
    assert set(got) == set(expected)
    for name, ref in expected.items():
        torch.testing.assert_close(got[name], ref, rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_reduced_scan_inputs_match_official(reduced_model: VSSM, vmamba_golden: dict[str, Any]) -> None:
    scan = reduced_model.layers[0].blocks[0].op.scan
    got: dict[str, Tensor] = {}

    def hook(m: SelectiveScan, args: tuple[Tensor, ...], out: Tensor) -> None:
        got.update(zip(("u", "delta", "B", "C"), args))
        got["out"] = out

    handle = scan.register_forward_hook(hook)
    try:
        with torch.no_grad():
            reduced_model(vmamba_golden["input"])
    finally:
        handle.remove()
    ref = vmamba_golden["scan_inputs_layer0_block0"]
    assert ref["delta_softplus"] is True and scan.delta_softplus
    for name in ("u", "delta", "B", "C", "out"):
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(-torch.exp(scan.A_log), ref["A"])
    torch.testing.assert_close(scan.D, ref["D"])
    torch.testing.assert_close(scan.delta_bias, ref["delta_bias"])


# -- cross-scan: one grouped scan, each direction in its own time order ---------------------------------


def test_cross_scan_puts_each_direction_in_its_own_time_order() -> None:
    h, w = 3, 5
    x = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w).repeat(1, 2, 1, 1)
    x[:, 1] += 100
    u = cross_scan(x).unflatten(1, (4, 2))  # (1, direction, channel, L)
    rows = x[0, 0].flatten()
    cols = x[0, 0].t().flatten()
    for k, seq in enumerate((rows, cols, rows.flip(0), cols.flip(0))):
        torch.testing.assert_close(u[0, k, 0], seq, rtol=0, atol=0)
        torch.testing.assert_close(u[0, k, 1], seq + 100, rtol=0, atol=0)
    torch.testing.assert_close(cross_merge(cross_scan(x), h, w), 4 * x.flatten(2), rtol=0, atol=0)


def test_grouped_scan_equals_four_independent_directional_scans() -> None:
    """Step t of the one grouped scan is step t of every direction: states never mix across groups."""
    torch.manual_seed(0)
    b, d, n, length = 2, 3, 2, 7
    u, delta = torch.randn(b, 4 * d, length), torch.randn(b, 4 * d, length)
    bb, cc = torch.randn(b, 4, n, length), torch.randn(b, 4, n, length)
    a = -torch.rand(4 * d, n) - 0.5
    dd = torch.randn(4 * d)
    steps: list[tuple[int, Tensor]] = []
    out = selective_scan_ref(u, delta, a, bb, cc, dd, delta_softplus=True)
    from qmamba_ao.ssm import selective_scan

    hooked = selective_scan(
        u, delta, a, bb, cc, dd, delta_softplus=True, hooks=ScanHooks(h=lambda s, t: steps.append((t, s)) or s)
    )
    torch.testing.assert_close(hooked, out)
    for k in range(4):
        sl = slice(k * d, (k + 1) * d)
        single = selective_scan_ref(
            u[:, sl], delta[:, sl], a[sl], bb[:, k : k + 1], cc[:, k : k + 1], dd[sl], delta_softplus=True
        )
        torch.testing.assert_close(out[:, sl], single)
    assert [t for t, _ in steps] == list(range(length))


def test_tgq_sees_every_direction_over_the_full_grid(vmamba: VSSM) -> None:
    prepared = qmamba_ao.prepare(vmamba, (torch.randn(1, 3, 32, 24),), recipe="qmamba")
    with torch.inference_mode():
        prepared(torch.randn(2, 3, 32, 24))
    observed = prepared.get_submodule("layers.0.blocks.0.op.scan")
    assert isinstance(observed, ObservedSelectiveScan) and observed.dim == 4 * 24
    assert observed.site_modules["h"].num_steps == 8 * 6  # L = H*W of the 8x6 grid, per direction


# -- FX --------------------------------------------------------------------------------------------


def test_fx_trace_with_scan_leaf(vmamba: VSSM, fx_trace: Callable) -> None:
    gm = fx_trace(vmamba)
    scans = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith(".op.scan")]
    assert len(scans) == sum(vmamba.depths)  # one leaf per block, all four directions inside
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for size in ((64, 64), (64, 48)):  # one graph for every input size
            x = torch.randn(1, 3, *size, generator=g)
            torch.testing.assert_close(gm(x), vmamba(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="in_chans=1"):
        gm(torch.randn(1, 1, 32, 32))  # the wrapped input check still runs in the traced graph


@pytest.mark.parametrize(("name", "size"), [("vanilla_vmamba_tiny", (36, 28)), ("vmamba_tiny_s2l5", (30, 17))])
def test_odd_grids_are_padded_like_the_official_model(name: str, size: tuple[int, int], fx_trace: Callable) -> None:
    model = timm.create_model(name, **SMALL).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        torch.testing.assert_close(fx_trace(model)(x), out, rtol=0, atol=0)
    assert out.shape == (1, 5)
    expected = (2, 1) if name.startswith("vanilla") else (1, 1)  # 9x7 -> 5x4 -> 3x2 -> 2x1; 8x5 -> ... -> 1x1
    assert feats.shape[1:3] == expected


def test_patch_merging_pads_odd_grid_at_the_end() -> None:
    merge = vmamba.PatchMerging2D(1, 2)
    x = torch.arange(1.0, 16.0).reshape(1, 3, 5, 1)
    merged = vmamba._merge_patches(x)
    assert merged.shape == (1, 2, 3, 4)
    torch.testing.assert_close(merged[0, 0, 0], torch.tensor([1.0, 6.0, 2.0, 7.0]))  # (0,0) (1,0) (0,1) (1,1)
    torch.testing.assert_close(merged[0, 1, 2], torch.tensor([15.0, 0.0, 0.0, 0.0]))  # zero padding
    assert merge(x).shape == (1, 2, 3, 2)


def test_input_sizes_the_official_model_cannot_take_raise() -> None:
    vanilla = timm.create_model("vanilla_vmamba_tiny", **SMALL).eval()
    with pytest.raises(ValueError, match=r"3x8 is too small"):
        vanilla(torch.randn(1, 3, 3, 8))  # the 4x4 stride-4 patch conv has no output
    with pytest.raises(ValueError, match="batch, channels, H, W"):
        vanilla(torch.randn(3, 32, 32))
    v2 = timm.create_model("vmamba_tiny_s1l8", **SMALL).eval()
    with torch.no_grad():
        assert v2(torch.randn(1, 3, 1, 1)).shape == (1, 5)  # padded 3x3 stride-2 convs accept any size


# -- training path -----------------------------------------------------------------------------------


def test_backward_reaches_every_parameter(fx_trace: Callable) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vmamba_fmnist", drop_path_rate=0.1).train()
    out = fx_trace(model)(torch.randn(4, 1, 28, 28))
    F.cross_entropy(out, torch.arange(4)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_grouped_scan_backward_matches_autograd_through_the_loop() -> None:
    torch.manual_seed(0)
    op = vmamba.SS2D(8, d_state=2, ssm_ratio=1.0).double()
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    fast = torch.autograd.grad(op(x).square().sum(), list(op.parameters()))
    original = op.scan.forward
    # A no-op hook forces the step loop, differentiated by plain autograd.
    op.scan.forward = lambda u, delta, b, c, z=None: op.scan.run(u, delta, b, c, z, ScanHooks(y=lambda t: t))
    try:
        slow = torch.autograd.grad(op(x).square().sum(), list(op.parameters()))
    finally:
        op.scan.forward = original
    for (name, _), a, b in zip(op.named_parameters(), fast, slow):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")


# -- torch.ao flow on every registered variant ------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_prepare_calibrate_convert(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, **TWO_STAGES).eval()
    images = [torch.randn(2, 3, 24, 20) for _ in range(3)]
    prepared = prepare_fx(
        copy.deepcopy(model),
        get_default_qconfig_mapping("x86"),
        (images[0],),
        prepare_custom_config=qmamba_ao.prepare_custom_config(model),
    )
    assert sum(isinstance(m, ObservedSelectiveScan) for m in prepared.modules()) == 2
    with torch.inference_mode():
        for x in images[:2]:
            prepared(x)
    quantized = convert_fx(prepared, convert_custom_config=qmamba_ao.convert_custom_config(prepared))
    assert sum(isinstance(m, QuantizedSelectiveScan) for m in quantized.modules()) == 2
    with torch.inference_mode():
        out, ref = quantized(images[2]), model(images[2])
    if out.is_quantized:
        out = out.dequantize()
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 1.0


@pytest.mark.parametrize("recipe", qmamba_ao.list_recipes())
def test_every_recipe_runs_on_vmamba(recipe: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vmamba_tiny_s1l8", **TWO_STAGES).eval()
    images = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    q = qmamba_ao.quantize(model, images[:1], recipe=recipe, w_bits=4, a_bits=8, progress=False)
    with torch.inference_mode():
        out = q(images[1])
    assert out.shape == (2, 5) and torch.isfinite(out).all()


# -- checkpoint errors ---------------------------------------------------------------------------------


def test_checkpoint_missing_and_unexpected_keys_raise(vmamba_golden: dict[str, Any], reduced_model: VSSM) -> None:
    sd = dict(vmamba_golden["state_dict"])
    del sd["layers.2.blocks.1.op.Ds"]
    sd["layers.2.blocks.1.op.x_proj_bias"] = torch.zeros(4, 8)
    with pytest.raises(ValueError) as info:
        checkpoint_filter_fn({"model": sd}, reduced_model)
    msg = str(info.value)
    assert "missing keys: 1 (layers.2.blocks.1.op.scan.D)" in msg
    assert "unexpected keys: 1 (layers.2.blocks.1.op.x_proj_bias)" in msg
    assert "dims=" in msg and "depths=" in msg


def test_checkpoint_of_another_config_raises(golden_zeros: Callable[[str], dict[str, Tensor]]) -> None:
    model = timm.create_model("vmamba_tiny_s1l8")
    with pytest.raises(ValueError) as info:
        checkpoint_filter_fn(golden_zeros("vmamba_tiny_v0_state_dict.json"), model)
    msg = str(info.value)
    assert "layers.0.downsample.reduction.weight" in msg and "layers.0.blocks.0.mlp.fc1.weight" in msg
    assert "x_proj.weight: checkpoint (152, 192, 1) (from layers.0.blocks.0.op.x_proj_weight (4, 38, 192))" in msg


def test_checkpoint_of_a_deeper_model_raises(vmamba_golden: dict[str, Any]) -> None:
    model = timm.create_model("vmamba_tiny_s1l8", dims=24, depths=[1, 1, 1, 1], num_classes=10)
    with pytest.raises(ValueError, match=r"unexpected keys: 18 \(layers\.2\.blocks\.1\.norm\.weight"):
        checkpoint_filter_fn(vmamba_golden["state_dict"], model)


def test_channel_first_conv_weights_raise(vmamba_golden: dict[str, Any], reduced_model: VSSM) -> None:
    sd = {
        k: (v[:, :, None, None] if k.endswith(("in_proj.weight", "fc1.weight")) else v)
        for k, v in vmamba_golden["state_dict"].items()
    }
    with pytest.raises(ValueError, match=r"shape mismatches: 10 \(layers\.0\.blocks\.0\.op\.in_proj\.weight") as info:
        checkpoint_filter_fn(sd, reduced_model)
    assert "1x1 convolutions" in str(info.value)


def test_classifier_dropped_when_num_classes_changed(vmamba_golden: dict[str, Any]) -> None:
    model = timm.create_model("vmamba_tiny_s1l8", dims=24, depths=[1, 1, 2, 1], num_classes=7)
    with pytest.warns(UserWarning, match="classifier"):
        out = checkpoint_filter_fn(vmamba_golden["state_dict"], model)
    result = model.load_state_dict(out, strict=False)
    assert set(result.missing_keys) == {"classifier.head.weight", "classifier.head.bias"}
    assert not result.unexpected_keys


def test_pos_embed_is_resampled_and_checked() -> None:
    src = timm.create_model("vmamba_tiny_s1l8", posembed=True, imgsize=64, **SMALL)
    model = timm.create_model("vmamba_tiny_s1l8", posembed=True, imgsize=32, **SMALL).eval()
    with pytest.warns(UserWarning, match=r"Resampling pos_embed from \(16, 16\) to \(8, 8\)"):
        out = checkpoint_filter_fn(src.state_dict(), model)
    model.load_state_dict(out, strict=True)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match="position embedding"):
        model(torch.randn(1, 3, 48, 32))


# -- timm registry, overrides and initialisation ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides", "grid"),
    [
        ("vmamba_small_s1l20", dict(dims=16, depths=[1, 1, 1, 1], num_classes=3, in_chans=1), (1, 1)),
        ("vanilla_vmamba_base", dict(dims=[8, 16, 24], depths=[1, 1, 1], num_classes=3, in_chans=1), (2, 2)),
        ("vmamba_base_s2l15", dict(dims=8, depths=[1, 2], num_classes=3, norm_layer="ln"), (4, 4)),
    ],
)
def test_timm_overrides_forward(
    name: str, overrides: dict[str, Any], grid: tuple[int, int], fx_trace: Callable
) -> None:
    model = timm.create_model(name, **overrides).eval()
    x = torch.randn(2, overrides.get("in_chans", 3), 32, 32)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    assert out.shape == (2, 3)
    assert feats.shape == (2, *grid, model.num_features)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    torch.testing.assert_close(fx_trace(model)(x), out)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_registered_configs() -> None:
    expected = {
        "vmamba_small_s1l20": (96, [2, 2, 20, 2], 1, 96),
        "vmamba_base_s1l20": (128, [2, 2, 20, 2], 1, 128),
        "vmamba_small_s2l15": (96, [2, 2, 15, 2], 1, 192),
        "vmamba_base_s2l15": (128, [2, 2, 15, 2], 1, 256),
        "vanilla_vmamba_small": (96, [2, 2, 27, 2], 16, 192),
        "vanilla_vmamba_base": (128, [2, 2, 27, 2], 16, 256),
    }
    for name, (dim, depths, d_state, d_inner) in expected.items():
        # The first stage at full width, and full depths at a tiny width, keep this cheap.
        model = timm.create_model(name, depths=[1])
        op = model.layers[0].blocks[0].op
        assert (model.dims[0], op.d_state, op.d_inner, op.dt_rank) == (dim, d_state, d_inner, math.ceil(dim / 16))
        assert model.pretrained_cfg["tag"] == "in1k" and model.num_classes == 1000 and model.in_chans == 3
        narrow = timm.create_model(name, dims=4)
        assert [len(layer.blocks) for layer in narrow.layers] == depths


def test_pretrained_without_weights_fails_clearly() -> None:
    with pytest.raises(ValueError, match="pretrained_cfg_overlay"):
        timm.create_model("vmamba_tiny_s1l8", pretrained=True)
    with pytest.raises(FileNotFoundError, match="not installed"):
        timm.create_model("vmamba_fmnist", pretrained=True, pretrained_cfg_overlay=dict(file="/nonexistent/x.pth"))


def test_pretrained_from_a_file(tmp_path: Path, vmamba_golden: dict[str, Any]) -> None:
    path = tmp_path / "ckpt.pth"
    ema = {k: torch.zeros_like(v) for k, v in vmamba_golden["state_dict"].items()}
    torch.save({"model": vmamba_golden["state_dict"], "model_ema": ema, "epoch": 3}, path)
    model = timm.create_model(
        "vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **REDUCED
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(vmamba_golden["input"]), vmamba_golden["logits"], rtol=1e-4, atol=1e-5)


def test_pretrained_file_with_pickled_objects_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {}, "config": types.SimpleNamespace(lr=1.0)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        timm.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)


def test_fmnist_architecture() -> None:
    model = timm.create_model("vmamba_fmnist").eval()
    assert model.pretrained_cfg["file"] == str(vmamba.FMNIST_WEIGHTS)
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert model.in_chans == VMAMBA_FMNIST_ARCH["in_chans"] == 1 and model.num_classes == 10
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_packaged_fmnist_weights_are_trained() -> None:
    from qmamba_ao.data import load_split

    trained = timm.create_model("vmamba_fmnist", pretrained=True).eval()
    x, y = load_split("fashion-mnist", "test", 500)
    with torch.inference_mode():
        acc = (trained(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.85  # 89.25 % on the full test set (training log in qmamba_ao/weights/vmamba_fmnist.json)


def test_init_is_deterministic_and_official() -> None:
    torch.manual_seed(0)
    a = timm.create_model("vmamba_tiny_s1l8", **SMALL)
    torch.manual_seed(0)
    b = timm.create_model("vmamba_tiny_s1l8", **SMALL)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    op = a.layers[1].blocks[0].op
    assert torch.all(op.scan.A_log == 0)  # N = 1: A = -1 for every channel of every direction
    assert torch.all(op.scan.D == 1)
    step = F.softplus(op.scan.delta_bias)
    assert step.min() >= 1e-4 - 1e-7 and step.max() <= 0.1 + 1e-6
    assert op.dt_proj.weight.abs().max() <= op.dt_rank**-0.5
    assert op.x_proj.weight.abs().max() <= 1 / math.sqrt(op.d_inner)
    assert op.in_proj.weight.std() < 0.03 and torch.all(a.classifier.head.bias == 0)
    assert torch.all(a.layers[0].blocks[0].mlp.fc1.bias == 0) and torch.all(op.out_norm.weight == 1)
    vanilla = timm.create_model("vanilla_vmamba_tiny", **SMALL).layers[0].blocks[0].op
    torch.testing.assert_close(vanilla.scan.A_log[5], torch.log(torch.arange(1.0, 17.0)))


def test_unsupported_options_raise() -> None:
    with pytest.raises(ValueError, match="forward_type 'v052d'"):
        timm.create_model("vmamba_tiny_s1l8", forward_type="v052d", **SMALL)
    with pytest.raises(ValueError, match="norm_layer"):
        timm.create_model("vmamba_tiny_s1l8", norm_layer="bn", **SMALL)
    with pytest.raises(ValueError, match="same non-zero length"):
        timm.create_model("vmamba_tiny_s1l8", depths=[1, 1, 1, 1], dims=[8, 16])
    gated = timm.create_model("vmamba_tiny_s1l8", forward_type="v2", **SMALL).layers[0].blocks[0].op
    assert gated.gate and gated.in_proj.out_features == 2 * gated.d_inner


def test_checkpoint_filter_looks_up_the_vmamba_converter(vmamba_golden: dict[str, Any], reduced_model: VSSM) -> None:
    from qmamba_ao.models import checkpoint_filter

    convert = checkpoint_filter(reduced_model)
    assert convert is checkpoint_filter_fn
    out = convert({"model": vmamba_golden["state_dict"]}, reduced_model)
    assert out.keys() == reduced_model.state_dict().keys()
