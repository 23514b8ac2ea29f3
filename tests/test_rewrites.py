"""Baseline recipes (ptq4vm, ptq4vm-naive-ssm, quamba) and their float-equivalent model rewrites."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.observer import MinMaxObserver
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import qmamba_ao
import qmamba_ao.models  # noqa: F401
from qmamba_ao.observers import FrozenAffineQuant, PercentileObserver, PerTokenObserver
from qmamba_ao.recipes import get_qconfig_mapping, get_recipe
from qmamba_ao.rewrites import (
    ChannelScale,
    Hadamard,
    RotatedLinear,
    ScaledLinear,
    hadamard_matrix,
    linear_input_absmax,
    mixer_linears,
    rotate_out_proj,
    smooth_linears,
)
from qmamba_ao.ssm import SelectiveScan
from qmamba_ao.ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")

NEW_RECIPES = ("ptq4vm", "ptq4vm-naive-ssm", "quamba")
PER_TOKEN_WARNING = "per token"


def _quantize(vim, images, recipe, bits, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*per token.*")
        return qmamba_ao.quantize(vim, images[:2], recipe, bits, bits, progress=False, **kw)


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------
# Hadamard matrices
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 64, 96, 384, 768])
def test_hadamard_matrix_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard_matrix(n).double()
    torch.testing.assert_close(h @ h.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


def test_hadamard_block_diagonal_fallback_and_errors():
    h = hadamard_matrix(56).double()  # 56 = 7 * 8: no full construction, 7 blocks of 8
    torch.testing.assert_close(h @ h.t(), torch.eye(56, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.count_nonzero(h) == 7 * 8 * 8
    with pytest.raises(ValueError, match="allow_block_diagonal=True for 7 blocks of size 8"):
        hadamard_matrix(56, allow_block_diagonal=False)
    with pytest.raises(ValueError, match="no Hadamard matrix of size 9"):
        hadamard_matrix(9)
    with pytest.raises(ValueError, match="positive integer"):
        hadamard_matrix(0)


# ------------------------------------------------------------------------------------------------
# Rewrites
# ------------------------------------------------------------------------------------------------


def test_rewrites_preserve_the_float_output_and_leave_the_input_alone(vim, images):
    before = copy.deepcopy(vim)
    smoothed = smooth_linears(vim, images[:2])
    rotated = rotate_out_proj(vim)
    both = rotate_out_proj(smooth_linears(vim, images[:2], names=["layers.0.mixer.in_proj"]))
    assert _states_equal(vim, before) and type(vim.layers[0].mixer.out_proj) is nn.Linear
    x = images[2]
    with torch.inference_mode():
        ref = vim(x)
        for model in (smoothed, rotated, both):
            torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)

    names = mixer_linears(vim)
    assert names[:6] == [
        f"layers.0.mixer.{n}" for n in ("in_proj", "x_proj", "dt_proj", "x_proj_b", "dt_proj_b", "out_proj")
    ]
    assert len(names) == 12 and "head" not in names
    for name in names:
        mod = smoothed.get_submodule(name)
        assert isinstance(mod, ScaledLinear) and isinstance(mod.scale, ChannelScale)
        assert type(mod.linear) is nn.Linear
    assert isinstance(smoothed.head, nn.Linear)
    for i in range(2):
        mod = rotated.get_submodule(f"layers.{i}.mixer.out_proj")
        assert isinstance(mod, RotatedLinear) and isinstance(mod.rotate, Hadamard)
        torch.testing.assert_close(mod.rotate.matrix, hadamard_matrix(384))
    assert isinstance(both.layers[0].mixer.in_proj, ScaledLinear) and type(both.layers[1].mixer.in_proj) is nn.Linear


def test_smoothing_uses_the_smoothquant_scale(vim, images):
    name = "layers.1.mixer.in_proj"
    absmax = linear_input_absmax(copy.deepcopy(vim), images[:2], [name])[name]
    w = vim.get_submodule(name).weight.detach()
    s = absmax.clamp(min=1e-3).sqrt() / w.abs().amax(0).clamp(min=1e-5).sqrt()
    smoothed = smooth_linears(vim, images[:2], alpha=0.5, names=[name]).get_submodule(name)
    torch.testing.assert_close(smoothed.scale.scale, 1 / s)
    torch.testing.assert_close(smoothed.linear.weight, w * s)
    # alpha = 0.5 balances the two: per input channel, max|X / s| == max|W * s|.
    torch.testing.assert_close(absmax / s, (w * s).abs().amax(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="conv1d is a Conv1d, not an nn.Linear"):
        smooth_linears(vim, images[:1], names=["layers.0.mixer.conv1d"])
    with pytest.raises(ValueError, match="alpha must be in"):
        smooth_linears(vim, images[:1], alpha=1.5)
    with pytest.raises(ValueError, match="calib_batches is empty"):
        smooth_linears(vim, [])


def test_wrapped_linears_keep_their_layout():
    """The two wrappers' constructor keywords, child names (state-dict keys) and float output."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    linear = nn.Linear(4, 5)
    scaled = ScaledLinear(scale=ChannelScale(torch.full((4,), 0.5)), linear=copy.deepcopy(linear))
    rotated = RotatedLinear(rotate=Hadamard(hadamard_matrix(4)), linear=copy.deepcopy(linear))
    assert list(scaled.state_dict()) == ["scale.scale", "linear.weight", "linear.bias"]
    assert list(rotated.state_dict()) == ["rotate.matrix_t", "linear.weight", "linear.bias"]
    assert torch.equal(scaled(x), linear(x * 0.5))
    assert torch.equal(rotated(x), linear(torch.matmul(x, rotated.rotate.matrix_t)))
    traced = torch.fx.symbolic_trace(rotated)
    assert [n.target for n in traced.graph.nodes if n.op in ("get_attr", "call_module")] == [
        "rotate.matrix_t",
        "linear",
    ]


