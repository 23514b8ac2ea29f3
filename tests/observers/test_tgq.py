"""TGQ: per-step statistics, group formation, length checks, fake-quant module, errors it must beat."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from observer_synth import apply_steps, calibrate_steps, hidden_states, tgq_errors
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from qmamba_ao.observers import (
    FrozenTGQ,
    PercentileObserver,
    TGQFakeQuantize,
    TGQObserver,
    range_groups,
    uniform_groups,
)
from qmamba_ao.observers.affine import fake_quantize

FAST = settings(max_examples=30, deadline=None)


@pytest.fixture(scope="module")
def errors4():
    return tgq_errors(bits=4)


@pytest.fixture(scope="module")
def errors4_minmax():
    return tgq_errors(bits=4, clip="minmax")


def seq(seed=0, b=2, d=3, length=10, n=4):
    g = torch.Generator().manual_seed(seed)
    prof = torch.exp(-torch.arange(length, dtype=torch.float32) / 3)
    return torch.randn(b, d, length, n, generator=g) * prof.view(1, 1, -1, 1)


# -- statistics ----------------------------------------------------------------------------


def test_step_by_step_equals_stacked():
    h = seq()
    a, b = TGQObserver(3, bits=4), TGQObserver(3, bits=4)
    calibrate_steps(a, h)
    assert b(h) is h
    assert a.num_steps == b.num_steps == 10
    for name in ("min_step", "max_step", "count_step"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.allclose(a.sumsq_step, b.sumsq_step)
    assert torch.equal(a.min_step, h.amin((0, 1, 3)))


def test_buffers_grow_to_max_step_seen():
    obs = TGQObserver(2, bits=4)
    obs(torch.randn(2, 3), 4)
    assert obs.num_steps == 5 and int(obs.count_step[4]) == 6 and int(obs.count_step[0]) == 0
    scale, zp, index = obs.calculate_qparams()  # unseen steps do not break the qparams
    assert index.numel() == 5 and torch.all(scale > 0)
    with pytest.raises(ValueError, match="step index must be >= 0"):
        obs(torch.randn(2, 3), -1)


def test_qparams_shapes_and_per_step_expansion():
    obs = calibrate_steps(TGQObserver(4, bits=4), seq(length=12))
    scale, zp, index = obs.calculate_qparams()
    assert scale.shape == zp.shape == (4,) and index.shape == (12,)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32 and index.dtype == torch.int64
    assert torch.all(index.diff() >= 0) and int(index[0]) == 0 and int(index[-1]) == 3  # contiguous groups
    s_step, z_step = obs.per_step_qparams()
    assert torch.equal(s_step, scale[index]) and torch.equal(z_step, zp[index])


def test_frozen_per_step_is_bit_identical_to_per_axis_qdq():
    h = seq(length=12)
    frozen = calibrate_steps(TGQObserver(4, bits=4), h).to_frozen()
    assert frozen.per_step
    stepwise = apply_steps(frozen, h)
    stacked = frozen(h)
    s_step, z_step = frozen.scale[frozen.group_index], frozen.zero_point[frozen.group_index]
    assert torch.equal(stepwise, stacked)
    assert torch.equal(stacked, fake_quantize(h, s_step, z_step, 0, 15, axis=2))


# -- group formation -----------------------------------------------------------------------


@pytest.mark.parametrize("length,groups", [(10, 3), (7, 7), (5, 8), (1, 4), (0, 2)])
def test_uniform_groups(length, groups):
    index = uniform_groups(length, groups)
    assert index.numel() == length
    if length:
        sizes = torch.bincount(index)
        assert sizes.numel() == min(groups, length) and int(sizes.max() - sizes.min()) <= 1


def _proxy(mins, maxs, sq, cnt, index, levels):
    total = 0.0
    for g in index.unique():
        m = index == g
        lo, hi = min(float(mins[m].min()), 0.0), max(float(maxs[m].max()), 0.0)
        d2 = ((hi - lo) / levels) ** 2 / 12
        total += float(torch.minimum(cnt[m] * d2, sq[m]).sum())
    return total


@FAST
@given(length=st.integers(1, 8), groups=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_range_groups_dp_is_optimal(length, groups, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(length, generator=g) * 1.5).double()
    mins, maxs = -scale * torch.rand(length, generator=g).double(), scale
    cnt = torch.full((length,), 10.0, dtype=torch.float64)
    sq = cnt * (scale / 3) ** 2
    index = range_groups(mins, maxs, sq, cnt, groups, 0, 15)
    k = min(groups, length)
    assert torch.all(index.diff() >= 0) and int(index.max()) + 1 == k
    best = float("inf")
    for cuts in itertools.combinations(range(1, length), k - 1):
        idx = torch.zeros(length, dtype=torch.int64)
        for c in cuts:
            idx[c:] += 1
        best = min(best, _proxy(mins, maxs, sq, cnt, idx, 15.0))
    assert _proxy(mins, maxs, sq, cnt, index, 15.0) <= best * (1 + 1e-9) + 1e-15


def test_range_groups_blocks_long_sequences():
    length = 1000
    t = torch.arange(length, dtype=torch.float64)
    mins, maxs = -torch.exp(-t / 100), torch.exp(-t / 100)
    index = range_groups(mins, maxs, maxs**2, torch.ones(length, dtype=torch.float64), 8, 0, 15, max_blocks=64)
    assert index.numel() == length and int(index.max()) == 7 and torch.all(index.diff() >= 0)


def test_range_groups_split_where_the_range_changes():
    # a loud stretch in the middle of quiet steps gets its own group
    maxs = torch.tensor([0.1] * 5 + [10.0] * 3 + [0.1] * 5, dtype=torch.float64)
    index = range_groups(-maxs, maxs, maxs**2 * 50, torch.full((13,), 50.0, dtype=torch.float64), 3, 0, 15)
    assert index.tolist() == [0] * 5 + [1] * 3 + [2] * 5


# -- sequence length -----------------------------------------------------------------------


def test_longer_sequence_raises_naming_both_lengths():
    frozen = calibrate_steps(TGQObserver(2, bits=4), seq(length=6)).to_frozen()
    h = seq(length=8)
    with pytest.raises(ValueError, match="calibrated on sequences of length 6 .* at least 7"):
        apply_steps(frozen, h)
    with pytest.raises(ValueError, match="calibrated on sequences of length 6 .* length 8"):
        frozen(h)


def test_shorter_sequence_detected_when_the_next_one_starts():
    frozen = calibrate_steps(TGQObserver(2, bits=4), seq(length=6)).to_frozen()
    apply_steps(frozen, seq(length=6))
    apply_steps(frozen, seq(length=4))  # not detectable yet: the scan only passes (h_t, t)
    with pytest.raises(ValueError, match="length 6 but the previous sequence ended after 4"):
        frozen(seq(length=6)[:, :, 0], 0)
    with pytest.raises(ValueError, match="length 6 but is asked to quantize a sequence of length 4"):
        frozen.check_length(4)
    frozen.check_length(6)


# -- clipping ------------------------------------------------------------------------------


def _with_outliers(seed: int, length: int = 12) -> torch.Tensor:
    """Heavy-tailed states (a Gaussian scale mixture): a few values far out, as h has."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(64, 8, length, 4, generator=g)
    return h / torch.rand(h.shape, generator=g).add(0.05).sqrt()


