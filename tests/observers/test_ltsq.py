"""LtSQ: transforms, statistics, fake-quant module, freezing, and the site errors it must beat."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from observer_synth import mse, scan_params, site_errors
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from qmamba_ao.observers import FrozenLtSQ, LtSQFakeQuantize, LtSQObserver, ltsq_inverse, ltsq_transform
from qmamba_ao.observers._base import SortedSample
from qmamba_ao.observers.affine import fake_quantize
from qmamba_ao.observers.ltsq import TRANSFORMS

FAST = settings(max_examples=30, deadline=None)
SMALL = dict(sample_size=2048, tail_size=128)


@pytest.fixture(scope="module")
def synth():
    return scan_params(0), scan_params(1), scan_params(7)


@pytest.fixture(scope="module")
def errors4():
    return site_errors(bits=4)


# -- transforms ----------------------------------------------------------------------------


@FAST
@given(
    kind=st.sampled_from(sorted(TRANSFORMS)),
    param=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_transform_inverse_round_trip(kind, param, seed):
    g = torch.Generator().manual_seed(seed)
    if kind.startswith("unit"):
        x = torch.rand(200, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(200, generator=g, dtype=torch.float64) * 5
    t = ltsq_transform(x, kind, param)
    assert torch.allclose(ltsq_inverse(t, kind, param), x, atol=1e-9, rtol=1e-9)
    # monotone: unit kinds decrease in x, signed kinds increase
    order = x.argsort()
    d = t[order].diff()
    assert torch.all(d <= 1e-12) if kind.startswith("unit") else torch.all(d >= -1e-12)


# -- statistics ----------------------------------------------------------------------------


def test_sorted_sample_mse_equals_applied_mse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=g) ** 3
    obs = LtSQObserver(bits=3, sample_size=4096, tail_size=256)  # exact sample: holds all of x
    obs(x)
    choice = obs.search()
    applied = float((obs.to_frozen()(x).double() - x.double()).pow(2).mean())
    assert choice["mse"] == pytest.approx(applied, rel=1e-4)
    # and for a few arbitrary candidates of every shape
    data = SortedSample(x)
    levels = torch.tensor([[-2.0, -0.5, 0.0, 0.7, 3.0]], dtype=torch.float64)
    bounds = (levels[:, 1:] + levels[:, :-1]) / 2
    direct = (levels[0][torch.bucketize(x.double(), bounds[0], right=True)] - x.double()).pow(2).mean()
    assert float(data.mse(levels, bounds)[0]) == pytest.approx(float(direct), rel=1e-9)


def test_reservoir_is_bounded_and_tails_are_exact():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(10000, generator=g) * (i + 1) for i in range(4)]
    obs = LtSQObserver(bits=4, sample_size=1024, tail_size=64)
    for x in data:
        obs(x)
    allx = torch.cat(data)
    assert obs.sample.numel() == 1024 and int(obs.seen) == allx.numel()
    assert torch.equal(obs.tail_hi.sort().values, allx.topk(64).values.sort().values)
    assert torch.equal(obs.tail_lo.sort().values, (-(-allx).topk(64).values).sort().values)
    values, weights = obs._weighted_sample()
    assert float(weights.sum()) == pytest.approx(allx.numel(), rel=1e-9)


def test_small_data_sample_is_exact():
    obs = LtSQObserver(bits=4, sample_size=1024, tail_size=64)
    x = torch.randn(700)
    obs(x)
    assert torch.equal(obs.sample, x)
    assert obs._weighted_sample()[1] is None


def test_auto_transform_follows_the_data(synth):
    (dA, dBu), _, _ = synth
    a, b = LtSQObserver(bits=4, **SMALL), LtSQObserver(bits=4, **SMALL)
    a(dA), b(dBu)
    assert a.transform_params()["kind"].startswith("unit")
    assert b.transform_params()["kind"].startswith("signed")
    assert int(a.kind) == TRANSFORMS[a.transform_params()["kind"]]  # mirrored into buffers
    assert float(a.param) == pytest.approx(a.transform_params()["param"])
    forced = LtSQObserver(bits=4, transform="signed_power", **SMALL)
    forced(dA)
    assert forced.transform_params()["kind"] == "signed_power"


def test_bad_arguments():
    with pytest.raises(ValueError, match="transform must be"):
        LtSQObserver(transform="log")
    with pytest.raises(ValueError, match="families"):
        LtSQObserver(families=("mu",))
    with pytest.raises(ValueError, match="clip_ratios"):
        LtSQObserver(clip_ratios=(1.2,))
    with pytest.raises(ValueError, match="tail_size"):
        LtSQObserver(sample_size=100, tail_size=64)


# -- frozen quantizer ----------------------------------------------------------------------


@pytest.mark.parametrize("site", [0, 1])
def test_frozen_outputs_lie_on_the_lookup_table(synth, site):
    obs = LtSQObserver(bits=4, **SMALL)
    obs(synth[0][site])
    frozen = obs.to_frozen()
    assert isinstance(frozen, FrozenLtSQ)
    x = synth[2][site]
    y = frozen(x)
    lut = frozen.levels()
    assert lut.numel() == 16
    dist = (y.reshape(-1, 1) - lut.reshape(1, -1)).abs().min(1).values
    assert float(dist.max()) <= 1e-5 * max(1.0, float(lut.abs().max()))


@pytest.mark.parametrize("kind", list(TRANSFORMS))
@pytest.mark.parametrize("param", [0.05, 1 / 3, 1.0, 0.5, 0.25, 2.0, 3.0])
def test_inference_path_is_bit_identical_to_transform_fq_inverse(kind, param):
    # The no-grad path works in place on one buffer; it must round exactly like the composed ops.
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4096, generator=g) ** 0.1 if kind.startswith("unit") else torch.randn(4096, generator=g) ** 3
    p, s, z = torch.tensor(param), torch.tensor(0.137), torch.tensor(-3)
    expected = ltsq_inverse(fake_quantize(ltsq_transform(x, kind, p), s, z, -8, 7), kind, p)
    frozen = FrozenLtSQ(kind, param, s, z, -8, 7)
    with torch.no_grad():
        assert torch.equal(frozen(x), expected)
    x.requires_grad_(True)
    assert torch.equal(frozen(x).detach(), expected)  # the autograd path agrees too


def test_frozen_dA_stays_in_unit_interval_and_keeps_one(synth):
    dA = synth[0][0]
    obs = LtSQObserver(bits=3, **SMALL)
    obs(dA)
    y = obs.to_frozen()(torch.cat([dA.reshape(-1), torch.tensor([1.0, 0.0, 1e-30])]))
    assert float(y.max()) <= 1.0 and float(y.min()) >= 0.0
    assert float(y[-3]) == 1.0  # no decay stays exactly no decay


# -- fake-quant module ---------------------------------------------------------------------


def test_fake_quantize_module_contract(synth):
    ctor = LtSQFakeQuantize.with_args(quant_min=0, quant_max=15, transform="unit", **SMALL)
    fq = ctor()
    assert isinstance(fq, FakeQuantizeBase)
    assert fq.quant_min == 0 and fq.quant_max == 15
    dA = synth[0][0]
    fq.disable_fake_quant()
    assert torch.equal(fq(dA), dA)  # observing only
    fq.enable_fake_quant()
    y = fq(dA)  # observes and quantizes with the current choice
    assert not torch.equal(y, dA)
    fq.disable_observer()
    seen = int(fq.activation_post_process.seen)
    y2 = fq(synth[1][0])
    assert int(fq.activation_post_process.seen) == seen
    frozen = fq.to_frozen()
    assert torch.equal(frozen(synth[1][0]), y2)
    sd = fq.state_dict()
    for key in ("scale", "zero_point", "kind", "param", "activation_post_process.sample"):
        assert key in sd
    fresh = ctor()
    fresh.load_state_dict(copy.deepcopy(sd))
    fresh.disable_observer()
    assert torch.equal(fresh(synth[1][0]), y2)
    fq.site_name = "dA"
    assert fq.activation_post_process.site_name == "dA"


def test_fake_quantize_refreshes_when_observer_is_turned_off(synth):
    fq = LtSQFakeQuantize(quant_min=0, quant_max=15, **SMALL)
    fq.disable_fake_quant()
    fq(synth[0][1])
    fq.disable_observer()  # torch.ao.quantization.disable_observer calls this
    assert float(fq.scale) != 1.0
    assert int(fq.kind) == int(fq.activation_post_process.kind)


def test_fake_quantize_rejects_foreign_observer():
    from torch.ao.quantization import MinMaxObserver

    with pytest.raises(TypeError, match="needs an LtSQObserver"):
        LtSQFakeQuantize(observer=MinMaxObserver)


def test_freeze_site_uses_to_frozen(synth):
    from qmamba_ao.ssm.quantized import freeze_site

    obs = LtSQObserver(bits=4, **SMALL)
    obs(synth[0][1])
    assert isinstance(freeze_site(obs), FrozenLtSQ)
    fq = LtSQFakeQuantize(bits=4, **SMALL)
    fq(synth[0][1])
    assert isinstance(freeze_site(fq), FrozenLtSQ)


# -- the errors LtSQ must beat (4 bits, held-out draw) ------------------------------------------


@pytest.mark.parametrize("site", ["dA", "dBu"])
@pytest.mark.parametrize(
    "baseline", ["minmax", "percentile99.99", "percentile99.9_tails", "mse_clip", "log2", "log2_complement"]
)
def test_ltsq_beats_baselines_at_4_bits(errors4, site, baseline):
    row = errors4[site]
    assert row["ltsq"] < row[baseline], (site, row)


def test_ltsq_gain_is_not_only_the_anchor(errors4):
    # the transform search, not just anchoring the grid at dA = 1, carries the gain
    for site in ("dA", "dBu"):
        row = errors4[site]
        assert row["ltsq"] < 0.8 * row["ltsq_uniform_only"], row


def test_ltsq_stable_across_sample_seeds(synth):
    # the stratified sample makes the choice robust to which values the reservoir kept
    x = torch.cat([synth[0][1].reshape(-1), synth[1][1].reshape(-1)])
    errs = []
    for seed in range(3):
        obs = LtSQObserver(bits=4, sample_size=8192, tail_size=512, seed=seed)
        obs(x)
        errs.append(mse(obs.to_frozen(), synth[2][1]))
    assert max(errs) < 1.2 * min(errs), errs


@pytest.mark.parametrize("cls", ["ltsq", "tgq"])
def test_fake_quant_modules_check_bits_and_non_finite(cls):
    from qmamba_ao.observers import TGQFakeQuantize

    ctor = LtSQFakeQuantize if cls == "ltsq" else TGQFakeQuantize
    with pytest.raises(ValueError, match="needs 1 bits"):
        ctor(quant_min=0, quant_max=1)
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        ctor(bits=9)
    fq = ctor(quant_min=0, quant_max=15)
    fq.site_name = "dA" if cls == "ltsq" else "h"
    x = torch.rand(2, 3, 4)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"\(site '{fq.site_name}'\) observed non-finite"):
        fq(x) if cls == "ltsq" else fq(x, 0)


def test_frozen_kind_travels_in_the_state_dict():
    """A converted model's state_dict carries each LtSQ quantizer's kind; older dicts without it still load."""
    from qmamba_ao.observers import FrozenLtSQ

    scale, zp = torch.tensor([0.1]), torch.tensor([0])
    a = FrozenLtSQ("unit_log", 0.05, scale, zp, 0, 15)
    b = FrozenLtSQ("unit_power", 0.5, scale, zp, 0, 15)
    b.load_state_dict(a.state_dict())
    assert b.kind == "unit_log"
    x = torch.rand(64)
    assert torch.equal(a(x), b(x))
    old = {k: v for k, v in a.state_dict().items() if k != "kind_id"}
    c = FrozenLtSQ("unit_power", 0.5, scale, zp, 0, 15)
    c.load_state_dict(old)  # strict: the missing kind keeps the one c was built with
    assert c.kind == "unit_power"
    with pytest.raises(ValueError, match="unknown LtSQ transform id"):
        c.load_state_dict({**a.state_dict(), "kind_id": torch.tensor([99])})


@pytest.mark.parametrize("kind", ["unit_power", "signed_power"])
def test_inference_path_bit_identical_for_every_searched_exponent(kind):
    # The in-place path takes torch's scalar pow kernel except for the exponents pow special-cases;
    # for every exponent the search can pick (and its inverse) the values equal the reference ops.
    from qmamba_ao.observers.ltsq import DEFAULT_GAMMAS

    g = torch.Generator().manual_seed(5)
    x = torch.rand(20000, generator=g) ** 0.1 if kind == "unit_power" else torch.randn(20000, generator=g) ** 3
    s, z = torch.tensor(0.0731), torch.tensor(1)
    for gamma in DEFAULT_GAMMAS + (2.0, 3.0):
        p = torch.tensor(gamma)
        expected = ltsq_inverse(fake_quantize(ltsq_transform(x, kind, p), s, z, -8, 7), kind, p)
        with torch.no_grad():
            assert torch.equal(FrozenLtSQ(kind, gamma, s, z, -8, 7)(x), expected), gamma


def test_observer_reads_time_major_sites_like_contiguous_ones():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 2, 3, 4, generator=g)  # stored (L, b, d, N), handed over as (b, d, L, N)
    a, b = LtSQObserver(bits=4), LtSQObserver(bits=4)
    a(x.permute(1, 2, 0, 3))
    b(x.permute(1, 2, 0, 3).contiguous())
    assert float(a.min_val) == float(b.min_val) and float(a.max_val) == float(b.max_val)
