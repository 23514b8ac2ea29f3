"""Merging each observer type's statistics across processes (the rules in :mod:`qmamba_ao.distributed`).

Every function here is a collective: all processes call it, in the same order, on the same observer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.ao.quantization.observer import (
    FixedQParamsObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    NoopObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    ReuseInputObserver,
)

from ..observers import Log2Observer, LtSQObserver, MSEObserver, PercentileObserver, PerTokenObserver, TGQObserver
from ..observers._base import double_histogram_range, site_label
from ..observers._fake_quantize import SyncingFakeQuantize
from ._group import DistributedError, _all_gather_object, _all_reduce


def _merge_minmax(obs: nn.Module, lo: str = "min_val", hi: str = "max_val") -> None:
    """MIN / MAX of ``obs.<lo>`` / ``obs.<hi>`` over processes (any shape; empty where nothing was seen)."""
    mn, mx = getattr(obs, lo), getattr(obs, hi)
    shapes = _all_gather_object(tuple(mn.shape))
    seen = [s for s in shapes if s != (0,)]
    if not seen:
        return  # no process observed anything
    if any(s != seen[0] for s in seen):
        raise DistributedError(
            f"{type(obs).__name__}: the processes recorded different shapes {shapes} (a per-token observer "
            "needs the same number of tokens on every process)"
        )
    shape = seen[0]
    if tuple(mn.shape) != shape:  # this process saw nothing
        mn = torch.full(shape, float("inf"), dtype=mn.dtype, device=mn.device)
        mx = torch.full(shape, float("-inf"), dtype=mx.dtype, device=mx.device)
    both = torch.stack([-mn.reshape(-1).double(), mx.reshape(-1).double()])
    both = _all_reduce(both, torch.distributed.ReduceOp.MAX)
    setattr(obs, lo, (-both[0]).to(mn.dtype).reshape(shape))
    setattr(obs, hi, both[1].to(mx.dtype).reshape(shape))


def _merge_power_of_two_histogram(obs: nn.Module) -> None:
    """Histograms of :class:`~qmamba_ao.observers._base.HistogramMixin`: doubled to the common range, summed."""
    hist: Tensor = obs._hist
    r = float(obs.hist_range)
    common = float(_all_reduce(obs.hist_range.double().reshape(1), torch.distributed.ReduceOp.MAX))
    if common == 0.0:
        return  # nothing observed anywhere
    if r == 0.0:
        hist = torch.zeros_like(hist)
    else:
        while r < common:
            hist = double_histogram_range(hist)
            r *= 2.0
        if r != common:
            raise DistributedError(f"{type(obs).__name__}: histogram range {r} cannot reach the common {common}")
    setattr(obs, obs._hist_buffer, _all_reduce(hist, torch.distributed.ReduceOp.SUM))
    obs.hist_range.fill_(common)


def merge_percentile(obs: PercentileObserver) -> None:
    """:class:`PercentileObserver`: exact min/max, histograms on the common range summed."""
    _merge_minmax(obs)
    _merge_power_of_two_histogram(obs)


def merge_tgq(obs: TGQObserver) -> None:
    """:class:`TGQObserver`: the number of steps, per-step min/max, counts, sums of squares and histograms."""
    steps = int(_all_reduce(torch.tensor([obs.num_steps], dtype=torch.int64), torch.distributed.ReduceOp.MAX))
    if steps == 0:
        return
    obs._grow(steps)  # a process that saw shorter (or no) sequences pads with empty steps
    _merge_minmax(obs, "min_step", "max_step")
    obs.sumsq_step = _all_reduce(obs.sumsq_step, torch.distributed.ReduceOp.SUM)
    obs.count_step = _all_reduce(obs.count_step, torch.distributed.ReduceOp.SUM)
    if obs.clip != "minmax":
        _merge_power_of_two_histogram(obs)


def reservoir_part(obs: Any) -> dict[str, Any]:
    """What :func:`combine_reservoir_parts` needs from one process's reservoir observer (on the CPU)."""
    shard = obs._shard
    return {
        "sample": obs.sample.detach().cpu(),
        "tail_lo": obs.tail_lo.detach().cpu(),
        "tail_hi": obs.tail_hi.detach().cpu(),
        "seen": int(obs.seen),
        "batches": int(obs.num_batches),
        "shard": None if shard is None else (shard.values_before, shard.batches_before, shard.refs),
    }


