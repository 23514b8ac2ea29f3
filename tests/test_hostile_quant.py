"""Hostile input to quantization: non-finite or empty calibration data, options of the wrong type,
sub-8-bit activations on the lowered path, and a quantized model run at another input size."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import pytest
import timm
import torch
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import prepare_fx

import qmamba_ao
import qmamba_ao.models  # noqa: F401
from qmamba_ao import ptq
from qmamba_ao.recipes import MAPPING_OPTIONS, get_recipe

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")

RECIPES = qmamba_ao.list_recipes()


def _default_prepared(vim, images):
    """The model prepared with torch.ao's own x86 mapping (HistogramObserver activations)."""
    return prepare_fx(
        copy.deepcopy(vim),
        get_default_qconfig_mapping("x86"),
        (images[0],),
        prepare_custom_config=qmamba_ao.prepare_custom_config(vim),
    )


def _prepared(vim, images, recipe):
    if recipe == "torch-default":
        return _default_prepared(vim, images)
    return qmamba_ao.prepare(vim, (images[0][:1],), recipe, 4, 4)


def _poison(prepared, module, value=float("nan")):
    with torch.no_grad():
        prepared.get_submodule(module).weight.view(-1)[0] = value


# -- non-finite calibration images: rejected per batch, before the model runs ---------------------------


@pytest.mark.parametrize("value, counts", [(float("nan"), "1 NaN and 0 Inf"), (float("-inf"), "0 NaN and 1 Inf")])
@pytest.mark.parametrize("recipe", ["minmax", "histogram", "percentile", "qmamba"])
def test_non_finite_pixel_names_the_batch_and_image(vim, images, recipe, value, counts):
    bad = images[1].clone()
    bad[2, 0, 5, 7] = value
    with pytest.raises(ValueError, match=rf"calibration batch 1 has {counts} values in image\(s\) \[2\] of the batch"):
        qmamba_ao.quantize(vim, [images[0], bad], recipe, 4, 4, progress=False)


def test_non_finite_pixel_with_torch_default_mapping(vim, images):
    prepared = _default_prepared(vim, images)
    bad = images[0].clone()
    bad[:, 1] = float("nan")
    with pytest.raises(
        ValueError, match=r"calibration batch 0 has 16384 NaN and 0 Inf values in image\(s\) \[0, 1, 2, 3\]"
    ):
        qmamba_ao.calibrate(prepared, iter([bad]), progress=False)


# -- non-finite values arising inside the model: the first observer that met them, by layer ------------


@pytest.mark.parametrize("recipe", [*RECIPES, "torch-default"])
def test_nan_weight_names_the_observer_after_that_layer(vim, images, recipe):
    prepared = _prepared(vim, images, recipe)
    _poison(prepared, "layers.0.mixer.in_proj")
    with pytest.raises(ValueError) as info:
        qmamba_ao.calibrate(prepared, images[:2], progress=False)
    msg = str(info.value)
    assert msg.startswith("calibration batch 0: non-finite values (NaN or Inf) first reached the observer at: "), msg
    assert "output of layers.0.mixer.in_proj (activation_post_process_" in msg, msg
    assert "The batch itself is finite" in msg, msg


@pytest.mark.parametrize("recipe", ["histogram", "torch-default"])
def test_histogram_observer_error_is_renamed(vim, images, recipe):
    # torch's HistogramObserver fails inside torch.histc ("range of [nan, nan] is not finite")
    prepared = _prepared(vim, images, recipe)
    _poison(prepared, "patch_embed.proj")
    with pytest.raises(
        ValueError, match=r"at: output of patch_embed\.proj \(activation_post_process_1, HistogramObserver\)"
    ):
        qmamba_ao.calibrate(prepared, images[:1], progress=False)


