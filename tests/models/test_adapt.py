"""adapt_mamba: foreign Mamba mixers (transformers, mamba-ssm, Vim's bidirectional fork) -> qmamba-ao's.

transformers runs here on the CPU, so its mixer is the numerical reference. mamba-ssm cannot be
imported without CUDA: its modules are imitated by classes that carry the same class name,
defining module and parameter layout (taken from the official Vim key list and reduced reference).
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import Tensor, nn
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

import qmamba_ao
from qmamba_ao.export import x86_qconfig_mapping
from qmamba_ao.models import BiMambaMixer, adapt_mamba, find_mamba_mixers
from qmamba_ao.models.mixer import UniMambaMixer
from qmamba_ao.models.vim import checkpoint_filter_fn
from qmamba_ao.ssm.fused import fused_scan_fn
from qmamba_ao.ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan

transformers = pytest.importorskip("transformers")
from toy_models import perturb  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM, MambaModel  # noqa: E402

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")

TOL = dict(rtol=1e-4, atol=1e-5)
SCAN_RENAMES = {"A_log": "scan.A_log", "D": "scan.D", "dt_proj.bias": "scan.delta_bias"}


def hf_config(**kwargs: Any) -> MambaConfig:
    args = dict(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
    args.update(kwargs)
    return MambaConfig(**args)


def hf_model(**kwargs: Any) -> MambaModel:
    torch.manual_seed(0)
    return perturb(MambaModel(hf_config(**kwargs))).eval()


def renamed(key: str, prefix: str = "") -> str:
    for old, new in SCAN_RENAMES.items():
        if key == prefix + old:
            return prefix + new
    return key


# --------------------------------------------------------------------------------------------------
# Stand-ins for mamba-ssm modules (same class name, module path and parameter layout)
# --------------------------------------------------------------------------------------------------


def _foreign_class(name: str, module: str) -> type:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError("stand-in for a CUDA-only module: it only carries parameters")

    return type(name, (nn.Module,), {"__module__": module, "forward": forward})


FakeMamba = _foreign_class("Mamba", "mamba_ssm.modules.mamba_simple")
FakeMamba2 = _foreign_class("Mamba2", "mamba_ssm.modules.mamba2")


def fake_mamba(
    d_model: int,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
    dt_rank: int | None = None,
    bimamba_type: str = "none",
    if_devide_out: bool = False,
) -> nn.Module:
    """mamba_ssm.Mamba's attributes (and, for bimamba_type='v2', the Vim fork's backward branch)."""
    m = FakeMamba()
    di, r, n = expand * d_model, dt_rank or -(-d_model // 16), d_state
    m.d_model, m.d_state, m.d_conv, m.expand, m.d_inner, m.dt_rank = d_model, n, d_conv, expand, di, r
    m.activation, m.use_fast_path, m.layer_idx = "silu", True, None
    m.bimamba_type, m.if_devide_out, m.init_layer_scale = bimamba_type, if_devide_out, None
    m.in_proj = nn.Linear(d_model, 2 * di, bias=False)
    m.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
    m.act = nn.SiLU()
    m.x_proj = nn.Linear(di, r + 2 * n, bias=False)
    m.dt_proj = nn.Linear(r, di, bias=True)
    m.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1.0)).repeat(di, 1))
    m.D = nn.Parameter(torch.ones(di))
    if bimamba_type == "v2":
        m.A_b_log = nn.Parameter(torch.log(torch.arange(1, n + 1.0)).repeat(di, 1))
        m.D_b = nn.Parameter(torch.ones(di))
        m.conv1d_b = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
        m.x_proj_b = nn.Linear(di, r + 2 * n, bias=False)
        m.dt_proj_b = nn.Linear(r, di, bias=True)
    elif bimamba_type == "v1":
        m.A_b_log = nn.Parameter(torch.log(torch.arange(1, n + 1.0)).repeat(di, 1))
    m.out_proj = nn.Linear(di, d_model, bias=False)
    return m


def official_vim(config: dict[str, Any]) -> nn.Module:
    """The project's Vim with every mixer swapped for a stand-in of the fork's Mamba: the official layout."""
    model = timm.create_model(
        "vim_tiny_patch16_224",
        img_size=config["img_size"],
        depth=config["depth"],
        embed_dim=config["embed_dim"],
        num_classes=config["num_classes"],
    ).eval()
    for layer in model.layers:
        layer.mixer = fake_mamba(config["embed_dim"], config["d_state"], bimamba_type="v2", if_devide_out=True)
    return model


# --------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [{}, {"use_bias": True, "use_conv_bias": False}, {"time_step_rank": 3, "state_size": 4, "conv_kernel": 3}],
    ids=["default", "proj-bias-no-conv-bias", "odd-sizes"],
)
def test_transformers_model_matches(cfg: dict[str, Any]) -> None:
    model = hf_model(**cfg)
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        ref = model(ids, use_cache=False).last_hidden_state
        ref_masked = model(ids, attention_mask=mask, use_cache=False).last_hidden_state
        adapted = adapt_mamba(copy.deepcopy(model))
        out = adapted(ids).last_hidden_state
        out_masked = adapted(ids, attention_mask=mask).last_hidden_state
    assert all(isinstance(layer.mixer, UniMambaMixer) for layer in adapted.layers)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(out_masked, ref_masked, **TOL)
    assert adapted.config.use_cache is False


def test_transformers_mixer_and_causal_lm_match() -> None:
    torch.manual_seed(0)
    lm = perturb(MambaForCausalLM(hf_config())).eval()
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(4))
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_logits = lm(ids, use_cache=False).logits
        mixer = lm.backbone.layers[1].mixer
        ref_mixer = mixer(x)
        adapted_mixer = adapt_mamba(copy.deepcopy(mixer))  # a bare mixer: the replacement is returned
        adapted = adapt_mamba(copy.deepcopy(lm))
        torch.testing.assert_close(adapted(ids).logits, ref_logits, **TOL)
        torch.testing.assert_close(adapted_mixer(x), ref_mixer, **TOL)
    assert isinstance(adapted_mixer, UniMambaMixer)


def test_transformers_state_dict_keys_are_recognisable() -> None:
    model = hf_model()
    original = model.state_dict()
    adapted = adapt_mamba(copy.deepcopy(model)).state_dict()
    mapping = {k: renamed(k, k[: k.index("mixer.") + len("mixer.")] if "mixer." in k else "") for k in original}
    assert set(adapted) == set(mapping.values())
    for old, new in mapping.items():
        assert torch.equal(adapted[new], original[old]), old
    # Reloading the adapted weights by name is lossless.
    fresh = adapt_mamba(hf_model())
    fresh.load_state_dict(adapted, strict=True)


def test_decoding_cache_is_refused() -> None:
    adapted = adapt_mamba(hf_model())
    x = torch.randn(1, 5, 32)
    mixer = adapted.layers[0].mixer
    for kwargs in ({"cache": object()}, {"cache_params": object()}, {"inference_params": object()}):
        with pytest.raises(ValueError, match="use_cache=False"):
            mixer(x, **kwargs)
    with pytest.raises(ValueError, match="decoding cache"):
        adapted(torch.zeros(1, 4, dtype=torch.long), use_cache=True)
    # The keyword set a transformers block passes is accepted.
    assert mixer(x, cache=None, cache_position=None, attention_mask=None).shape == x.shape


class Backbone(nn.Module):
    """The adapted transformers layers with their final norm, on input embeddings.

    transformers' model classes are not FX-traceable (output dataclasses, cache logic), the blocks
    and norms are: this wrapper shares the adapted modules, so its state dict uses the same names.
    """

    def __init__(self, model: MambaModel) -> None:
        super().__init__()
        self.layers = model.layers
        self.norm_f = model.norm_f

    def forward(self, embeds: Tensor) -> Tensor:
        for layer in self.layers:
            embeds = layer(embeds)
        return self.norm_f(embeds)


def test_adapted_transformers_layers_prepare_fx_convert_fx() -> None:
    model = adapt_mamba(hf_model())
    backbone = Backbone(model).eval()
    g = torch.Generator().manual_seed(6)
    calib = [model.embeddings(torch.randint(0, 64, (4, 16), generator=g)).detach() for _ in range(3)]
    x = calib[-1]

    def calibrated(mapping):
        prepared = prepare_fx(
            copy.deepcopy(backbone),
            mapping,
            (calib[0],),
            prepare_custom_config=qmamba_ao.prepare_custom_config(backbone),
        )
        assert sum(isinstance(m, ObservedSelectiveScan) for m in prepared.modules()) == 2
        with torch.inference_mode():
            for batch in calib[:2]:
                prepared(batch)
        return prepared, qmamba_ao.convert_custom_config(prepared)

    # The recipe (static per-token Linear inputs) through the reference conversion; the int8
    # kernels need per-tensor activations, which x86_qconfig_mapping provides.
    prepared, cfg = calibrated(qmamba_ao.get_qconfig_mapping("qmamba", w_bits=8, a_bits=8))
    reference = convert_to_reference_fx(copy.deepcopy(prepared), convert_custom_config=cfg)
    prepared, cfg = calibrated(x86_qconfig_mapping("qmamba", 8, 8))
    quantized = convert_fx(copy.deepcopy(prepared), convert_custom_config=cfg)
    assert sum(isinstance(m, QuantizedSelectiveScan) for m in quantized.modules()) == 2
    with torch.inference_mode():
        ref, q, r = backbone(x), quantized(x), reference(x)
    q = q.dequantize() if q.is_quantized else q
    assert torch.isfinite(q).all() and torch.isfinite(r).all()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    # W8A8 simulated: close to float (static per-token ranges from 8 calibration sequences do not
    # cover x fully: 0.09 measured); the lowered model has 7-bit per-tensor Linear inputs.
    assert rel(r, ref) < 0.15, rel(r, ref)
    assert rel(q, ref) < 0.25, rel(q, ref)


# --------------------------------------------------------------------------------------------------
# mamba-ssm (stand-ins; the package itself is never imported)
# --------------------------------------------------------------------------------------------------


def test_plain_mamba_ssm_layout_matches_transformers_maths() -> None:
    """mamba-ssm's Mamba and transformers' MambaMixer share names and maths: one reference for both."""
    hf_mixer = hf_model().layers[0].mixer
    fake = fake_mamba(32, d_state=8, dt_rank=hf_mixer.time_step_rank)
    fake.load_state_dict(hf_mixer.state_dict(), strict=True)
    parent = nn.Sequential(fake)
    adapted = adapt_mamba(parent)
    assert adapted is parent and isinstance(parent[0], UniMambaMixer)
    assert find_mamba_mixers(nn.Sequential(fake_mamba(32))) == [
        ("0", "mamba_ssm.modules.mamba_simple.Mamba", "mamba_ssm")
    ]
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(parent(x), hf_mixer(x), **TOL)
    assert "mamba_ssm" not in sys.modules


def test_vim_fork_matches_official_logits(vim_golden: dict[str, Any]) -> None:
    """Official reduced Vim weights loaded strictly into the fork's layout, adapted: official logits."""
    official = official_vim(vim_golden["config"])
    official.load_state_dict(vim_golden["state_dict"], strict=True)  # the stand-in's keys are the official ones
    assert [kind for _, _, kind in find_mamba_mixers(official)] == ["bimamba_v2"] * 2
    model = adapt_mamba(official)
    assert all(isinstance(layer.mixer, BiMambaMixer) for layer in model.layers)
    # The weights land where the project's checkpoint filter puts them.
    expected = checkpoint_filter_fn(vim_golden["state_dict"], model)
    adapted = model.state_dict()
    assert set(adapted) == set(expected)
    assert all(torch.equal(adapted[k], expected[k]) for k in expected)
    with torch.no_grad():
        logits = model(vim_golden["input"])
    torch.testing.assert_close(logits, vim_golden["logits"], **TOL)


