"""End to end through torch.ao's FX flow on a Vim that loads the official reduced reference weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

import qmamba_ao
import qmamba_ao.models  # noqa: F401
from qmamba_ao.ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


@pytest.fixture(scope="module")
def vim(reduced_vim):
    return reduced_vim


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 64, 64, generator=g) for _ in range(3)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_default_x86_mapping_end_to_end(vim, images):
    prepared = prepare_fx(
        copy.deepcopy(vim),
        get_default_qconfig_mapping("x86"),
        (images[0],),
        prepare_custom_config=qmamba_ao.prepare_custom_config(vim),
    )
    observed = [m for m in prepared.modules() if isinstance(m, ObservedSelectiveScan)]
    assert len(observed) == 4  # two blocks x two directions, each one FX leaf
    with torch.inference_mode():
        for x in images[:2]:
            prepared(x)
    cfg = qmamba_ao.convert_custom_config(prepared)
    quantized = convert_fx(copy.deepcopy(prepared), convert_custom_config=cfg)
    reference = convert_to_reference_fx(copy.deepcopy(prepared), convert_custom_config=cfg)
    assert sum(isinstance(m, QuantizedSelectiveScan) for m in quantized.modules()) == 4
    kinds = {type(m).__module__ + "." + type(m).__name__ for m in quantized.modules()}
    assert "torch.ao.nn.quantized.modules.linear.Linear" in kinds  # real x86 int8 linears
    x = images[2]
    with torch.inference_mode():
        ref, q, r = vim(x), quantized(x), reference(x)
    assert torch.isfinite(q).all()
    # The int8 kernels and the reference (fake-quant) graph simulate the same grid.
    assert _rel(q, r) < 0.05
    assert _rel(q, ref) < 1.0


@pytest.mark.parametrize("bits", [(8, 8), (6, 6), (4, 8), (4, 4)])
@pytest.mark.parametrize("recipe", qmamba_ao.list_recipes())
def test_every_recipe_runs_the_standard_flow(vim, images, recipe, bits):
    q = qmamba_ao.quantize(vim, images[:1], recipe=recipe, w_bits=bits[0], a_bits=bits[1], progress=False)
    with torch.inference_mode():
        out = q(images[2])
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_quantize_is_deterministic_and_accepts_pairs(vim, images):
    pairs = [(x, torch.zeros(len(x), dtype=torch.long)) for x in images[:2]]
    a = qmamba_ao.quantize(vim, pairs, recipe="qmamba", w_bits=6, a_bits=6, progress=False)
    b = qmamba_ao.quantize(vim, images[:2], recipe="qmamba", w_bits=6, a_bits=6, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        va, vb = sa[k], sb[k]
        if isinstance(va, torch.Tensor) and va.is_quantized:
            va, vb = va.dequantize(), vb.dequantize()
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k
    with torch.inference_mode():
        assert torch.equal(a(images[2]), b(images[2]))


def test_w8a8_is_closer_to_float_than_w4a4(vim, images):
    with torch.inference_mode():
        ref = vim(images[2])
        errs = {
            bits: _rel(qmamba_ao.quantize(vim, images[:2], "minmax", bits, bits, progress=False)(images[2]), ref)
            for bits in (8, 4)
        }
    assert errs[8] < errs[4]


def test_bad_input_errors(vim, images):
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*qmamba"):
        qmamba_ao.get_qconfig_mapping("nope")
    with pytest.raises(ValueError, match="w_bits=9"):
        qmamba_ao.get_qconfig_mapping("qmamba", w_bits=9)
    with pytest.raises(ValueError, match="a_bits=1"):
        qmamba_ao.get_qconfig_mapping("qmamba", a_bits=1)
    with pytest.raises(ValueError, match="calib_data is empty"):
        qmamba_ao.quantize(vim, [], progress=False)
    with pytest.raises(ValueError, match="calib_data is empty"):
        qmamba_ao.quantize(vim, [], example_inputs=(images[0],), progress=False)
    with pytest.raises(TypeError, match="calibration items"):
        qmamba_ao.quantize(vim, ["not a tensor"], example_inputs=(images[0],), progress=False)


def test_reference_model_keeps_4_bit_activations_on_16_levels(vim, images):
    # Every linear input of a W4A4 reference model must come out of a 0..15 quantize/dequantize
    # pair, also for values beyond the calibrated range (a quint8 container alone would allow 256).
    q = qmamba_ao.quantize(vim, images[:1], "percentile", 4, 4, progress=False)
    seen: list[int] = []
    # the head keeps 8-bit input by default (first_last_bits)
    linears = [m for n, m in q.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("head")]
    assert linears
    hooks = [m.register_forward_pre_hook(lambda _, a: seen.append(a[0].unique().numel())) for m in linears]
    with torch.no_grad():
        q(images[1] * 3.0)  # far outside the calibration range: clipping must hold
    for h in hooks:
        h.remove()
    assert seen and max(seen) <= 16, seen


def test_evaluate_breaks_ties_towards_the_lower_class():
    # two classes share the top logit (as 4-bit outputs often do): the lower index wins, like
    # torch.argmax / numpy.argmax / ONNX ArgMax, so runtimes with equal logits give equal predictions
    logits = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.2, 0.2, 0.2, 0.2], [0.0, 0.3, 0.0, 0.7]])

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits[x.long().flatten()]

    res = qmamba_ao.ptq.evaluate(Fixed(), torch.arange(3.0)[:, None], torch.tensor([2, 0, 3]), progress=False)
    assert res["preds"].tolist() == [1, 0, 3] == logits.argmax(-1).tolist()
    assert res["top1"] == pytest.approx(200 / 3)
    assert res["top5"] == 100.0