def test_non_finite_values_in_a_later_batch_name_that_batch(vim, images):
    # batch 0 calibrates cleanly; then a weight turns to Inf: torch.ao's MinMaxObserver records it silently
    prepared = qmamba_ao.prepare(vim, (images[0][:1],), "minmax", 8, 8)

    def batches():
        yield images[0]
        _poison(prepared, "layers.1.mixer.x_proj", float("inf"))
        yield images[1]

    with pytest.raises(
        ValueError, match=r"^calibration batch 1: non-finite .* at: output of layers\.1\.mixer\.x_proj \("
    ):
        qmamba_ao.calibrate(prepared, batches(), progress=False)


def test_every_observer_is_named_after_its_layer(vim, images):
    prepared = qmamba_ao.prepare(vim, (images[0][:1],), "minmax", 4, 4)
    names = ptq.observer_names(prepared)
    assert names["activation_post_process_0"] == "input of patch_embed.proj"
    assert names["activation_post_process_1"] == "output of patch_embed.proj"
    assert "input of layers.0.mixer.in_proj" in names.values()
    assert "output of layers.0.mixer.in_proj" in names.values()
    assert {"input 'delta' of layers.0.mixer.scan", "output of layers.0.mixer.scan"} <= set(names.values())
    assert names["layers.1.mixer.scan_b.site_modules.h"] == "layers.1.mixer.scan_b.h"
    observers = [n for n, m in prepared.named_modules() if n.rpartition(".")[2].startswith("activation_post_process")]
    assert set(observers) <= set(names)
    assert not any(v.startswith(("graph node", "activation_post_process")) for v in names.values()), names


# -- empty calibration batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["minmax", "qmamba"])
def test_empty_batch_is_named(vim, images, recipe):
    with pytest.raises(ValueError, match=r"calibration batch 1 holds no images \(shape \(0, 3, 64, 64\)\)"):
        qmamba_ao.quantize(vim, [images[0], images[1][:0]], recipe, 4, 4, progress=False)
    with pytest.raises(ValueError, match=r"calibration batch 0 holds no images"):
        qmamba_ao.quantize(vim, [images[0][:0]], recipe, 4, 4, example_inputs=(images[0][:1],), progress=False)


def test_empty_batch_from_a_generator(vim, images):
    prepared = qmamba_ao.prepare(vim, (images[0][:1],), "minmax", 4, 4)
    with pytest.raises(ValueError, match=r"calibration batch 0 holds no images"):
        qmamba_ao.calibrate(prepared, (x[:0] for x in images), progress=False)
    with pytest.raises(ValueError, match="calib_data is empty"):
        qmamba_ao.calibrate(prepared, iter([]), progress=False)


# -- mapping options taken strictly ----------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(h_feedback="off"), r"h_feedback='off' \(str\): use True or False"),
    (dict(h_feedback=1), r"h_feedback=1 \(int\): use True or False"),
    (dict(percentile=150), r"percentile=150 \(int\): use a number in \(50, 100\]"),
    (dict(percentile="99.9"), r"percentile='99.9' \(str\): use a number in \(50, 100\]"),
    (dict(percentile=float("nan")), r"percentile=nan \(float\): use a number in \(50, 100\]"),
    (dict(tgq_grouping="bogus"), r"tgq_grouping='bogus' \(str\): use one of 'uniform', 'range'"),
    (dict(tgq_clip="max"), r"tgq_clip='max' \(str\): use one of 'percentile', 'mse', 'minmax'"),
    (dict(tgq_groups=2.5), r"tgq_groups=2.5 \(float\): use an integer >= 1"),
    (dict(tgq_groups="8"), r"tgq_groups='8' \(str\): use an integer >= 1"),
    (dict(tgq_groups=0), r"tgq_groups=0 \(int\): use an integer >= 1"),
    (dict(tgq_groups=True), r"tgq_groups=True \(bool\): use an integer >= 1"),
    (dict(first_last_bits=9), r"first_last_bits=9 \(int\): use an integer in 2\.\.8 or None"),
    (dict(first_last_bits=8.0), r"first_last_bits=8\.0 \(float\): use an integer in 2\.\.8 or None"),
    (dict(w_bits=True), r"w_bits=True \(bool\): use an integer in 2\.\.8"),
    (dict(w_bits=4.0), r"w_bits=4\.0 \(float\): use an integer in 2\.\.8"),
    (dict(a_bits="4"), r"a_bits='4' \(str\): use an integer in 2\.\.8"),
    (
        dict(tgq_group=4),
        r"unknown quantization option\(s\) 'tgq_group' \(did you mean 'tgq_groups'\?\); the options are",
    ),
    (dict(bogus=1), r"unknown quantization option\(s\) 'bogus'; the options are first_last_bits, h_feedback"),
]