def test_vim_fork_full_size_keys(golden_path: Callable[[str], Path]) -> None:
    """Vim-T's official per-layer keys and shapes load into the stand-in and come out renamed."""
    shapes = json.loads(golden_path("vim_tiny_state_dict.json").read_text())
    prefix = "layers.0.mixer."
    official = {k[len(prefix) :]: torch.zeros(v) for k, v in shapes.items() if k.startswith(prefix)}
    fake = fake_mamba(192, bimamba_type="v2", if_devide_out=True)
    fake.load_state_dict(official, strict=True)
    adapted = adapt_mamba(nn.ModuleDict({"mixer": fake}))["mixer"]
    project = timm.create_model("vim_tiny_patch16_224", depth=1).layers[0].mixer.state_dict()
    assert {k: tuple(v.shape) for k, v in adapted.state_dict().items()} == {
        k: tuple(v.shape) for k, v in project.items()
    }


def test_vim_fork_without_divide_sums_directions() -> None:
    torch.manual_seed(0)
    summed = perturb(fake_mamba(16, d_state=4, bimamba_type="v2", if_devide_out=False))
    averaged = copy.deepcopy(summed)
    averaged.if_devide_out = True
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        out_sum = adapt_mamba(nn.Sequential(summed))(x)
        out_avg = adapt_mamba(nn.Sequential(averaged))(x)
    torch.testing.assert_close(out_sum, 2 * out_avg, **TOL)


