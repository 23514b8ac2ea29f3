"""LtSQ / TGQ inside ObservedSelectiveScan -> QuantizedSelectiveScan through torch.ao's FX flow."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.ao.quantization import QConfig, get_default_qconfig_mapping
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from toy_models import TinyMixer

import qmamba_ao
from qmamba_ao.observers import FrozenLtSQ, FrozenTGQ, LtSQFakeQuantize, LtSQObserver, TGQFakeQuantize, TGQObserver
from qmamba_ao.ssm import SelectiveScan
from qmamba_ao.ssm.quantized import ScanQuantSpec

SMALL = dict(sample_size=1024, tail_size=64)


@pytest.mark.parametrize("fake_quant", [False, True])
@pytest.mark.parametrize("h_feedback", [True, False])
def test_fx_flow_with_ltsq_and_tgq(fake_quant, h_feedback):
    torch.manual_seed(0)
    model = TinyMixer(d=8, d_inner=16, n=4).eval()
    act = MinMaxObserver.with_args(dtype=torch.quint8)
    if fake_quant:
        sites = {
            "dA": LtSQFakeQuantize.with_args(quant_min=0, quant_max=15, **SMALL),
            "dBu": LtSQFakeQuantize.with_args(quant_min=0, quant_max=15, **SMALL),
            "h": TGQFakeQuantize.with_args(quant_min=0, quant_max=15, num_groups=4),
        }
    else:
        sites = {
            "dA": LtSQObserver.with_args(bits=4, **SMALL),
            "dBu": LtSQObserver.with_args(bits=4, **SMALL),
            "h": TGQObserver.with_args(num_groups=4, bits=4),
        }
    spec = ScanQuantSpec(act, sites, h_feedback=h_feedback)
    qconfig = QConfig(activation=spec, weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8))
    mapping = get_default_qconfig_mapping("x86").set_object_type(SelectiveScan, qconfig)
    x = torch.randn(2, 10, 8)
    prepared = prepare_fx(copy.deepcopy(model), mapping, (x,), prepare_custom_config=qmamba_ao.prepare_custom_config())
    if fake_quant:  # calibrate with observation only, as a PTQ flow would
        for m in prepared.modules():
            if isinstance(m, (LtSQFakeQuantize, TGQFakeQuantize)):
                m.disable_fake_quant()
    with torch.no_grad():
        for i in range(3):
            prepared(torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(i)))
    h_site = prepared.scan.site_modules["h"]
    steps = h_site.num_steps if not fake_quant else h_site.activation_post_process.num_steps
    assert steps == 10
    converted = convert_fx(copy.deepcopy(prepared), convert_custom_config=qmamba_ao.convert_custom_config())
    sm = converted.scan.site_modules
    assert isinstance(sm["dA"], FrozenLtSQ) and isinstance(sm["dBu"], FrozenLtSQ) and isinstance(sm["h"], FrozenTGQ)
    assert sm["dA"].kind.startswith("unit") and sm["h"].seq_len == 10
    with torch.no_grad():
        ref, out = model(x), converted(x)
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.5
    with pytest.raises(ValueError, match="calibrated on sequences of length 10"):
        with torch.no_grad():
            converted(torch.randn(2, 12, 8))