@pytest.mark.parametrize(
    "options, message", BAD_OPTIONS, ids=[next(iter(o)) + "=" + repr(next(iter(o.values()))) for o, _ in BAD_OPTIONS]
)
def test_bad_mapping_options_are_named(options, message):
    options = dict(options)
    bits = {k: options.pop(k) for k in ("w_bits", "a_bits") if k in options}
    with pytest.raises(ValueError, match=message):
        qmamba_ao.get_qconfig_mapping("qmamba", **bits, **options)
    with pytest.raises(ValueError, match=message):
        get_recipe("minmax").x86_qconfig_mapping(**{"w_bits": 8, "a_bits": 8, **bits}, **options)


def test_bad_option_fails_before_the_model_rewrite(vim, images, monkeypatch):
    def no_rewrite(*args, **kwargs):
        raise AssertionError("the rewrite ran before the options were checked")

    monkeypatch.setattr(type(get_recipe("qmamba")), "rewrite", no_rewrite)
    with pytest.raises(ValueError, match="h_feedback='off'"):
        qmamba_ao.quantize(vim, images[:1], "qmamba", 4, 4, progress=False, h_feedback="off")


def test_valid_options_still_accepted_and_defaults_listed():
    assert MAPPING_OPTIONS == dict(
        first_last_bits=8,
        h_feedback=False,
        tgq_groups=8,
        tgq_grouping="uniform",
        tgq_clip="percentile",
        percentile=99.99,
    )
    a = qmamba_ao.get_qconfig_mapping("qmamba", 4, 4).to_dict()
    b = qmamba_ao.get_qconfig_mapping("qmamba", 4, 4, **MAPPING_OPTIONS).to_dict()
    assert repr(a) == repr(b)
    spec = qmamba_ao.get_qconfig_mapping("qmamba", 4, 4, h_feedback=True, tgq_groups=4, tgq_grouping="range")
    from qmamba_ao.ssm import SelectiveScan

    scan_spec = spec.object_type_qconfigs[SelectiveScan].activation
    h = scan_spec.sites["h"]()
    assert scan_spec.h_feedback is True and (h.num_groups, h.grouping) == (4, "range")
    assert qmamba_ao.get_qconfig_mapping("minmax", 4, 4, first_last_bits=None, percentile=100) is not None


def test_options_next_to_an_explicit_mapping_are_refused(vim, images):
    mapping = qmamba_ao.get_qconfig_mapping("minmax", 8, 8)
    with pytest.raises(
        ValueError, match=r"mapping option\(s\) h_feedback have no effect next to an explicit qconfig_mapping"
    ):
        qmamba_ao.prepare(vim, (images[0][:1],), qconfig_mapping=mapping, h_feedback=True)


# -- sub-8-bit activations on torch.ao's x86 lowering -------------------------------------------------------


