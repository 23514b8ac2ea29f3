"""The scan's class family: one float leaf, its observed / quantized / fake-quantized subclasses, one default."""

import copy

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.observer import MinMaxObserver
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from toy_models import TinyMixer

import qmamba_ao
from qmamba_ao.ssm import DEFAULT_H_FEEDBACK, ScanHooks, SelectiveScan, is_float_scan
from qmamba_ao.ssm.quantized import (
    FakeQuantizedSelectiveScan,
    ObservedSelectiveScan,
    QuantizedSelectiveScan,
    ScanQuantSpec,
)


def _prepared(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyMixer().eval()
    x = torch.randn(4, 12, 16)
    prepared = prepare_fx(
        copy.deepcopy(model),
        get_default_qconfig_mapping("x86"),
        (x,),
        prepare_custom_config=qmamba_ao.prepare_custom_config(),
    )
    with torch.no_grad():
        for i in range(3):
            prepared(torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(i)))
    return model, prepared, x


def _converted(prepared, float_output: bool):
    cfg = qmamba_ao.convert_custom_config(float_output=float_output)
    return convert_fx(copy.deepcopy(prepared), convert_custom_config=cfg)


def test_every_form_is_a_selective_scan_but_only_the_float_one_is_a_float_scan():
    _, prepared, _ = _prepared()
    forms = [prepared.scan, _converted(prepared, False).scan, _converted(prepared, True).scan]
    assert [type(m) for m in forms] == [ObservedSelectiveScan, QuantizedSelectiveScan, FakeQuantizedSelectiveScan]
    assert all(isinstance(m, SelectiveScan) and not is_float_scan(m) for m in forms)
    assert is_float_scan(SelectiveScan(4, 2)) and not is_float_scan(nn.Linear(2, 2))


def test_state_dict_keys_and_parameter_ownership():
    model, prepared, _ = _prepared()
    assert list(prepared.scan.state_dict())[:3] == ["A_log", "D", "delta_bias"]
    sites = {k.split(".")[1] for k in prepared.scan.state_dict() if k.startswith("site_modules.")}
    assert sites == {"dA", "dBu", "h", "y"}
    # The observed scan shares the float scan's parameters; the converted scans hold frozen buffers.
    assert [n for n, _ in prepared.scan.named_parameters()] == ["A_log", "D", "delta_bias"]
    for float_output in (False, True):
        scan = _converted(prepared, float_output).scan
        assert not list(scan.parameters())
        keys = list(scan.state_dict())
        assert keys[:5] == ["A_log", "D", "delta_bias", "output_scale", "output_zero_point"]
        assert {k.split(".")[1] for k in keys if k.startswith("site_modules.")} == sites
        assert not hasattr(scan, "float_output")
    assert torch.equal(prepared.scan.A_log, model.scan.A_log)


def test_building_an_observed_scan_leaves_the_global_rng_alone():
    scan = SelectiveScan(8, 4)
    state = torch.get_rng_state()
    ObservedSelectiveScan(scan, {"h": MinMaxObserver})
    assert torch.equal(torch.get_rng_state(), state)


def test_fake_quantized_output_is_the_dequantized_quantized_output():
    _, prepared, x = _prepared()
    quantized, fake = _converted(prepared, False).scan, _converted(prepared, True).scan
    torch.manual_seed(1)
    args = (torch.randn(2, 32, 6), torch.randn(2, 32, 6), torch.randn(2, 1, 4, 6), torch.randn(2, 1, 4, 6))
    with torch.no_grad():
        q, f = quantized(*args), fake(*args)
    assert q.is_quantized and not f.is_quantized
    assert torch.equal(q.dequantize(), f)


def test_run_is_the_forward_of_the_float_scan():
    torch.manual_seed(0)
    scan = SelectiveScan(8, 4)
    u, delta, z = torch.randn(2, 8, 5), torch.randn(2, 8, 5), torch.randn(2, 8, 5)
    B, C = torch.randn(2, 1, 4, 5), torch.randn(2, 1, 4, 5)
    with torch.no_grad():
        assert torch.equal(scan(u, delta, B, C, z), scan.run(u, delta, B, C, z))
        assert torch.equal(scan.run(u, delta, B, C), scan.run(u, delta, B, C, None, ScanHooks()))


def test_one_h_feedback_default():
    assert DEFAULT_H_FEEDBACK is False
    assert ScanHooks().h_feedback is DEFAULT_H_FEEDBACK
    assert ScanQuantSpec(MinMaxObserver, {"h": MinMaxObserver}).h_feedback is DEFAULT_H_FEEDBACK
    _, prepared, _ = _prepared()  # a plain QConfig (torch.ao's x86 mapping) builds the sites itself
    assert prepared.scan.h_feedback is DEFAULT_H_FEEDBACK
    for recipe in qmamba_ao.list_recipes():
        spec = qmamba_ao.get_qconfig_mapping(recipe, 4, 4).object_type_qconfigs[SelectiveScan]
        if spec is not None:
            assert spec.activation.h_feedback is DEFAULT_H_FEEDBACK, recipe