def test_rewrites_refuse_layers_that_are_not_plain_linears(vim):
    rotated = rotate_out_proj(vim)
    with pytest.raises(
        ValueError, match=r"rotate_out_proj: layers.0.mixer.out_proj is a RotatedLinear, not an nn.Linear"
    ):
        rotate_out_proj(rotated)
    with pytest.raises(
        ValueError, match=r"smooth_linears: layers.0.mixer.out_proj is a RotatedLinear, not an nn.Linear"
    ):
        smooth_linears(rotated, None, names=["layers.0.mixer.out_proj"])
    assert isinstance(vim.layers[0].mixer.out_proj, nn.Linear)  # the input model is never modified


# ------------------------------------------------------------------------------------------------
# Recipes through the standard flow
# ------------------------------------------------------------------------------------------------


def test_recipe_rewrites_are_named(vim):
    assert set(NEW_RECIPES) <= set(qmamba_ao.list_recipes())
    for name in ("percentile", "minmax"):
        assert not get_recipe(name).rewrites_model and get_recipe(name).rewrite(vim) is vim
    assert get_recipe("qmamba").model_rewrite == "smooth"  # smooths the Linears as ptq4vm does
    assert all(get_recipe(r).rewrites_model for r in NEW_RECIPES)
    summaries = dict(qmamba_ao.describe_recipes())
    assert "JLSS" in summaries["ptq4vm"] and get_recipe("ptq4vm").reconstruct
    assert "without JLSS" in summaries["ptq4vm-closed-form"] and not get_recipe("ptq4vm-closed-form").reconstruct
    assert get_recipe("ptq4vm-naive-ssm").reconstruct
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        get_recipe("nope")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("recipe", NEW_RECIPES)
def test_new_recipes_run_the_standard_flow(vim, images, recipe, bits):
    # Through the reference flow: the x86 kernels refuse 4-bit activations (they would not stay on
    # 16 levels), and full-range 8-bit activations saturate the AVX2 int8 kernels (any recipe).
    q = _quantize(vim, images, recipe, bits, reference=True)
    with torch.inference_mode():
        out = q(images[2])
        ref = vim(images[2])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    if bits == 8:
        assert ((out - ref).norm() / ref.norm()).item() < 0.1
    scans = [m for m in q.modules() if isinstance(m, (SelectiveScan, QuantizedSelectiveScan))]
    assert len(scans) == 4
    if recipe == "ptq4vm":
        # The selective scan stays entirely in floating point.
        assert all(type(m) is SelectiveScan for m in scans)
    else:
        assert all(isinstance(m, QuantizedSelectiveScan) for m in scans)
        for scan in scans:
            assert set(scan.site_modules) == {"dA", "dBu", "h", "y"}
            for site in scan.site_modules.values():
                assert isinstance(site, FrozenAffineQuant) and site.quant_max - site.quant_min == 2**bits - 1
    # quantize() applied the recipe's rewrite to a copy (FX keeps the traced-through helpers' buffers).
    if recipe.startswith("ptq4vm"):
        assert q.get_buffer("layers.0.mixer.in_proj.scale.scale").shape == (192,)
    else:
        assert q.get_buffer("layers.1.mixer.out_proj.rotate.matrix_t").shape == (384, 384)
    assert type(vim.layers[0].mixer.in_proj) is nn.Linear and type(vim.layers[0].mixer.out_proj) is nn.Linear