def _exact_sample(obs: Any, parts: list[dict[str, Any]]) -> Tensor:
    """The sample one process would hold, from the shares' replayed samples (see ``ReservoirMixin``).

    In rank order: a share that stayed within the exact phase appends its data; any other share
    overwrites the slots it wrote (its placeholders are NaN), after resolving the slots it drew from
    earlier processes' exact data."""
    cap = obs.sample_size
    cur = torch.empty(0, dtype=torch.float32)
    values = batches = 0
    for p in parts:
        before, batches_before, refs = p["shard"]
        if before != values or batches_before != batches:
            raise DistributedError(
                f"{site_label(obs)}: process {p['rank']} replayed the calibration order from value {before} and "
                f"batch {batches_before}, but the processes before it observed {values} values in {batches} "
                "batches. The shard offsets must count the images and batches of all earlier processes, and the "
                "observer must be called once per batch with the same number of values per image; calibrate "
                "without shard offsets (shard=None) to merge the samples approximately instead"
            )
        sample = p["sample"].to(torch.float32)
        if before + p["seen"] <= cap:  # this share's data is part of the exact data
            cur = torch.cat([cur, sample])
        else:
            sample = sample.clone()
            if refs is not None:
                drawn = refs >= 0
                sample[drawn] = cur[refs[drawn]]  # cur is still the exact data of the earlier processes
            cur = sample if cur.numel() < cap else torch.where(torch.isnan(sample), cur, sample)
        values += p["seen"]
        batches += p["batches"]
    if bool(torch.isnan(cur).any()):
        raise DistributedError(f"{site_label(obs)}: the merged sample has slots no process wrote")
    return cur


def _approximate_sample(obs: Any, parts: list[dict[str, Any]]) -> Tensor:
    """Samples of shares calibrated without shard offsets: exact while they are the data, else a seeded draw."""
    seen = sum(p["seen"] for p in parts)
    if all(p["sample"].numel() == p["seen"] for p in parts) and seen <= obs.sample_size:
        return torch.cat([p["sample"] for p in parts])  # the data itself, in rank order
    g = torch.Generator()
    g.manual_seed((obs.seed * 1_000_003 + sum(p["batches"] for p in parts)) % (2**63 - 1))
    weights = torch.tensor([float(p["seen"]) for p in parts], dtype=torch.float64)
    who = torch.multinomial(weights, obs.sample_size, replacement=True, generator=g)
    sample = torch.empty(obs.sample_size, dtype=torch.float32)
    for i, p in enumerate(parts):
        slots = (who == i).nonzero().reshape(-1)
        idx = torch.randint(p["sample"].numel(), (slots.numel(),), generator=g)
        sample[slots] = p["sample"][idx]
    return sample


def combine_reservoir_parts(obs: Any, parts: list[dict[str, Any]]) -> None:
    """Set ``obs``'s reservoir to the merge of every process's :func:`reservoir_part` (in rank order).

    Count, batches and tails: exact. Sample: one process's, bit for bit, when every process
    calibrated with shard offsets; the documented approximate draw when none did.
    """
    parts = [{**p, "rank": r} for r, p in enumerate(parts) if p["seen"] > 0]
    obs._shard = None
    if not parts:
        return
    sharded = [p["shard"] is not None for p in parts]
    if any(sharded) and not all(sharded):
        raise DistributedError(
            f"{site_label(obs)}: processes {[p['rank'] for p in parts if p['shard'] is None]} calibrated without "
            "shard offsets and the others with them; give every process its offsets (or none)"
        )
    sample = _exact_sample(obs, parts) if all(sharded) else _approximate_sample(obs, parts)
    device = obs.sample.device
    if obs.tail_size:
        k = obs.tail_size
        hi = torch.cat([p["tail_hi"] for p in parts])
        lo = -torch.cat([p["tail_lo"] for p in parts])
        obs.tail_hi = hi.topk(min(k, hi.numel())).values.to(device)
        obs.tail_lo = (-lo.topk(min(k, lo.numel())).values).to(device)
    obs.sample = sample.to(device)
    obs.seen.fill_(sum(p["seen"] for p in parts))
    obs.num_batches.fill_(sum(p["batches"] for p in parts))


def _merge_reservoir(obs: Any) -> None:
    """:class:`~qmamba_ao.observers._base.ReservoirMixin`: every process's part gathered, then combined."""
    combine_reservoir_parts(obs, _all_gather_object(reservoir_part(obs)))