def test_mse_clipping_shrinks_ranges_and_beats_min_max_on_held_out_states():
    calib, test = _with_outliers(0), _with_outliers(1)
    clipped = calibrate_steps(TGQObserver(4, "uniform", bits=4, clip="mse"), calib)
    full = calibrate_steps(TGQObserver(4, "uniform", bits=4, clip="minmax"), calib)
    assert clipped.hist_step.shape == (12, 2 * clipped.bins)
    s_clip, s_full = clipped.calculate_qparams()[0], full.calculate_qparams()[0]
    assert torch.all(s_clip < s_full)
    err = {
        k: float((apply_steps(o.to_frozen(), test) - test).square().mean())
        for k, o in (("mse", clipped), ("minmax", full))
    }
    assert err["mse"] < 0.7 * err["minmax"]  # measured: 0.079 vs 0.186


def test_mse_clipping_keeps_full_range_without_tails():
    # a uniform distribution: clipping only adds error, so ratio 1.0 (the exact range) must win
    h = torch.rand(64, 4, 6, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clipped = calibrate_steps(TGQObserver(2, "uniform", bits=4, clip="mse"), h)
    full = calibrate_steps(TGQObserver(2, "uniform", bits=4, clip="minmax"), h)
    assert torch.equal(clipped.calculate_qparams()[0], full.calculate_qparams()[0])


def test_percentile_clipping_of_one_group_equals_the_percentile_observer():
    # the default clip applies the uniform activation observer's rule, per group
    h = _with_outliers(0)
    tgq = TGQObserver(1, bits=4, bins=512)
    tgq(h)
    ref = PercentileObserver(percentile=99.99, bins=512, quant_min=0, quant_max=15)
    ref(h)
    scale, zp, _ = tgq.calculate_qparams()
    ref_scale, ref_zp = ref.calculate_qparams()
    assert tgq.clip == "percentile"
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(zp, ref_zp)
    full = TGQObserver(1, bits=4, clip="minmax")
    full(h)
    assert float(scale) < float(full.calculate_qparams()[0])  # the tails were clipped


def test_histograms_survive_range_growth_and_match_stacked_input():
    small, large = seq(0, length=5) * 0.01, seq(1, length=5) * 100
    stepwise = calibrate_steps(TGQObserver(2, bits=4), small)
    calibrate_steps(stepwise, large)  # range doubles many times: earlier counts are re-binned
    stacked = TGQObserver(2, bits=4)
    stacked(small)
    stacked(large)
    assert float(stepwise.hist_step.sum()) == small.numel() + large.numel()
    assert torch.equal(stepwise.hist_step, stacked.hist_step)
    assert all(torch.equal(a, b) for a, b in zip(stepwise.calculate_qparams(), stacked.calculate_qparams()))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"clip": "mean"}, "clip must be"), ({"bins": 15}, "bins must be"), ({"percentile": 40}, "percentile must be")],
)
def test_bad_clip_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TGQObserver(4, **kwargs)