def test_ptq4vm_quantizes_linear_inputs_per_token(vim, images):
    mapping = get_qconfig_mapping("ptq4vm", 4, 4)
    assert mapping.object_type_qconfigs[SelectiveScan] is None
    obs = mapping.object_type_qconfigs[nn.Linear].activation()
    assert isinstance(obs, PerTokenObserver) and obs.token_axis == 1 and obs.quant_max == 15
    # The head's input (batch, channels) has no token axis: first/last layers stay per tensor.
    for fl in (8, None):
        head = get_qconfig_mapping("ptq4vm", 4, 4, first_last_bits=fl).module_name_regex_qconfigs["^head$"]
        assert not isinstance(head.activation(), PerTokenObserver)

    model = get_recipe("ptq4vm").rewrite(vim, images[:2])
    prepared = qmamba_ao.prepare(model, (images[0][:1],), "ptq4vm", 4, 4)
    assert not any(isinstance(m, ObservedSelectiveScan) for m in prepared.modules())
    qmamba_ao.calibrate(prepared, images[:2], progress=False)
    in_obs = [m for m in prepared.modules() if isinstance(m, PerTokenObserver)]
    assert in_obs and all(m.min_val.numel() == vim.num_tokens for m in in_obs)

    reference = qmamba_ao.convert(copy.deepcopy(prepared), reference=True)
    with pytest.warns(UserWarning, match=PER_TOKEN_WARNING):
        q = qmamba_ao.convert(copy.deepcopy(prepared), reference=False)
    qd = torch.ops.quantized_decomposed
    per_channel = [n for n in q.graph.nodes if n.target is qd.quantize_per_channel.default]
    users = {u.target for n in per_channel for u in n.users}
    assert len(per_channel) >= 12 and users == {qd.dequantize_per_channel.default}
    with torch.inference_mode():
        assert torch.equal(q(images[2]), reference(images[2]))