def test_dtype_and_requires_grad_are_kept() -> None:
    fake = fake_mamba(16, d_state=4).double()
    fake.A_log.requires_grad_(False)
    new = adapt_mamba(fake)
    assert all(p.dtype == torch.float64 for p in new.parameters())
    assert not new.scan.A_log.requires_grad and new.in_proj.weight.requires_grad
    assert new(torch.randn(1, 5, 16, dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_no_mixer_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"found no Mamba mixer.*torch\.nn\.modules\.linear\.Linear"):
        adapt_mamba(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        adapt_mamba({"in_proj.weight": torch.zeros(1)})  # type: ignore[arg-type]


def test_project_mixers_are_left_alone() -> None:
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32)
    assert adapt_mamba(model) is model and find_mamba_mixers(model) == []


def test_unknown_layouts_are_listed_and_nothing_changes() -> None:
    mamba2 = FakeMamba2()
    mamba2.in_proj = nn.Linear(16, 80, bias=False)
    mamba2.A_log = nn.Parameter(torch.zeros(2))
    mamba2.dt_bias = nn.Parameter(torch.zeros(2))
    model = nn.ModuleDict(
        {
            "ok": fake_mamba(16, d_state=4),
            "v1": fake_mamba(16, d_state=4, bimamba_type="v1"),
            "m2": mamba2,
            "gelu": MambaModel(hf_config(hidden_act="gelu")).layers[0].mixer,
        }
    )
    with pytest.raises(ValueError) as info:
        adapt_mamba(model)
    msg = str(info.value)
    assert "cannot convert 3 Mamba-like module(s)" in msg
    assert "v1: mamba_ssm.modules.mamba_simple.Mamba (bimamba_type='v1' with backward parameters ['A_b_log']" in msg
    assert "m2: mamba_ssm.modules.mamba2.Mamba2 (not a known Mamba mixer class)" in msg and "dt_bias[2]" in msg
    assert "gelu: transformers.models.mamba.modeling_mamba.MambaMixer (activation 'gelu'" in msg
    assert "1 supported mixer(s) found as well; nothing was changed" in msg
    assert type(model["ok"]).__name__ == "Mamba"


def test_fused_scan_is_never_used_on_cpu() -> None:
    assert fused_scan_fn(torch.zeros(1, 2, 3)) is None
    assert "mamba_ssm" not in sys.modules


def test_selective_scan_dispatch_passes_the_kernel_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch, exercised with mamba-ssm's reference signature standing in for the kernel."""
    import qmamba_ao.ssm.modules as modules
    from qmamba_ao.ssm import SelectiveScan, selective_scan_ref

    calls = []

    def kernel(*args: Any) -> Tensor:
        calls.append(len(args))
        return selective_scan_ref(*args)

    scan = perturb(SelectiveScan(8, 4))
    g = torch.Generator().manual_seed(8)
    u, delta, z = (torch.randn(2, 8, 6, generator=g) for _ in range(3))
    B, C = (torch.randn(2, 1, 4, 6, generator=g) for _ in range(2))
    with torch.no_grad():
        own = scan(u, delta, B, C, z)
        monkeypatch.setattr(modules, "fused_scan_fn", lambda t: kernel)
        fused = scan(u, delta, B, C, z)
    assert calls == [9]
    torch.testing.assert_close(fused, own, **TOL)


def test_vim_fork_slow_path_flag_warns_and_bare_mixer_is_found() -> None:
    fake = fake_mamba(16, d_state=4, bimamba_type="v2", if_devide_out=True)
    assert find_mamba_mixers(fake) == [("", "mamba_ssm.modules.mamba_simple.Mamba", "bimamba_v2")]
    fake.use_fast_path = False
    with pytest.warns(UserWarning, match="use_fast_path=False"):
        assert isinstance(adapt_mamba(fake), BiMambaMixer)
