"""Vision Mamba: checkpoint compatibility, numerical match with the official code, FX tracing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qmamba_ao.models  # noqa: F401  (registers the timm names)
from qmamba_ao.models.vim import VisionMamba, checkpoint_filter_fn
from qmamba_ao.ssm import SelectiveScan

REDUCED = dict(img_size=64, depth=2, num_classes=10)
SCAN_PARAM_RENAMES = {
    "A_log": "scan.A_log",
    "D": "scan.D",
    "dt_proj.bias": "scan.delta_bias",
    "A_b_log": "scan_b.A_log",
    "D_b": "scan_b.D",
    "dt_proj_b.bias": "scan_b.delta_bias",
}


def tiny_model(**kwargs: Any) -> VisionMamba:
    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_classes=5)
    args.update(kwargs)
    return timm.create_model("vim_tiny_patch16_224", **args)


@pytest.fixture(scope="module")
def reduced_model(vim_golden: dict[str, Any]) -> VisionMamba:
    model = timm.create_model("vim_tiny_patch16_224", **REDUCED).eval()
    model.load_state_dict(checkpoint_filter_fn(vim_golden["state_dict"], model), strict=True)
    return model


# -- official checkpoints: names and shapes --------------------------------------------------------


@pytest.mark.parametrize(
    ("json_name", "model_name", "alias"),
    [
        (
            "vim_tiny_state_dict.json",
            "vim_tiny_patch16_224",
            "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
        ),
        (
            "vim_small_state_dict.json",
            "vim_small_patch16_224",
            "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
        ),
    ],
)
def test_official_state_dict_loads_strictly(
    golden_zeros: Callable[[str], dict[str, Tensor]], json_name: str, model_name: str, alias: str
) -> None:
    sd = golden_zeros(json_name)
    model = timm.create_model(model_name)
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in sd.values())
    converted = checkpoint_filter_fn(sd, model)
    model.load_state_dict(converted, strict=True)
    # Training-checkpoint wrappers and a DDP prefix give the same result.
    for wrapped in ({"model": sd}, {"model_ema": sd}, {f"module.{k}": v for k, v in sd.items()}):
        assert checkpoint_filter_fn(wrapped, model).keys() == converted.keys()
    # The official long name builds the same architecture.
    shapes = {k: v.shape for k, v in timm.create_model(model_name, depth=2).state_dict().items()}
    assert {k: v.shape for k, v in timm.create_model(alias, depth=2).state_dict().items()} == shapes
    # Every official tensor lands on the renamed key.
    for official, ours in SCAN_PARAM_RENAMES.items():
        assert f"layers.3.mixer.{ours}" in converted
        assert f"layers.3.mixer.{official}" not in converted


def test_prefers_model_over_model_ema(vim_golden: dict[str, Any]) -> None:
    model = timm.create_model("vim_tiny_patch16_224", **REDUCED)
    sd = vim_golden["state_dict"]
    ema = {k: torch.zeros_like(v) for k, v in sd.items()}
    out = checkpoint_filter_fn({"model": sd, "model_ema": ema, "epoch": 3}, model)
    torch.testing.assert_close(out["head.weight"], sd["head.weight"])
    out = checkpoint_filter_fn({"model_ema": ema, "epoch": 3}, model)
    assert out["head.weight"].abs().sum() == 0


def test_filter_is_idempotent(vim: VisionMamba) -> None:
    sd = vim.state_dict()
    out = checkpoint_filter_fn(sd, vim)
    assert out.keys() == sd.keys()


def test_full_size_configs() -> None:
    plus = timm.create_model("vim_tiny_patch16_stride8_224", depth=1)
    assert plus.patch_embed.grid_size == (27, 27)
    assert plus.num_tokens == 730 and plus.cls_index == 364
    assert plus.pos_embed.shape == (1, 730, 192)
    base = timm.create_model(
        "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2", depth=1
    )
    mixer = base.layers[0].mixer
    assert (mixer.d_inner, mixer.dt_rank, mixer.x_proj.out_features) == (1536, 48, 48 + 32)
    small_plus = timm.create_model(
        "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2", depth=1
    )
    assert small_plus.pos_embed.shape == (1, 730, 384)


# -- numerical match with the official model -------------------------------------------------------


def test_reduced_logits_match_official(reduced_model: VisionMamba, vim_golden: dict[str, Any]) -> None:
    assert vim_golden["config"]["embed_dim"] == reduced_model.embed_dim
    with torch.no_grad():
        logits = reduced_model(vim_golden["input"])
    torch.testing.assert_close(logits, vim_golden["logits"], rtol=1e-4, atol=1e-5)


def test_reduced_intermediates_match_official(reduced_model: VisionMamba, vim_golden: dict[str, Any]) -> None:
    got: dict[str, Tensor] = {}
    handles = [reduced_model.pos_drop.register_forward_hook(lambda m, a, out: got.__setitem__("tokens", out))]
    for i, layer in enumerate(reduced_model.layers):

        def hook(m: nn.Module, args: Any, out: tuple[Tensor, Tensor], i: int = i) -> None:
            got[f"layer{i}_hidden"], got[f"layer{i}_residual"] = out

        handles.append(layer.register_forward_hook(hook))
    handles.append(reduced_model.head.register_forward_pre_hook(lambda m, a: got.__setitem__("features", a[0])))
    try:
        with torch.no_grad():
            reduced_model(vim_golden["input"])
    finally:
        for h in handles:
            h.remove()
    expected = vim_golden["intermediates"]
    assert set(got) == set(expected)
    for name, ref in expected.items():
        torch.testing.assert_close(got[name], ref, rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_reduced_scan_inputs_match_official(reduced_model: VisionMamba, vim_golden: dict[str, Any]) -> None:
    mixer = reduced_model.layers[0].mixer
    got: dict[str, dict[str, Tensor]] = {}

    def capture(direction: str):
        def hook(m: SelectiveScan, args: tuple[Tensor, ...], out: Tensor) -> None:
            u, delta, b, c, z = args
            got[direction] = dict(u=u, delta=delta, B=b, C=c, z=z, out_z=out)

        return hook

    handles = [
        mixer.scan.register_forward_hook(capture("forward")),
        mixer.scan_b.register_forward_hook(capture("backward")),
    ]
    try:
        with torch.no_grad():
            reduced_model(vim_golden["input"])
    finally:
        for h in handles:
            h.remove()
    for direction, scan in (("forward", mixer.scan), ("backward", mixer.scan_b)):
        ref = vim_golden["scan_inputs_layer0"][direction]
        assert ref["delta_softplus"] is True and scan.delta_softplus
        for name in ("u", "delta", "B", "C", "z", "out_z"):
            torch.testing.assert_close(
                got[direction][name], ref[name], rtol=0, atol=1e-4, msg=lambda m, n=f"{direction}.{name}": f"{n}: {m}"
            )
        torch.testing.assert_close(-torch.exp(scan.A_log), ref["A"])
        torch.testing.assert_close(scan.D, ref["D"])
        torch.testing.assert_close(scan.delta_bias, ref["delta_bias"])


# -- FX ----------------------------------------------------------------------------------------------


def test_fx_trace_with_scan_leaf(vim: VisionMamba, images: list[Tensor], fx_trace: Callable) -> None:
    gm = fx_trace(vim)
    scan_calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith(("scan", "scan_b"))]
    assert len(scan_calls) == 2 * len(vim.layers)
    with torch.no_grad():
        torch.testing.assert_close(gm(images[0]), vim(images[0]), rtol=0, atol=0)
    # The input check is a wrapped call: it still runs in the traced graph.
    with pytest.raises(ValueError, match="img_size"):
        gm(torch.randn(1, 3, 32, 32))


def test_fx_trace_training_mode_with_drop_path(fx_trace: Callable) -> None:
    model = tiny_model(drop_path_rate=0.1, drop_rate=0.1).train()
    gm = fx_trace(model)
    out = gm(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert model.layers[0].mixer.scan.A_log.grad is not None


# -- errors ------------------------------------------------------------------------------------------


def test_wrong_image_size_raises() -> None:
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=r"32x32.*img_size="):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 1, 32, 32))


def test_checkpoint_missing_and_unexpected_keys_raise(vim_golden: dict[str, Any]) -> None:
    model = timm.create_model("vim_tiny_patch16_224", **REDUCED)
    sd = dict(vim_golden["state_dict"])
    del sd["layers.1.mixer.D_b"]
    sd["layers.1.mixer.rope.freqs"] = torch.zeros(3)
    with pytest.raises(ValueError) as info:
        checkpoint_filter_fn({"model": sd}, model)
    msg = str(info.value)
    assert "missing keys: 1 (layers.1.mixer.scan_b.D)" in msg
    assert "unexpected keys: 1 (layers.1.mixer.rope.freqs)" in msg
    assert "depth=" in msg


def test_checkpoint_from_deeper_model_raises(golden_zeros: Callable[[str], dict[str, Tensor]]) -> None:
    model = timm.create_model("vim_tiny_patch16_224", depth=2)
    with pytest.raises(ValueError, match=r"unexpected keys: 374 \(layers\.2\.") as info:
        checkpoint_filter_fn(golden_zeros("vim_tiny_state_dict.json"), model)
    assert "..." in str(info.value)  # long lists are truncated


def test_checkpoint_shape_mismatch_raises(golden_zeros: Callable[[str], dict[str, Tensor]]) -> None:
    model = timm.create_model("vim_small_patch16_224", depth=24, embed_dim=192, expand=4)
    with pytest.raises(ValueError, match="shape mismatches"):
        checkpoint_filter_fn(golden_zeros("vim_tiny_state_dict.json"), model)


def test_classifier_dropped_when_num_classes_changed(vim_golden: dict[str, Any]) -> None:
    # As timm does for pretrained=True with another num_classes: the old head is discarded.
    model = timm.create_model("vim_tiny_patch16_224", img_size=64, depth=2, num_classes=7)
    with pytest.warns(UserWarning, match="classifier"):
        out = checkpoint_filter_fn(vim_golden["state_dict"], model)
    assert "head.weight" not in out
    result = model.load_state_dict(out, strict=False)
    assert set(result.missing_keys) == {"head.weight", "head.bias"} and not result.unexpected_keys


def test_pos_embed_resampled_around_middle_class_token(golden_zeros: Callable[[str], dict[str, Tensor]]) -> None:
    sd = golden_zeros("vim_tiny_state_dict.json")
    sd = {k: v for k, v in sd.items() if not k.startswith(("layers.", "head."))}
    pos = torch.ones(1, 197, 192)
    pos[:, 98] = 5.0  # the class token's entry sits in the middle of 14x14 = 196 patches
    sd["pos_embed"] = pos
    model = timm.create_model("vim_tiny_patch16_224", img_size=64, depth=0, num_classes=0)
    with pytest.warns(UserWarning, match="Resampling pos_embed from 197 to 17"):
        out = checkpoint_filter_fn(sd, model)
    new = out["pos_embed"]
    assert new.shape == (1, 17, 192)
    torch.testing.assert_close(new[:, 8], torch.full((1, 192), 5.0))
    torch.testing.assert_close(new[:, [i for i in range(17) if i != 8]], torch.ones(1, 16, 192))
    model.load_state_dict(out, strict=True)


# -- timm overrides and initialisation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "tokens"),
    [
        (dict(in_chans=1, img_size=28, patch_size=4), 7 * 7 + 1),
        (dict(in_chans=1, img_size=28, patch_size=4, stride=2), 13 * 13 + 1),
        (dict(img_size=(32, 48), patch_size=8), 4 * 6 + 1),
    ],
)
def test_timm_overrides_forward(overrides: dict[str, Any], tokens: int, fx_trace: Callable) -> None:
    model = timm.create_model("vim_tiny_patch16_224", depth=2, embed_dim=32, num_classes=3, **overrides).eval()
    assert model.num_tokens == tokens
    size = model.patch_embed.img_size
    x = torch.randn(2, overrides.get("in_chans", 3), *size)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    assert out.shape == (2, 3)
    assert feats.shape == (2, tokens, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    torch.testing.assert_close(fx_trace(model)(x), out)


def test_reset_classifier_and_avg_pool() -> None:
    model = tiny_model(num_classes=0, global_pool="avg").eval()
    x = torch.randn(1, 3, 32, 32)
    assert model(x).shape == (1, 32)
    model.reset_classifier(4, global_pool="token")
    assert model(x).shape == (1, 4)


def test_init_is_deterministic_and_official() -> None:
    torch.manual_seed(0)
    a = tiny_model(depth=4)
    torch.manual_seed(0)
    b = tiny_model(depth=4)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb), ka
    mixer = a.layers[0].mixer
    torch.testing.assert_close(mixer.scan.A_log[3], torch.log(torch.arange(1.0, 17.0)))
    torch.testing.assert_close(mixer.scan_b.A_log, mixer.scan.A_log)
    assert torch.all(mixer.scan.D == 1) and torch.all(mixer.scan_b.D == 1)
    step = F.softplus(mixer.scan.delta_bias)
    assert step.min() >= 1e-4 - 1e-7 and step.max() <= 0.1 + 1e-6
    assert torch.all(mixer.scan_b.delta_bias == 0)
    bound = mixer.dt_rank**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound and mixer.dt_proj_b.weight.abs().max() <= bound
    # out_proj: default Linear bound 1/sqrt(fan_in), divided by sqrt(depth).
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(mixer.d_inner) / math.sqrt(4) + 1e-7
    assert torch.all(a.norm_f.weight == 1) and torch.all(a.head.bias == 0)


def test_checkpoint_filter_looks_up_the_family_converter() -> None:
    from qmamba_ao.models import checkpoint_filter

    model = tiny_model()
    assert checkpoint_filter(model) is checkpoint_filter_fn

    class Subclass(VisionMamba):
        pass

    assert checkpoint_filter(Subclass.__new__(Subclass)) is checkpoint_filter_fn
    with pytest.raises(TypeError, match="for Linear; supported model classes: VisionMamba, VSSM"):
        checkpoint_filter(nn.Linear(2, 2))