def merge_mse(obs: MSEObserver) -> None:
    """:class:`MSEObserver`: exact min/max, merged reservoir."""
    _merge_minmax(obs)
    _merge_reservoir(obs)


def merge_ltsq(obs: LtSQObserver) -> None:
    """:class:`LtSQObserver`: exact min/max, merged reservoir; the transform search reruns on the merged state."""
    _merge_minmax(obs)
    _merge_reservoir(obs)
    obs._memo = None


def merge_torch_histogram(obs: HistogramObserver) -> None:
    """torch.ao ``HistogramObserver``: exact min/max; histograms re-binned onto the common range and summed."""
    mine = (obs.histogram.detach().cpu(), obs.min_val.detach().cpu(), obs.max_val.detach().cpu())
    parts = [p for p in _all_gather_object(mine) if bool(p[1] <= p[2])]  # drop processes that saw nothing
    if not parts:
        return
    lo = min(p[1] for p in parts)
    hi = max(p[2] for p in parts)
    total = torch.zeros(obs.bins, dtype=parts[0][0].dtype)
    for h, mn, mx in parts:  # in rank order, the same on every process
        if bool(mn == lo) and bool(mx == hi):
            total = total + h
        else:  # torch.ao's own re-binning of a histogram over (mn, mx) onto (lo, hi)
            total = total + obs._combine_histograms(h, mn, mx, torch.zeros_like(total), lo, hi)
    obs.histogram.copy_(total.to(obs.histogram))
    obs.min_val.copy_(lo.to(obs.min_val))
    obs.max_val.copy_(hi.to(obs.max_val))


def merge_minmax(obs: nn.Module) -> None:
    """torch.ao ``MinMaxObserver`` / ``PerChannelMinMaxObserver``, :class:`PerTokenObserver`,
    :class:`Log2Observer`: MIN / MAX, exact."""
    _merge_minmax(obs)


_STATELESS = (PlaceholderObserver, NoopObserver, ReuseInputObserver, FixedQParamsObserver)
_UNMERGEABLE = (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver)

# Order matters: subclasses before their bases.
_MERGES: tuple[tuple[type, Callable[[Any], None]], ...] = (
    (TGQObserver, merge_tgq),
    (LtSQObserver, merge_ltsq),
    (MSEObserver, merge_mse),
    (PercentileObserver, merge_percentile),
    (PerTokenObserver, merge_minmax),
    (Log2Observer, merge_minmax),
    (HistogramObserver, merge_torch_histogram),
    (PerChannelMinMaxObserver, merge_minmax),
    (MinMaxObserver, merge_minmax),
)


def _merge_for(obs: nn.Module, name: str) -> Optional[Callable[[Any], None]]:
    if isinstance(obs, _STATELESS):
        return None
    if isinstance(obs, _UNMERGEABLE):
        raise DistributedError(
            f"{name}: {type(obs).__name__} keeps a moving average, which depends on the order of all batches "
            "and cannot be merged across processes; calibrate in one process or use a min/max observer"
        )
    for cls, fn in _MERGES:
        if isinstance(obs, cls):
            return fn
    raise DistributedError(
        f"{name}: no merge across processes is defined for {type(obs).__name__}; supported: "
        f"{sorted({c.__name__ for c, _ in _MERGES})} (and stateless observers)"
    )


def _refresh_fake_quant(fq: nn.Module) -> None:
    """Recompute a fake quantizer's qparams from its (merged) observer."""
    if isinstance(fq, SyncingFakeQuantize):
        fq._stale = True
        fq._sync()
        return
    obs = getattr(fq, "activation_post_process", None)
    scale, zero_point = getattr(fq, "scale", None), getattr(fq, "zero_point", None)
    if obs is None or not isinstance(scale, Tensor) or not isinstance(zero_point, Tensor):
        return
    mn, mx = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
    if isinstance(mn, Tensor) and (mn.numel() == 0 or not bool((mn <= mx).all())):
        return  # nothing observed: keep the defaults
    new_scale, new_zp = fq.calculate_qparams()
    new_scale, new_zp = new_scale.to(scale.device), new_zp.to(zero_point.device)
    if scale.shape != new_scale.shape:
        scale.resize_(new_scale.shape)
        zero_point.resize_(new_zp.shape)
    scale.copy_(new_scale)
    zero_point.copy_(new_zp)