def test_lowering_refuses_4_bit_activations_before_calibrating(vim, images, monkeypatch):
    monkeypatch.setattr(ptq, "calibrate", lambda *a, **k: pytest.fail("calibrated before refusing"))
    with pytest.raises(ValueError) as info:
        qmamba_ao.quantize(vim, images[:1], "minmax", 4, 4, progress=False, reference=False)
    msg = str(info.value)
    assert msg.startswith("torch.ao's x86 int8 kernels (reference=False) take 7- or 8-bit activations"), msg
    assert "4-bit activations would leave their 16 levels" in msg and "input of layers.0.mixer.in_proj (0..15)" in msg
    assert msg.endswith("use reference=True (quantize's default)"), msg


def test_lowering_refuses_narrow_first_last_layers_and_convert_checks_too(vim, images):
    with pytest.raises(ValueError, match=r"6-bit activations .* input of patch_embed\.proj \(0\.\.63\)"):
        qmamba_ao.quantize(vim, images[:1], "minmax", 8, 8, progress=False, reference=False, first_last_bits=6)
    prepared = ptq.prepare_calibrated(vim, images[:1], "percentile", 8, 6, progress=False)
    with pytest.raises(ValueError, match="6-bit activations would leave their 64 levels"):
        qmamba_ao.convert(copy.deepcopy(prepared), reference=False)
    qmamba_ao.convert(prepared, reference=True)  # the simulated model is fine


def test_lowering_keeps_7_and_8_bit_activations(vim, images):
    for mapping in (None, get_recipe("minmax").x86_qconfig_mapping(8, 8)):
        prepared = ptq.prepare_calibrated(vim, images[:1], "minmax", 8, 8, progress=False, qconfig_mapping=mapping)
        assert ptq.lowering_problem(prepared) is None
        lowered = qmamba_ao.convert(prepared, reference=False)
        assert any(type(m).__module__.startswith("torch.ao.nn.quantized.modules") for m in lowered.modules())


# -- a quantized model run at another input size -----------------------------------------------------------


@pytest.fixture(scope="module")
def vmamba_fmnist():
    return timm.create_model("vmamba_fmnist", pretrained=True).eval()


def test_per_token_model_at_another_input_size_names_the_layer_and_sizes(vmamba_fmnist):
    g = torch.Generator().manual_seed(0)
    q = qmamba_ao.quantize(vmamba_fmnist, [torch.randn(2, 1, 28, 28, generator=g)], "qmamba", 8, 8, progress=False)
    with torch.inference_mode():
        assert q(torch.randn(1, 1, 28, 28, generator=g)).shape == (1, 10)
        with pytest.raises(ValueError) as info:
            q(torch.randn(1, 1, 32, 32, generator=g))
    msg = str(info.value)
    assert msg.startswith("layers.0.blocks.0.op.in_proj") and "static per-token scales calibrated for 49 tokens" in msg
    assert "(calibration input 1x28x28 per image), but got 64 tokens" in msg and "quantize again" in msg, msg


def test_temporal_groups_at_another_input_size_name_the_scan(vmamba_fmnist):
    recipe = replace(get_recipe("minmax"), name="minmax-tgq", h="tgq")  # per-tensor Linear inputs, TGQ on h
    q = qmamba_ao.quantize(vmamba_fmnist, [torch.randn(2, 1, 28, 28)], recipe, 8, 8, progress=False)
    with torch.inference_mode(), pytest.raises(ValueError) as info:
        q(torch.randn(1, 1, 32, 32))
    msg = str(info.value)
    assert msg.startswith("layers.0.blocks.0.op.scan (its h site): TGQ was calibrated on sequences of length 49"), msg
    assert "64" in msg and "calibrated on 1x28x28 inputs per image" in msg, msg


def test_calibration_batches_of_two_sizes_name_the_batch_and_layer(vmamba_fmnist):
    data = [torch.randn(2, 1, 28, 28), torch.randn(2, 1, 32, 32)]
    with pytest.raises(ValueError, match=r"^calibration batch 1: PerTokenObserver \(site 'input of layers\.0\.blocks"):
        qmamba_ao.quantize(vmamba_fmnist, data, "ptq4vm", 8, 8, progress=False)