def test_quamba_percentile_scan_input_and_float_rotation(vim, images):
    model = rotate_out_proj(vim)
    prepared = qmamba_ao.prepare(model, (images[0][:1],), "quamba", 8, 8)
    node_of = {n.target: n for n in prepared.graph.nodes if n.op == "call_module"}
    for name in ("layers.0.mixer.scan", "layers.1.mixer.scan_b"):
        scan = prepared.get_submodule(name)
        u_obs = prepared.get_submodule(node_of[name].args[0].target)  # observer of the scan input u
        assert isinstance(u_obs, PercentileObserver) and u_obs.percentile == 99.999
        for site in ("dA", "dBu", "h", "y"):
            assert type(scan.site_modules[site]) is MinMaxObserver
    # Linear inputs are min/max, per tensor.
    lin_in = prepared.get_submodule(node_of["layers.0.mixer.out_proj.linear"].args[0].target)
    assert type(lin_in) is MinMaxObserver
    # The rotation is a float matmul feeding the observer of out_proj's input.
    assert node_of["layers.0.mixer.out_proj.linear"].args[0].args[0].target is torch.matmul

    qmamba_ao.calibrate(prepared, images[:2], progress=False)
    q = qmamba_ao.convert(prepared)
    kinds = {type(q.get_submodule(f"layers.{i}.mixer.out_proj.linear")) for i in range(2)}
    assert kinds == {torch.ao.nn.quantized.Linear}  # real x86 int8 out_proj on the rotated input
    matmuls = [n for n in q.graph.nodes if "matmul" in str(n.target)]
    assert len(matmuls) == 2 and all(n.target is torch.matmul for n in matmuls)
    for n in matmuls:  # float matmul with the H^T buffer, then quantized for out_proj
        assert n.args[1].op == "get_attr" and n.args[1].target.endswith("out_proj.rotate.matrix_t")
        assert [u.target for u in n.users] == [torch.quantize_per_tensor]


def test_raw_torch_ao_flow_with_the_rewrite_matches_quantize(vim, images):
    """Users of the raw calls apply the rewrite themselves; the result is what quantize() gives."""
    model = get_recipe("quamba").rewrite(vim, images[:2])
    prepared = prepare_fx(
        copy.deepcopy(model).eval(),
        get_qconfig_mapping("quamba", 6, 6),
        (images[0][:1],),
        prepare_custom_config=qmamba_ao.prepare_custom_config(model),
    )
    with torch.inference_mode():
        for x in images[:2]:
            prepared(x)
    # qmamba_ao.convert is torch.ao's decomposed reference conversion (narrow ranges clamped)
    raw = qmamba_ao.convert(prepared, reference=True)
    via = _quantize(vim, images, "quamba", 6, reference=True)
    with torch.inference_mode():
        assert torch.equal(raw(images[2]), via(images[2]))


def test_hadamard_stays_float_under_a_global_qconfig(vim, images):
    """With torch.ao's default x86 mapping the rotation's matmul is quantized unless set to None."""
    model = rotate_out_proj(vim)
    mapping = get_default_qconfig_mapping("x86").set_object_type(Hadamard, None)
    prepared = prepare_fx(
        copy.deepcopy(model), mapping, (images[0],), prepare_custom_config=qmamba_ao.prepare_custom_config(model)
    )
    with torch.inference_mode():
        prepared(images[0])
    q = convert_fx(prepared, convert_custom_config=qmamba_ao.convert_custom_config(prepared))
    targets = [n.target for n in q.graph.nodes if "matmul" in str(n.target)]
    assert targets == [torch.matmul, torch.matmul]


@pytest.mark.parametrize("recipe", ["ptq4vm", "quamba", "qmamba"])
def test_saved_state_reloads_into_a_model_rebuilt_without_data(vim, images, recipe):
    """``rewrite(model, None)`` has the data-dependent structure with neutral values: prepare, convert, load."""
    q = _quantize(vim, images, recipe, 4, reference=True)
    example = torch.zeros(1, 3, 64, 64)
    skeleton = get_recipe(recipe).rewrite(vim, None)
    assert type(skeleton) is type(vim) and skeleton is not vim
    if recipe != "quamba":  # unit smoothing scales, weights as they were
        assert torch.equal(skeleton.layers[0].mixer.in_proj.scale.scale, torch.ones(192))
        assert torch.equal(skeleton.layers[0].mixer.in_proj.linear.weight, vim.layers[0].mixer.in_proj.weight)
    rebuilt = qmamba_ao.prepare(skeleton, (example,), recipe, 4, 4)
    qmamba_ao.calibrate(rebuilt, [example], progress=False)
    rebuilt = qmamba_ao.convert(rebuilt, reference=True)
    rebuilt.load_state_dict(q.state_dict())
    with torch.inference_mode():
        assert torch.equal(rebuilt(images[2]), q(images[2]))