# -- state_dict ----------------------------------------------------------------------------


def test_state_dict_round_trip_observer_frozen_and_fake_quant():
    h = seq(length=9)
    obs = calibrate_steps(TGQObserver(3, bits=4), h)
    fresh = TGQObserver(3, bits=4)
    fresh.load_state_dict(obs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(obs.calculate_qparams(), fresh.calculate_qparams()))

    frozen = obs.to_frozen()
    fresh_frozen = FrozenTGQ(torch.ones(1), torch.zeros(1), torch.zeros(0, dtype=torch.int64), 0, 15)
    fresh_frozen.load_state_dict(frozen.state_dict())
    assert torch.equal(apply_steps(frozen, h), apply_steps(fresh_frozen, h))

    ctor = TGQFakeQuantize.with_args(quant_min=0, quant_max=15, num_groups=3)
    fq = ctor()
    calibrate_steps(fq, h)
    fq.disable_observer()
    fresh_fq = ctor()
    fresh_fq.load_state_dict(fq.state_dict())
    fresh_fq.disable_observer()
    assert fresh_fq.group_index.numel() == 9
    assert torch.equal(apply_steps(fq, h), apply_steps(fresh_fq, h))


# -- fake-quant module ---------------------------------------------------------------------


def test_fake_quantize_module_contract():
    h = seq(length=8)
    fq = TGQFakeQuantize(quant_min=0, quant_max=15, num_groups=2)
    assert isinstance(fq, FakeQuantizeBase) and fq.per_step
    fq.disable_fake_quant()
    assert torch.equal(apply_steps(fq, h), h)
    fq.enable_fake_quant()
    # while observing, each step uses its own running range
    out = fq(h[:, :, 3], 3)
    s, z = fq.activation_post_process.running_step_qparams(3)
    assert torch.equal(out, fake_quantize(h[:, :, 3], s, z, 0, 15))
    fq.disable_observer()  # fixes the groups
    assert fq.scale.numel() == 2 and fq.group_index.numel() == 8
    y = apply_steps(fq, h)
    assert torch.equal(y, apply_steps(fq.to_frozen(), h))
    fq.site_name = "h"
    assert fq.activation_post_process.site_name == "h"


