"""LtSQ's log2 form: the paper's grids, the choice by calibration error, freezing and state round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from observer_synth import scan_params

from qmamba_ao.observers import (
    FrozenLtSQ,
    FrozenLtSQLog2,
    LtSQFakeQuantize,
    LtSQObserver,
    log2_inverse,
    log2_transform,
)
from qmamba_ao.observers.ltsq import LOG2_KINDS

SMALL = dict(sample_size=4096, tail_size=128)


def _applied_mse(frozen, x):
    with torch.no_grad():
        return float((frozen(x).double() - x.double()).pow(2).mean())


# -- the grids on hand examples ------------------------------------------------------------------


def test_unit_log2_codes_and_levels_are_the_papers():
    x = torch.tensor([0.0, 0.2, 0.3, 0.5, 0.74, 0.8, 0.9, 0.97, 0.999, 0.99999, 1.0])
    frozen = FrozenLtSQLog2("unit_log2", 1.0, torch.ones(1), torch.zeros(1, dtype=torch.int32), 0, 15)
    codes = [min(max(round(-math.log2(1.0 - v)), 0), 15) if v < 1.0 else 15 for v in x.double().tolist()]
    assert codes == [0, 0, 1, 1, 2, 2, 3, 5, 10, 15, 15]
    expected = torch.tensor([1.0 - 2.0**-q for q in codes], dtype=torch.float32)
    assert torch.equal(frozen(x), expected)
    assert torch.equal(frozen.levels(), torch.tensor([1.0 - 2.0**-q for q in range(16)]))
    assert float(frozen(torch.ones(3)).max()) < 1.0  # dA = 1 takes the top code, 1 - 2^-15


def test_signed_log2_is_sign_magnitude_below_the_max():
    # 4 bits: zero and 7 exponents per sign below M = 4, i.e. levels +-4 * 2^-k for k = 0..6
    obs = LtSQObserver(bits=4, form="log2", transform="signed", **SMALL)
    data = torch.tensor([-4.0, -0.3, 0.0, 0.01, 0.06, 0.5, 1.0, 2.0, 3.9] * 20)
    obs(data)
    p = obs.search_log2()
    assert p["param"] == 4.0 / 128 and int(p["zero_point"]) == 8
    frozen = FrozenLtSQLog2("signed_log2", p["param"], torch.ones(1), p["zero_point"], 0, 15)
    levels = frozen.levels()
    magnitudes = [4.0 * 2.0**-k for k in range(7)]
    assert levels.tolist() == [-8.0] + [-m for m in magnitudes] + [0.0] + magnitudes[::-1]  # -8 = -2M: the spare code
    x = torch.tensor([-4.0, -0.3, 0.0, 0.01, 0.03, 0.035, 0.05, 0.5, 1.0, 2.9, 3.9, 100.0])
    # log-domain rounding between levels: 0.3 -> 4 * 2^-4, 2.9 -> 4 (above 4 * 2^-0.5 = 2.83); between 0
    # and the smallest level 0.0625 the midpoint 0.03125; beyond the calibrated max, 4
    assert frozen(x).tolist() == [-4.0, -0.25, 0.0, 0.0, 0.0, 0.0625, 0.0625, 0.5, 1.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize("kind", ["unit_log2", "signed_log2", "uniform"])
def test_frozen_forward_is_inverse_of_grid_of_transform(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5000, generator=g) if kind == "unit_log2" else torch.randn(5000, generator=g) ** 3
    scale = torch.tensor([0.1 if kind == "uniform" else 1.0])
    zp = torch.tensor([3 if kind == "uniform" else (0 if kind == "unit_log2" else 8)], dtype=torch.int32)
    frozen = FrozenLtSQLog2(kind, 0.02, scale, zp, 0, 15)
    t = log2_transform(x, kind, torch.tensor(0.02))
    codes = torch.clamp(torch.round(t / scale) + zp, 0, 15)
    assert torch.equal(frozen(x), log2_inverse(scale * (codes - zp), kind, torch.tensor(0.02)))
    dist = (frozen(x).reshape(-1, 1) - frozen.levels().reshape(1, -1)).abs().amin(1)
    assert float(dist.max()) == 0.0  # every output is one of the 16 levels
    xd = x.double()[x < 1.0] if kind == "unit_log2" else x.double()
    assert torch.allclose(log2_inverse(log2_transform(xd, kind, 0.02), kind, 0.02), xd, rtol=1e-12, atol=1e-12)


# -- the choice --------------------------------------------------------------------------------------


def _piled_near_one(n, g):
    return 1.0 - torch.exp2(-2.0 - 10.0 * torch.rand(n, generator=g))  # 1 - x log-uniform over 2^-12 .. 2^-2


@pytest.mark.parametrize(
    "make, grid, kind",
    [
        (_piled_near_one, "log2", "unit_log2"),
        (lambda n, g: torch.rand(n, generator=g), "uniform", "uniform"),
        (
            lambda n, g: torch.randn(n, generator=g) * torch.exp2(8.0 * torch.rand(n, generator=g)),
            "log2",
            "signed_log2",
        ),
        (lambda n, g: torch.rand(n, generator=g) * 2.0 - 1.0, "uniform", "uniform"),
    ],
)
def test_the_grid_with_the_lower_calibration_error_is_used(make, grid, kind):
    g = torch.Generator().manual_seed(1)
    x = make(3000, g)
    obs = LtSQObserver(bits=4, form="log2", **SMALL)  # the sample holds every value: MSEs are exact
    obs(x)
    p = obs.transform_params()
    assert (p["grid"], p["kind"]) == (grid, kind)
    assert (p["mse_log2"] < p["mse_uniform"]) == (grid == "log2")
    assert p["mse"] == min(p["mse_log2"], p["mse_uniform"])
    assert p["median"] == pytest.approx(float(x.double().median()), abs=1e-6)
    assert int(obs.kind) == LOG2_KINDS[kind]  # mirrored into the buffer
    frozen = obs.to_frozen()
    assert isinstance(frozen, FrozenLtSQLog2) and frozen.kind == kind
    assert _applied_mse(frozen, x) == pytest.approx(p["mse"], rel=1e-4)
    # the grid not chosen really is worse when applied
    if grid == "log2":
        scale, zp = obs._qparams(torch.tensor([float(x.min())]), torch.tensor([float(x.max())]))
        other = FrozenLtSQLog2("uniform", 1.0, scale, zp, 0, 15)
    else:
        domain_kind = "unit_log2" if float(x.min()) >= 0 else "signed_log2"
        param = 1.0 if domain_kind == "unit_log2" else float(x.abs().max()) / 128
        other = FrozenLtSQLog2(domain_kind, param, torch.ones(1), torch.tensor([0 if param == 1.0 else 8]), 0, 15)
    assert _applied_mse(other, x) > _applied_mse(frozen, x)


def test_scan_sites_choose_per_site():
    dA, dBu = scan_params(0)
    a, b = LtSQObserver(bits=4, form="log2", **SMALL), LtSQObserver(bits=4, form="log2", **SMALL)
    a(dA), b(dBu)
    pa, pb = a.transform_params(), b.transform_params()
    assert pa["kind"] in ("unit_log2", "uniform") and pb["kind"] in ("signed_log2", "uniform")
    for p in (pa, pb):
        assert set(p) >= {"median", "mse_log2", "mse_uniform", "grid", "kind", "param", "scale", "zero_point", "mse"}
    assert pa["median"] > 0.5  # dA piles up near 1


def test_searched_form_is_the_default_and_unchanged():
    dA, _ = scan_params(0)
    default, searched = LtSQObserver(bits=4, **SMALL), LtSQObserver(bits=4, form="searched", **SMALL)
    default(dA), searched(dA)
    assert default.form == "searched" and isinstance(default.to_frozen(), FrozenLtSQ)
    assert "grid" not in default.transform_params()
    assert torch.equal(default.to_frozen()(dA), searched.to_frozen()(dA))


def test_bad_form_arguments():
    with pytest.raises(ValueError, match="form must be one of 'searched', 'log2'; got 'paper'"):
        LtSQObserver(form="paper")
    with pytest.raises(ValueError, match="transform='unit_power' names a kind of the searched form"):
        LtSQObserver(form="log2", transform="unit_power")
    with pytest.raises(ValueError, match="log2-form kind must be one of"):
        FrozenLtSQLog2("unit_power", 1.0, torch.ones(1), torch.zeros(1), 0, 15)


# -- state and freezing ------------------------------------------------------------------------------


def test_observer_state_round_trip_gives_the_same_quantizer():
    dA, _ = scan_params(2)
    obs = LtSQObserver(bits=4, form="log2", **SMALL)
    obs(dA)
    fresh = LtSQObserver(bits=4, form="log2", **SMALL)
    fresh.load_state_dict(copy.deepcopy(obs.state_dict()))
    assert torch.equal(fresh.to_frozen()(dA), obs.to_frozen()(dA))


def test_frozen_kind_and_grid_travel_in_the_state_dict():
    a = FrozenLtSQLog2("signed_log2", 0.03, torch.ones(1), torch.tensor([8]), 0, 15)
    b = FrozenLtSQLog2("uniform", 1.0, torch.tensor([0.2]), torch.tensor([3]), 0, 15)
    assert set(a.state_dict()) == {"kind_id", "param", "scale", "zero_point"}
    b.load_state_dict(a.state_dict())
    assert b.kind == "signed_log2"
    x = torch.randn(200)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="unknown LtSQ log2-form kind id 3"):
        b.load_state_dict({**a.state_dict(), "kind_id": torch.tensor([3])})


def test_fake_quantize_in_log2_form():
    _, dBu = scan_params(0)
    ctor = LtSQFakeQuantize.with_args(quant_min=0, quant_max=15, form="log2", **SMALL)
    fq = ctor()
    assert fq.form == "log2" and "form='log2'" in repr(fq)
    y = fq(dBu)
    fq.disable_observer()
    assert int(fq.kind) == LOG2_KINDS[fq.activation_post_process.transform_params()["kind"]]
    frozen = fq.to_frozen()
    assert isinstance(frozen, FrozenLtSQLog2)
    assert torch.equal(frozen(dBu), y)
    fresh = ctor()
    fresh.load_state_dict(copy.deepcopy(fq.state_dict()))
    fresh.disable_observer()
    assert torch.equal(fresh(dBu), y)


def test_converted_model_in_log2_form_reloads_from_other_calibration(vim, images):
    import qmamba_ao

    prepared = qmamba_ao.prepare(vim, (images[0],), "qmamba-ltsq-only", 4, 4, ltsq_form="log2")
    qmamba_ao.calibrate(prepared, images[:2], progress=False)
    a = qmamba_ao.convert(prepared, reference=True)
    sites = [m for m in a.modules() if isinstance(m, FrozenLtSQLog2)]
    assert sites and not any(isinstance(m, FrozenLtSQ) for m in a.modules())
    other = qmamba_ao.prepare(vim, (images[0],), "qmamba-ltsq-only", 4, 4, ltsq_form="log2")
    qmamba_ao.calibrate(other, [images[1] * 3.0], progress=False)
    b = qmamba_ao.convert(other, reference=True)
    b.load_state_dict(a.state_dict())
    assert [m.kind for m in b.modules() if isinstance(m, FrozenLtSQLog2)] == [m.kind for m in sites]
    with torch.inference_mode():
        assert torch.equal(a(images[2]), b(images[2]))
