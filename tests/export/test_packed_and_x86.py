"""Packed 4-bit / 8-bit weights round trip bit-exactly; the x86 mapping lowers W8A8 like the simulated model."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from toy_models import TinyMixer

from qmamba_ao import ptq
from qmamba_ao.export import to_exportable, x86_qconfig_mapping
from qmamba_ao.export.packed import load_packed, pack_nibbles, quantized_weights, save_packed, unpack_nibbles

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


def _prepared(w_bits: int, a_bits: int, mapping=None) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = TinyMixer().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 12, 16, generator=g) for _ in range(3)]
    prepared = ptq.prepare(model, (batches[0],), "qmamba", w_bits, a_bits, qconfig_mapping=mapping)
    ptq.calibrate(prepared, batches, progress=False)
    return prepared


@pytest.mark.parametrize("qmin, n", [(-8, 7), (0, 8), (-7, 33)])
def test_nibbles_round_trip(qmin, n):
    codes = torch.randint(qmin, qmin + 16, (n,), dtype=torch.int8)
    packed = pack_nibbles(codes, qmin)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 2)
    assert torch.equal(unpack_nibbles(packed, qmin, (n,)), codes)


def test_pack_refuses_more_than_16_levels():
    with pytest.raises(ValueError, match="do not fit 4 bits"):
        pack_nibbles(torch.tensor([-8, 8], dtype=torch.int8), -8)


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_weights_load_back_bit_exactly(bits, tmp_path):
    prepared = _prepared(bits, bits)
    saved = to_exportable(prepared)
    info = save_packed(saved, tmp_path / "q.safetensors")
    assert info["weights"] == len(quantized_weights(saved)) > 0

    fresh = to_exportable(prepared)
    with torch.no_grad():  # make sure the load really replaces the weights
        for mod in quantized_weights(fresh).values():
            mod.weight.add_(1.0)
    load_packed(fresh, tmp_path / "q.safetensors")
    for name, mod in quantized_weights(saved).items():
        assert torch.equal(quantized_weights(fresh)[name].get_quantized_weight(), mod.get_quantized_weight())
    x = torch.randn(3, 12, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), saved(x))


def test_four_bit_file_is_smaller(tmp_path):
    s4 = save_packed(to_exportable(_prepared(4, 4)), tmp_path / "w4.safetensors")["bytes"]
    s8 = save_packed(to_exportable(_prepared(8, 8)), tmp_path / "w8.safetensors")["bytes"]
    assert s4 < s8


def test_x86_mapping_reduces_8_bit_activations_only():
    mapping = x86_qconfig_mapping("qmamba", 8, 8)
    prepared = _prepared(8, 8, mapping)
    maxima = {
        m.quant_max for n, m in prepared.named_modules() if n.rpartition(".")[2].startswith("activation_post_process")
    }
    assert maxima == {127}
    scan = next(m for m in prepared.modules() if type(m).__name__ == "ObservedSelectiveScan")
    assert {m.quant_max for m in scan.site_modules.values()} == {255}  # internal sites keep 8 bits


def test_x86_lowered_w8a8_follows_the_simulated_model():
    prepared = _prepared(8, 8, x86_qconfig_mapping("qmamba", 8, 8))
    lowered = ptq.convert(copy.deepcopy(prepared), reference=False)
    simulated = ptq.convert(copy.deepcopy(prepared), reference=True)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized.modules") for m in lowered.modules())
    x = torch.randn(8, 12, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = lowered(x), simulated(x)
    a = a.dequantize() if a.is_quantized else a
    assert ((a - b).norm() / b.norm()).item() < 0.02