def test_scan_hooks_drive_tgq_step_by_step():
    from qmamba_ao.ssm import ScanHooks, selective_scan

    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 4, 3, 7
    u, delta = torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g)
    A = -torch.rand(d, n, generator=g) - 0.5
    B, C = torch.randn(b, 1, n, length, generator=g), torch.randn(b, 1, n, length, generator=g)
    obs = TGQObserver(3, bits=8)
    # the observer hands every state back unchanged: the same output as an identity hook
    ref = selective_scan(u, delta, A, B, C, delta_softplus=True, hooks=ScanHooks(h=lambda h, t: h))
    out = selective_scan(u, delta, A, B, C, delta_softplus=True, hooks=ScanHooks(h=lambda h, t: obs(h, t)))
    assert torch.equal(out, ref) and obs.num_steps == length
    frozen = obs.to_frozen()
    q = selective_scan(u, delta, A, B, C, delta_softplus=True, hooks=ScanHooks(h=lambda h, t: frozen(h, t)))
    assert (q - ref).norm() / ref.norm() < 0.05


# -- the errors TGQ must beat ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["decay", "random_walk", "recurrence"])
@pytest.mark.parametrize("groups", [4, 8])
def test_tgq_beats_per_tensor_min_max(errors4, kind, groups):
    row = errors4[kind]
    for grouping in ("uniform", "range"):
        assert row[f"tgq{groups}_{grouping}"] < row["per_tensor_minmax"], row


@pytest.mark.parametrize("kind", ["decay", "random_walk", "recurrence"])
@pytest.mark.parametrize("groups", [4, 8])
def test_range_groups_no_worse_than_uniform(errors4_minmax, kind, groups):
    # the DP minimises the min/max proxy error, so the property holds for unclipped groups
    row = errors4_minmax[kind]
    assert row[f"tgq{groups}_range"] <= row[f"tgq{groups}_uniform"], row


def test_calibration_never_stacks_states():
    # the observer's memory is O(L) (O(L x bins) with its clipping histograms), independent of
    # batch, channels and state size
    obs = TGQObserver(4, bits=4)
    calibrate_steps(obs, hidden_states("decay", 0, b=2, d=8, length=20, n=4))
    sizes = {k: v.numel() for k, v in obs.state_dict().items()}
    assert sizes.pop("hist_step") == 20 * 2 * obs.bins
    assert max(sizes.values()) == 20


def test_length_errors_do_not_poison_the_next_sequence():
    frozen = calibrate_steps(TGQObserver(2, bits=4), seq(length=6)).to_frozen()
    with pytest.raises(ValueError):
        apply_steps(frozen, seq(length=8))
    apply_steps(frozen, seq(length=6))  # a correct sequence afterwards is fine
    apply_steps(frozen, seq(length=3))
    with pytest.raises(ValueError, match="ended after 3"):
        apply_steps(frozen, seq(length=6))
    apply_steps(frozen, seq(length=6))


