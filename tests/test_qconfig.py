"""Recipes as QConfigMappings: per-site control, persistence, bit widths, NaN reporting."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch.ao.quantization import QConfig
from torch.ao.quantization.observer import MinMaxObserver

import qmamba_ao
import qmamba_ao.models  # noqa: F401
from qmamba_ao.observers import FrozenLtSQ, FrozenTGQ, LtSQObserver, TGQObserver
from qmamba_ao.qconfig import weight_observer
from qmamba_ao.ssm.quantized import ScanQuantSpec

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


@pytest.mark.parametrize("bits", [(8, 8), (6, 8), (4, 8)])
@pytest.mark.parametrize("recipe", ["percentile", "minmax"])  # per-tensor Linear inputs: lowerable
def test_bit_widths_land_in_the_converted_model(vim, images, recipe, bits):
    # Lowered to the x86 kernels: 8-bit activations (below 7 bits they are refused, see
    # tests/test_hostile_quant.py), weights at any width.
    w_bits, a_bits = bits
    q = qmamba_ao.quantize(vim, images[:1], recipe, w_bits, a_bits, progress=False, reference=False)
    lin = q.get_submodule("layers.0.mixer.in_proj")
    w = lin.weight().int_repr()
    assert w.min() >= -(2 ** (w_bits - 1) - 1) and w.max() <= 2 ** (w_bits - 1) - 1  # narrow symmetric
    assert w.max() - w.min() > 2 ** (w_bits - 1)  # the range is used, not just allowed
    head = q.get_submodule("head").weight().int_repr()
    assert head.max() - head.min() > 128  # first/last layers keep 8 bits
    for site in q.get_submodule("layers.0.mixer.scan").site_modules.values():
        assert site.quant_max - site.quant_min == 2**a_bits - 1
    with torch.inference_mode():
        assert torch.isfinite(q(images[2])).all()


@pytest.mark.parametrize("bits", [(6, 6), (4, 4)])
def test_sub_7_bit_activations_land_in_the_reference_model(vim, images, bits):
    w_bits, a_bits = bits
    q = qmamba_ao.quantize(vim, images[:1], "minmax", w_bits, a_bits, progress=False)
    for site in q.get_submodule("layers.0.mixer.scan").site_modules.values():
        assert site.quant_max - site.quant_min == 2**a_bits - 1
    qd = torch.ops.quantized_decomposed
    ranges = {
        (n.args[3], n.args[4])
        for n in q.graph.nodes
        if n.target in (qd.quantize_per_tensor.tensor, qd.quantize_per_tensor.default)
    }
    assert (0, 2**a_bits - 1) in ranges and (0, 255) in ranges  # first/last layers keep 8 bits
    with pytest.raises(ValueError, match=f"{a_bits}-bit activations would leave their {2**a_bits} levels"):
        qmamba_ao.quantize(vim, images[:1], "minmax", w_bits, a_bits, progress=False, reference=False)


def test_qmamba_sites_use_ltsq_and_tgq_and_values_lie_on_their_grids(vim, images):
    q = qmamba_ao.quantize(vim, images[:2], "qmamba", 4, 4, progress=False)
    scan = q.get_submodule("layers.1.mixer.scan_b")
    assert isinstance(scan.site_modules["dA"], FrozenLtSQ) and isinstance(scan.site_modules["dBu"], FrozenLtSQ)
    assert isinstance(scan.site_modules["h"], FrozenTGQ)
    dA = scan.site_modules["dA"]
    x = torch.rand(2, 8, 17, 16)
    levels = dA.levels()
    out = dA(x)
    dist = (out.reshape(-1, 1) - levels.reshape(1, -1)).abs().amin(1)
    assert dist.max() < 1e-5  # every dequantized value is one of the 16 levels
    h = scan.site_modules["h"]
    seq = [h(torch.randn(2, 8, 16), t) for t in range(17)]
    for t, v in enumerate(seq):
        g = int(h.group_index[t])
        codes = v / h.scale[g] + h.zero_point[g]
        assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_one_layer_keeps_h_at_8_bits_by_module_name(vim, images):
    mapping = qmamba_ao.get_qconfig_mapping("qmamba", 4, 4)
    act8 = MinMaxObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255)
    spec = ScanQuantSpec(
        act8,
        {"dA": LtSQObserver.with_args(bits=4), "h": TGQObserver.with_args(bits=8, num_groups=4)},
    )
    mapping.set_module_name("layers.0.mixer.scan", QConfig(activation=spec, weight=weight_observer(8)))
    q = qmamba_ao.quantize(vim, images[:1], qconfig_mapping=mapping, progress=False)
    special = q.get_submodule("layers.0.mixer.scan").site_modules
    other = q.get_submodule("layers.0.mixer.scan_b").site_modules
    assert set(special) == {"dA", "h"} and special["h"].quant_max == 255
    assert other["h"].quant_max == 15


def test_prepared_state_dict_reloads_and_converted_model_saves(vim, images):
    prepared = qmamba_ao.prepare(vim, (images[0],), "qmamba", 4, 4)
    qmamba_ao.calibrate(prepared, images[:2], progress=False)
    fresh = qmamba_ao.prepare(vim, (images[0],), "qmamba", 4, 4)
    fresh.load_state_dict(prepared.state_dict())
    a = qmamba_ao.convert(copy.deepcopy(prepared))
    b = qmamba_ao.convert(fresh)
    with torch.inference_mode():
        out_a, out_b = a(images[2]), b(images[2])
    assert torch.equal(out_a, out_b)
    # A converted model's state_dict loads into a model converted from other calibration data.
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    other = qmamba_ao.prepare(vim, (images[0],), "qmamba", 4, 4)  # same graph as `a` (no smoothing)
    qmamba_ao.calibrate(other, images[1:2], progress=False)
    other = qmamba_ao.convert(other)
    with torch.inference_mode():
        assert not torch.equal(other(images[2]), out_a)
    other.load_state_dict(torch.load(buf, weights_only=False))
    with torch.inference_mode():
        assert torch.equal(other(images[2]), out_a)


def test_sequence_length_other_than_calibrated_is_an_error(vim, images):
    q = qmamba_ao.quantize(vim, images[:1], "qmamba", 4, 4, progress=False)
    scan = q.get_submodule("layers.0.mixer.scan")
    u = torch.randn(1, scan.dim, 9)
    with pytest.raises(ValueError, match="17"):
        scan(u, u, torch.randn(1, 1, 16, 9), torch.randn(1, 1, 16, 9), u)


def test_nan_in_calibration_names_layer_and_site(vim, images):
    # A NaN that arises inside a scan (here from a corrupted A_log) first meets the dA site.
    prepared = qmamba_ao.prepare(vim, (images[0],), "qmamba", 4, 4)
    with torch.no_grad():
        prepared.get_submodule("layers.0.mixer.scan").A_log[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN") as info:
        qmamba_ao.calibrate(prepared, [images[0]], progress=False)
    message = str(info.value)
    assert "layers.0.mixer.scan" in message and "dA" in message, message
    assert "layers.0.mixer.scan_b" not in message, message


def test_nan_in_calibration_images_names_the_layer_that_met_it(vim, images):
    # A NaN pixel never reaches an observer: each calibration batch is checked before the model runs,
    # and the error names the batch and the image.
    prepared = qmamba_ao.prepare(vim, (images[0],), "qmamba", 4, 4)
    bad = copy.deepcopy(images[0])
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"calibration batch 0 has 1 NaN and 0 Inf values in image\(s\) \[0\]"):
        qmamba_ao.calibrate(prepared, [bad], progress=False)
    # A NaN that arises inside the model (here from the norm in front of block 0's in_proj) first meets
    # in_proj's input observer, before any scan site: the error says which layer's observer met it.
    with torch.no_grad():
        prepared.get_submodule("layers.0.norm").weight[0] = float("nan")
    with pytest.raises(ValueError, match="NaN") as info:
        qmamba_ao.calibrate(prepared, [images[0]], progress=False)
    message = str(info.value)
    assert "input of layers.0.mixer.in_proj (activation_post_process_" in message, message
    assert "PerTokenObserver" in message and "scan" not in message, message


# ------------------------------------------------------------------------------------------------
# Recipe objects
# ------------------------------------------------------------------------------------------------


def test_recipes_are_keyword_built_and_resolved_in_one_place():
    from dataclasses import replace

    from qmamba_ao.recipes import RECIPES, Recipe, get_recipe
    from qmamba_ao.ssm import SelectiveScan

    assert qmamba_ao.list_recipes() == list(RECIPES) and get_recipe("quamba") is RECIPES["quamba"]
    with pytest.raises(TypeError):
        Recipe("x", "positional fields are not accepted")  # type: ignore[misc]
    with pytest.raises(ValueError, match="h='log'"):
        Recipe(name="x", summary="bad site", h="log")
    with pytest.raises(ValueError, match="unknown recipe 'nope'; choose one of"):
        get_recipe("nope")
    custom = replace(get_recipe("minmax"), name="minmax-float-scan", scan=False, dA=None, dBu=None, h=None, y=None)
    assert get_recipe(custom) is custom
    assert qmamba_ao.get_qconfig_mapping(custom, 4, 4).object_type_qconfigs[SelectiveScan] is None
    # Only static per-token Linear inputs keep a recipe's own mapping off the x86 kernels.
    assert [r for r in RECIPES.values() if not r.lowers_to_x86] == [
        RECIPES[n]
        for n in ("qmamba", "qmamba-ltsq-only", "qmamba-tgq-only", "ptq4vm", "ptq4vm-closed-form", "ptq4vm-naive-ssm")
    ]


def test_x86_mapping_narrows_8_bit_activations_only():
    from torch import nn

    from qmamba_ao.export import x86_qconfig_mapping
    from qmamba_ao.recipes import get_recipe

    mapping = get_recipe("qmamba").x86_qconfig_mapping(8, 8)
    linear = mapping.object_type_qconfigs[nn.Linear].activation()
    assert type(linear) is MinMaxObserver and (linear.quant_min, linear.quant_max) == (0, 127)  # was per token
    assert mapping.object_type_qconfigs[nn.Conv1d].activation().quant_max == 127
    head = mapping.module_name_regex_qconfigs["^head$"].activation()
    assert head.quant_max == 127
    assert x86_qconfig_mapping("qmamba", 8, 8).to_dict().keys() == mapping.to_dict().keys()
    w4a4 = get_recipe("minmax").x86_qconfig_mapping(4, 4)
    assert w4a4.object_type_qconfigs[nn.Linear].activation().quant_max == 15  # below 8 bits: unchanged


@pytest.mark.parametrize("recipe", ["qmamba", "percentile", "ptq4vm-closed-form", "quamba"])
def test_first_and_last_layers_end_at_8_bits(vim, images, recipe):
    """The convention README states: at W4A4 the patch embedding and the head keep 8-bit weights, inputs
    and outputs (the logits included), for every recipe alike; first_last_bits=None puts them at 4."""
    from qmamba_ao.ptq import observer_names

    for first_last, want in ((8, 255), (None, 15)):
        model = qmamba_ao.get_recipe(recipe).rewrite(vim, images[:1])
        prepared = qmamba_ao.prepare(model, (images[0][:1],), recipe, 4, 4, first_last_bits=first_last)
        ends = {
            label: prepared.get_submodule(path).quant_max
            for path, label in observer_names(prepared).items()
            if label.endswith(("of patch_embed.proj", "of head"))
        }
        assert set(ends) >= {
            "input of patch_embed.proj",
            "output of patch_embed.proj",
            "input of head",
            "output of head",
        }
        assert set(ends.values()) == {want}, ends
        for layer in ("patch_embed.proj", "head"):
            assert prepared.get_submodule(layer).qconfig.weight().quant_max == (127 if first_last else 7)
