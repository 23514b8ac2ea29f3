"""Observed / quantized selective scan in torch.ao's FX custom-module flow."""

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx
from toy_models import TinyMixer

import qmamba_ao
from qmamba_ao.observers import FrozenAffineQuant
from qmamba_ao.ssm import SelectiveScan, is_float_scan
from qmamba_ao.ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan, ScanQuantSpec


def _calibrated(mapping=None, seed=0):
    torch.manual_seed(seed)
    model = TinyMixer().eval()
    x = torch.randn(4, 12, 16)
    mapping = mapping or get_default_qconfig_mapping("x86")
    prepared = prepare_fx(copy.deepcopy(model), mapping, (x,), prepare_custom_config=qmamba_ao.prepare_custom_config())
    with torch.no_grad():
        for i in range(3):
            prepared(torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(i)))
    return model, prepared, x


def test_prepare_makes_scan_an_observed_leaf():
    _, prepared, _ = _calibrated()
    assert isinstance(prepared.scan, ObservedSelectiveScan)
    assert set(prepared.scan.site_modules) == {"dA", "dBu", "h", "y"}
    # The recurrence is not traced: the scan is one call_module node.
    targets = [n.target for n in prepared.graph.nodes if n.op == "call_module"]
    assert "scan" in targets
    # Internal observers saw data.
    assert torch.isfinite(prepared.scan.site_modules["h"].min_val)
    assert prepared.scan.site_modules["dA"].max_val <= 1.0


def test_observed_scan_output_equals_float():
    model, prepared, x = _calibrated()
    with torch.no_grad():
        assert torch.allclose(prepared(x), model(x), atol=1e-6)


@pytest.mark.parametrize("reference", [False, True])
def test_convert_stays_close_to_float(reference):
    model, prepared, x = _calibrated()
    convert = convert_to_reference_fx if reference else convert_fx
    converted = convert(copy.deepcopy(prepared), convert_custom_config=qmamba_ao.convert_custom_config())
    assert isinstance(converted.scan, QuantizedSelectiveScan)
    with torch.no_grad():
        ref, out = model(x), converted(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, rel
    if not reference:
        assert "QuantizedLinear" in type(converted.in_proj).__name__ or converted.in_proj._get_name().startswith(
            "QuantizedLinear"
        )


def test_frozen_sites_put_values_on_their_grid():
    _, prepared, _ = _calibrated()
    converted = convert_fx(copy.deepcopy(prepared), convert_custom_config=qmamba_ao.convert_custom_config())
    for name, site in converted.scan.site_modules.items():
        assert isinstance(site, FrozenAffineQuant), name
        x = torch.randn(2, 32, 5, 4) * 3
        q = site(x)
        levels = q / site.scale + site.zero_point
        assert torch.allclose(levels, levels.round(), atol=1e-3), name
        assert levels.min() >= site.quant_min - 1e-3 and levels.max() <= site.quant_max + 1e-3


def test_scan_quant_spec_picks_sites_and_survives_prepare():
    act = MinMaxObserver.with_args(dtype=torch.quint8)
    spec = ScanQuantSpec(
        act, {"u": MinMaxObserver.with_args(dtype=torch.quint8), "h": None, "dA": act}, h_feedback=False
    )
    qconfig = QConfig(activation=spec, weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8))
    mapping = get_default_qconfig_mapping("x86").set_object_type(SelectiveScan, qconfig)
    pickle.loads(pickle.dumps(mapping))  # plain objects only
    _, prepared, x = _calibrated(mapping)
    assert set(prepared.scan.site_modules) == {"u", "dA"}
    assert prepared.scan.h_feedback is False
    converted = convert_fx(copy.deepcopy(prepared), convert_custom_config=qmamba_ao.convert_custom_config())
    assert set(converted.scan.site_modules) == {"u", "dA"}
    converted(x)


def test_scan_quant_spec_rejects_unknown_site():
    with pytest.raises(ValueError, match="unknown scan site"):
        ScanQuantSpec(MinMaxObserver, {"hidden": MinMaxObserver})


def test_custom_configs_reject_models_without_scan():
    with pytest.raises(ValueError, match="contains no SelectiveScan"):
        qmamba_ao.prepare_custom_config(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="contains no ObservedSelectiveScan"):
        qmamba_ao.convert_custom_config(TinyMixer())


def test_prepared_state_dict_reloads_into_fresh_prepare():
    model, prepared, x = _calibrated()
    fresh = prepare_fx(
        copy.deepcopy(model),
        get_default_qconfig_mapping("x86"),
        (x,),
        prepare_custom_config=qmamba_ao.prepare_custom_config(),
    )
    fresh.load_state_dict(prepared.state_dict())
    cfg = qmamba_ao.convert_custom_config()
    a = convert_fx(copy.deepcopy(prepared), convert_custom_config=cfg)(x)
    b = convert_fx(fresh, convert_custom_config=cfg)(x)
    assert torch.equal(a, b)


def test_mapping_without_scan_entry_keeps_scan_float():
    mapping = QConfigMapping().set_object_type(nn.Linear, get_default_qconfig_mapping("x86").global_qconfig)
    _, prepared, x = _calibrated(mapping)
    assert is_float_scan(prepared.scan)