def test_loading_other_groups_replaces_the_ones_in_use():
    """A frozen quantizer (either kind) that has run with one set of groups follows a loaded state exactly."""
    h = seq(length=9)
    uniform = calibrate_steps(TGQObserver(3, bits=4, grouping="uniform"), h)
    ranged = calibrate_steps(TGQObserver(3, bits=4), h * torch.linspace(3, 0.1, 9).view(1, 1, -1, 1))
    frozen_a, frozen_b = uniform.to_frozen(), ranged.to_frozen()
    assert not torch.equal(frozen_a.group_index, frozen_b.group_index)
    expected = apply_steps(frozen_b, h)
    apply_steps(frozen_a, h)  # uses (and keeps) its own groups
    frozen_a.load_state_dict(frozen_b.state_dict())
    assert torch.equal(apply_steps(frozen_a, h), expected) and torch.equal(frozen_a(h), expected)

    ctor = TGQFakeQuantize.with_args(quant_min=0, quant_max=15, num_groups=3)
    fq_a, fq_b = ctor(grouping="uniform"), ctor()
    for fq, data in ((fq_a, h), (fq_b, h * torch.linspace(3, 0.1, 9).view(1, 1, -1, 1))):
        calibrate_steps(fq, data)
        fq.disable_observer()
    expected = apply_steps(fq_b, h)
    apply_steps(fq_a, h)
    fq_a.load_state_dict(fq_b.state_dict())
    assert torch.equal(apply_steps(fq_a, h), expected) and torch.equal(fq_a(h), expected)


# -- blocks of steps (what the scan hands over) ---------------------------------------------


def test_histc_rows_counts_like_histc():
    from qmamba_ao.observers._base import histc_rows

    g = torch.Generator().manual_seed(0)
    for r in (2.0**-3, 1.0, 16.0):
        edges = torch.linspace(-r, r, 65)
        near = torch.cat([edges, edges.nextafter(edges + 1), edges.nextafter(edges - 1)])
        x = torch.cat([torch.randn(3, 5000, generator=g) * r * 0.6, near.expand(3, -1)], 1)
        x[0, :3] = torch.tensor([float("nan"), r * 1.0000001, -r * 1.0000001])  # not counted
        ref = torch.stack([torch.histc(row, 64, -r, r).double() for row in x])
        assert torch.equal(histc_rows(x.contiguous(), 64, r), ref)
        # covered: every value finite and inside [-r, r], so the range mask may be skipped
        inside = x[1:].clamp(-r, r).contiguous()
        ref_inside = torch.stack([torch.histc(row, 64, -r, r).double() for row in inside])
        assert torch.equal(histc_rows(inside, 64, r, covered=True), ref_inside)


def test_block_observation_equals_step_by_step():
    h = seq(length=9)
    steps, block = TGQObserver(3, bits=4, bins=64), TGQObserver(3, bits=4, bins=64)
    for t in range(9):
        steps(h[:, :, t], t)
    hb = h.permute(2, 0, 1, 3).contiguous()
    block.forward_block(hb[:4], 0)
    block.forward_block(hb[4:], 4)
    for name in ("min_step", "max_step", "sumsq_step", "count_step", "hist_step", "hist_range"):
        assert torch.equal(getattr(steps, name), getattr(block, name)), name
    frozen = block.to_frozen()
    per_step = torch.stack([frozen(hb[t], t) for t in range(9)])
    frozen2 = block.to_frozen()
    assert torch.equal(torch.cat([frozen2.forward_block(hb[:5], 0), frozen2.forward_block(hb[5:], 5)]), per_step)


def test_block_fake_quantize_equals_step_by_step():
    hb = seq(length=6).permute(2, 0, 1, 3).contiguous()
    a, b = TGQFakeQuantize(num_groups=2, bits=4), TGQFakeQuantize(num_groups=2, bits=4)
    ya = torch.stack([a(hb[t], t) for t in range(6)])  # calibrating: each step's running range
    yb = b.forward_block(hb, 0)
    assert torch.equal(ya, yb)
    a.disable_observer()
    b.disable_observer()
    assert torch.equal(torch.stack([a(hb[t], t) for t in range(6)]), b.forward_block(hb, 0))
    assert torch.equal(b(hb[2:5], range(2, 5)), b.forward_block(hb[2:5], 2))  # the module-call form


