"""torch.ao contracts shared by every observer, and the baseline observers' own behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.ao.quantization.observer import ObserverBase

from qmamba_ao.observers import (
    Log2Observer,
    LtSQObserver,
    MSEObserver,
    PercentileObserver,
    PerTokenObserver,
    TGQObserver,
)
from qmamba_ao.observers.affine import fake_quantize

SMALL = dict(sample_size=512, tail_size=32)
CTORS = {
    "percentile": PercentileObserver.with_args(percentile=99.0, bits=4),
    "percentile_tails": PercentileObserver.with_args(percentile=99.0, mode="tails", bits=4, bins=64),
    "mse": MSEObserver.with_args(bits=4, **SMALL),
    "log2": Log2Observer.with_args(bits=4),
    "log2_complement": Log2Observer.with_args(bits=3, complement=True),
    "per_token": PerTokenObserver.with_args(token_axis=1, bits=4),
    "ltsq": LtSQObserver.with_args(bits=4, **SMALL),
    "tgq": TGQObserver.with_args(num_groups=3, bits=4),
}


def batches(seed: int = 0, n: int = 3) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 6, 5, 4, generator=g) * (1 + i) + 0.3 * i for i in range(n)]


def feed(obs, data):
    for x in data:
        out = obs(x) if not getattr(obs, "per_step", False) else obs(x, None)
        assert out is x  # torch.ao contract: record and return the input itself
    return obs


def frozen_out(obs, x):
    frozen = obs.to_frozen()
    return frozen(x) if not getattr(frozen, "per_step", False) else frozen(x, None)


def qparams(obs):
    return tuple(obs.calculate_qparams())


@pytest.mark.parametrize("name", list(CTORS))
def test_with_args_builds_an_ao_observer(name):
    obs = CTORS[name]()
    assert isinstance(obs, ObserverBase)
    assert obs.quant_max - obs.quant_min + 1 <= 16


@pytest.mark.parametrize("name", list(CTORS))
def test_forward_returns_input_unchanged(name):
    data = batches()
    copies = [x.clone() for x in data]
    feed(CTORS[name](), data)
    assert all(torch.equal(a, b) for a, b in zip(data, copies))


@pytest.mark.parametrize("name", list(CTORS))
def test_calculate_qparams_is_pure_and_deterministic(name):
    a, b = feed(CTORS[name](), batches()), feed(CTORS[name](), batches())
    first = qparams(a)
    assert all(torch.equal(x, y) for x, y in zip(first, qparams(a)))  # calling twice changes nothing
    assert all(torch.equal(x, y) for x, y in zip(first, qparams(b)))  # same data -> same result
    x = batches(5, 1)[0]
    assert torch.equal(frozen_out(a, x), frozen_out(b, x))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", list(CTORS))
def test_state_dict_loads_into_fresh_observer(name):
    calibrated = feed(CTORS[name](), batches())
    fresh = CTORS[name]()
    fresh.load_state_dict(copy.deepcopy(calibrated.state_dict()))
    assert all(torch.equal(x, y) for x, y in zip(qparams(calibrated), qparams(fresh)))
    x = batches(9, 1)[0]
    assert torch.equal(frozen_out(calibrated, x), frozen_out(fresh, x))
    # and calibration can go on identically after the round trip
    more = batches(3, 2)
    feed(calibrated, more)
    feed(fresh, more)
    assert all(torch.equal(x, y) for x, y in zip(qparams(calibrated), qparams(fresh)))


@pytest.mark.parametrize("name", list(CTORS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_names_the_observer_and_site(name, bad):
    obs = CTORS[name]()
    obs.site_name = "dBu"
    x = batches()[0]
    x[0, 1, 2, 3] = bad
    cls = type(obs).__name__
    with pytest.raises(ValueError, match=rf"{cls} \(site 'dBu'\) observed non-finite"):
        feed(obs, [x])


@pytest.mark.parametrize("name", list(CTORS))
def test_bits_outside_2_to_8_rejected(name):
    with pytest.raises(ValueError, match="bits"):
        CTORS[name](bits=9)
    with pytest.raises(ValueError, match="bits"):
        CTORS[name](bits=1)
    with pytest.raises(ValueError, match="static observer"):
        CTORS[name](is_dynamic=True)


@pytest.mark.parametrize("name", list(CTORS))
def test_empty_observer_warns_and_returns_defaults(name):
    obs = CTORS[name]()
    with pytest.warns(UserWarning, match="before any data"):
        out = obs.calculate_qparams()
    assert torch.all(out[0] > 0)


# -- PercentileObserver ---------------------------------------------------------------------


def test_percentile_matches_exact_quantile_within_a_bin():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4000, generator=g) * s for s in (0.01, 1.0, 30.0)]  # range doubles many times
    obs = PercentileObserver(percentile=99.0, bits=8, bins=1024)
    for x in data:
        obs(x)
    allx = torch.cat(data)
    width = float(obs.hist_range) / obs.bins
    assert float(obs.hist.sum()) == allx.numel()
    assert abs(obs._hist_quantile(0.99, True) - float(torch.quantile(allx.abs(), 0.99))) <= width
    obs_t = PercentileObserver(percentile=99.0, mode="tails", bits=8, bins=1024)
    for x in data:
        obs_t(x)
    lo, hi = obs_t.clip_range()
    assert abs(lo - float(torch.quantile(allx, 0.01))) <= width
    assert abs(hi - float(torch.quantile(allx, 0.99))) <= width


def test_percentile_histogram_is_order_independent_for_power_of_two_ranges():
    # doubling merges bins exactly, so feeding small-then-large equals large-then-small
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1000, generator=g) * 0.1, torch.randn(1000, generator=g) * 100
    o1, o2 = PercentileObserver(bins=64), PercentileObserver(bins=64)
    o1(a), o1(b)
    o2(b), o2(a)
    assert torch.equal(o1.hist, o2.hist) and float(o1.hist_range) == float(o2.hist_range)


def test_percentile_100_is_min_max():
    x = torch.tensor([-3.0, 0.5, 2.0])
    obs = PercentileObserver(percentile=100.0, mode="tails", bits=4)
    obs(x)
    assert obs.clip_range() == (-3.0, 2.0)


# -- MSEObserver -----------------------------------------------------------------------------


def test_mse_observer_beats_or_matches_min_max_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) ** 3
    obs = MSEObserver(bits=4, sample_size=4096, tail_size=256)
    obs(x)
    best, table = obs.search()
    assert best < 1.0 and float(table.min()) < float(table[0])  # clipping helps heavy tails
    minmax = PercentileObserver(percentile=100.0, bits=4)
    minmax(x)
    err = float((obs.to_frozen()(x) - x).pow(2).mean())
    assert err < float((minmax.to_frozen()(x) - x).pow(2).mean())


# -- PerTokenObserver ------------------------------------------------------------------------


def test_per_token_scales_and_frozen_quantizer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g) * (4.0 ** torch.arange(7)).view(1, 7, 1)
    obs = PerTokenObserver(token_axis=1, bits=4)
    obs(x)
    scale, zp = obs.calculate_qparams()
    assert scale.shape == (7,) and obs.ch_axis == 1 and obs.qscheme == torch.per_channel_affine
    assert torch.all(scale[1:] > scale[:-1])  # later tokens have larger ranges here
    y = obs.to_frozen()(x)
    for i in range(7):
        assert torch.equal(y[:, i], fake_quantize(x[:, i], scale[i], zp[i], 0, 15))
    with pytest.raises(ValueError, match="has 8 entries there but 7 scales"):
        obs.to_frozen()(torch.randn(3, 8, 5))


def test_per_token_rejects_length_change_and_negative_axis():
    obs = PerTokenObserver(token_axis=1, bits=4)
    obs(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="calibrated with 5 tokens .* now got 6"):
        obs(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="token_axis must be >= 0"):
        PerTokenObserver(token_axis=-1)


# -- Log2Observer ----------------------------------------------------------------------------


def test_log2_levels_are_powers_of_two():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, generator=g) * 3
    obs = Log2Observer(bits=4)
    obs(x)
    scale = float(obs.calculate_qparams()[0])
    y = obs.to_frozen()(x)
    nz = y[y != 0] / scale
    k = -torch.log2(nz)
    assert torch.allclose(k, k.round(), atol=1e-5) and k.max() <= 14 and k.min() >= 0
    # signed data spends a bit on the sign
    obs_s = Log2Observer(bits=4)
    obs_s(x - 1.5)
    assert obs_s.to_frozen().signed and obs_s.to_frozen().exponents == 7


def test_log2_complement_is_fine_next_to_one():
    x = torch.tensor([1.0, 0.999, 0.99, 0.5, 0.01])
    obs = Log2Observer(bits=4, complement=True)
    obs(x)
    y = obs.to_frozen()(x)
    assert float(y[0]) == 1.0 and abs(float(y[1]) - 0.999) < 5e-4


def test_per_token_observer_works_as_a_torch_ao_activation_observer():
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    qconfig = QConfig(
        activation=PerTokenObserver.with_args(token_axis=1, bits=8),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    x = torch.randn(2, 5, 8)
    prepared = prepare_fx(copy.deepcopy(model), QConfigMapping().set_global(qconfig), (x,))
    prepared(x)
    converted = convert_to_reference_fx(prepared)
    assert "quantize_per_channel" in converted.code
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() < 0.05