def test_block_length_errors():
    hb = seq(length=6).permute(2, 0, 1, 3).contiguous()
    obs = TGQObserver(2, bits=4)
    obs.forward_block(hb, 0)
    frozen = obs.to_frozen()
    with pytest.raises(ValueError, match="calibrated on sequences of length 6"):
        frozen.forward_block(hb[:4], 3)  # steps 3..6: one too many
    frozen.forward_block(hb[:4], 0)
    with pytest.raises(ValueError, match="previous sequence ended after 4"):
        frozen.forward_block(hb, 0)
    with pytest.raises(ValueError, match="step index must be >= 0"):
        obs.forward_block(hb, -1)
    with pytest.raises(ValueError, match="one per entry of axis 0"):
        obs(hb, range(0, 2))  # 6 stacked steps, a range of 2


def test_scan_hands_tgq_blocks_with_their_first_step(monkeypatch):
    from qmamba_ao.ssm import ScanHooks, functional, selective_scan

    monkeypatch.setattr(functional, "BLOCK_ELEMS", 2 * 4 * 3 * 3)  # blocks of 3 steps
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 4, 3, 8
    u, delta = torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g)
    A = -torch.rand(d, n, generator=g) - 0.5
    B, C = torch.randn(b, 1, n, length, generator=g), torch.randn(b, 1, n, length, generator=g)
    steps, blocks = TGQObserver(3, bits=8, bins=64), TGQObserver(3, bits=8, bins=64)
    firsts = []

    def block_hook(hs, t0):
        firsts.append((t0, hs.shape[0]))
        return blocks.forward_block(hs, t0)

    selective_scan(u, delta, A, B, C, hooks=ScanHooks(h=lambda h, t: steps(h, t)))
    selective_scan(u, delta, A, B, C, hooks=ScanHooks(h_block=block_hook))
    assert firsts == [(0, 3), (3, 3), (6, 2)]
    assert torch.equal(steps.min_step, blocks.min_step) and torch.equal(steps.hist_step, blocks.hist_step)
    fs, fb = steps.to_frozen(), blocks.to_frozen()
    ys = selective_scan(u, delta, A, B, C, hooks=ScanHooks(h=lambda h, t: fs(h, t)))
    yb = selective_scan(u, delta, A, B, C, hooks=ScanHooks(h=lambda h, t: fb(h, t), h_block=fb.forward_block))
    assert torch.equal(ys, yb)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_auto_clip_never_worse_than_one_percentile_grid(bits):
    """clip='auto' picks per group and bit width by calibration MSE, with the whole sequence's single
    percentile grid among the candidates: its error on the data is not above that grid's."""
    from qmamba_ao.observers import PercentileObserver

    g = torch.Generator().manual_seed(bits)
    steps = [torch.randn(8, 16, 4, generator=g) * (0.2 + t) for t in range(12)]
    steps[5][0, 0, 0] = 60.0  # a sparse outlier
    tgq = TGQObserver(num_groups=4, grouping="uniform", clip="auto", bits=bits)
    single = PercentileObserver(percentile=99.99, bits=bits)
    for t, h in enumerate(steps):
        tgq(h, t)
        single(h)
    frozen, one = tgq.to_frozen(), single.to_frozen()
    err_tgq = sum(float((frozen(h, t) - h).square().sum()) for t, h in enumerate(steps))
    err_one = sum(float((one(h) - h).square().sum()) for h in steps)
    assert err_tgq <= err_one * 1.01, (err_tgq, err_one)
    with pytest.raises(ValueError, match="'auto'"):
        TGQObserver(clip="best")
