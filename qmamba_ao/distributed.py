"""Calibration and evaluation over several processes (``torch.distributed``, e.g. under ``torchrun``).

Each process calibrates on its own shard of the calibration set; :func:`sync_observers`, the one
synchronisation point (called once, after the last calibration batch; nothing is exchanged inside
``forward``), merges every observer's statistics so that all processes end with the same state,
the state one process would have after seeing all of the data. Sampling observers also need to
know, before the first batch, where their process's share starts in the whole calibration order
(``shard=(images_before, batches_before)`` of :func:`qmamba_ao.calibrate`, computed locally by
:func:`calibration_offsets`; no collective): that is what makes their merge exact. Evaluation
splits the test images the same way (:func:`shard_range`: contiguous, no image twice, none
dropped) and gathers the predictions (:func:`gather_predictions`).

Without an initialised process group (or with a group of one process) every function here is a
no-op, or returns its input unchanged.

What is exact, per observer type (statistics compared with one process seeing all the data):

* min/max (torch.ao ``MinMaxObserver`` / ``PerChannelMinMaxObserver``, :class:`PerTokenObserver`,
  :class:`Log2Observer` and the min/max of every other observer): ``all_reduce`` MIN / MAX, exact.
* :class:`PercentileObserver`, :class:`TGQObserver` (histograms over a power-of-two range ``R``):
  every process doubles its range up to the largest ``R`` with the observers' own pairwise bin
  merge, then the counts are summed. The counts are whole numbers in float64, so the sum is exact.
  The histograms are identical to one process's whenever each process's first batch opens the
  range one process had at that batch (the usual case: ``R`` is a power of two). When a process
  starts at a smaller ``R`` and doubles later, a value lying within float32 rounding of a bin edge
  may be counted in the neighbouring bin, which is also what one process gives for another batch
  order. TGQ's per-step min/max (MIN/MAX), value counts (SUM, exact) and sums of squares (SUM in
  float64; equal up to float64 rounding of the summation order, used only by ``grouping="range"``)
  and the number of steps (the longest) are merged as well.
* torch.ao ``HistogramObserver``: min/max exact; each process's histogram is re-binned onto the
  common range with torch.ao's own ``_combine_histograms`` (the interpolation one process applies
  whenever its range grows) and the histograms are summed. One process's histogram already depends
  on the order of its batches, so the result is close to one process's but not bit-identical.
* :class:`MSEObserver`, :class:`LtSQObserver` (bounded reservoir samples): min/max, the number of
  values seen and the ``tail_size`` smallest / largest values are exact. The sample is exact too,
  bit for bit, when each process was told where its share starts before its first batch
  (``shard=`` of :func:`qmamba_ao.calibrate`, :func:`set_shard_offsets`; :func:`calibration_offsets`
  gives it for :func:`calibration_shard`'s split, and :func:`qmamba_ao.api.quantize_model` passes
  it): the shares must be contiguous runs of whole batches in rank order, every batch of the same
  size as in one process, and each sampling observer called once per batch with the same number of
  values per image (true of every site qmamba-ao's recipes observe). Each process then replays the
  random decisions one process makes for its batches (they depend only on the seed, the batch
  index, the values seen before and the batch size) and records which slots it wrote; the merge
  takes every slot from the last process that wrote it, and resolves slots drawn from earlier
  processes' exact data when the exact phase (the first ``sample_size`` values) spans processes.
  The merge checks each share's offsets against the counts of the processes before it and raises
  :class:`DistributedError` when they disagree. Without offsets (a hand-made split, or fewer
  batches than processes) the sample is exact only while all processes together saw at most
  ``sample_size`` values (it is then the data itself); otherwise it is one seeded, deterministic
  draw: each slot picks a process with probability proportional to the values it saw, then a
  uniform element of that process's sample: a sample of the same distribution as one process's,
  not the same values.
* ``LtSQFakeQuantize`` / ``TGQFakeQuantize`` and torch.ao ``FakeQuantize``: their observers are
  merged as above, then their qparams are refreshed from the merged observer.

Stateless observers (``PlaceholderObserver``, ``NoopObserver``, ``ReuseInputObserver``,
``FixedQParamsObserver``) need nothing; an observer type not listed here (a moving average, say)
raises :class:`DistributedError` instead of giving a silently different result.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import (
    FixedQParamsObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    NoopObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    ReuseInputObserver,
)

from .observers import Log2Observer, LtSQObserver, MSEObserver, PercentileObserver, PerTokenObserver, TGQObserver
from .observers._base import ReservoirMixin, ReservoirShard, double_histogram_range, site_label
from .observers._fake_quantize import SyncingFakeQuantize

__all__ = [
    "DistributedError",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "sync_observers",
    "all_reduce_max",
    "shard_range",
    "shard_indices",
    "local_shard",
    "calibration_shard",
    "calibration_offsets",
    "set_shard_offsets",
    "gather_predictions",
    "all_reduce_sum",
    "check_all_succeeded",
    "process_group_from_env",
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
]

#: Seconds a process waits for the others (to start, or at a collective) before giving up.
DEFAULT_TIMEOUT_S = 1800
#: Environment variable overriding :data:`DEFAULT_TIMEOUT_S`.
TIMEOUT_ENV = "QMAMBA_AO_DIST_TIMEOUT"


class DistributedError(RuntimeError):
    """A multi-process run cannot go on: a bad launch environment, or another process stopped."""


# ----------------------------------------------------------------------------------------------
# The group
# ----------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group of more than one process is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a group)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process prints and writes files (rank 0, or the only process)."""
    return rank() == 0


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a collective; a failure (another process stopped, a timeout) becomes a DistributedError."""
    try:
        return fn(*args, **kwargs)
    except DistributedError:
        raise
    except RuntimeError as e:  # torch.distributed's DistError and backend errors are RuntimeErrors
        raise DistributedError(
            f"process {rank()} of {world_size()}: a collective operation failed, most likely because another "
            f"process stopped with an error (see its output) or did not answer within the timeout: {e}"
        ) from None


def _all_reduce(t: Tensor, op: Any) -> Tensor:
    """``all_reduce`` of a copy of ``t`` (any device) on the communication device; returns it on ``t``'s device."""
    buf = t.detach().to(_comm_device()).clone()
    _collective(torch.distributed.all_reduce, buf, op=op)
    return buf.to(t.device)


def _all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable; tensors should be on the CPU), in rank order."""
    out: list[Any] = [None] * world_size()
    _collective(torch.distributed.all_gather_object, out, obj)
    return out


def _check_same(what: str, value: Any) -> None:
    """Raise unless ``value`` is the same on every process (guards the order of the collectives)."""
    values = _all_gather_object(value)
    if any(v != values[0] for v in values):
        differing = [r for r, v in enumerate(values) if v != values[0]]
        raise DistributedError(
            f"{what} differs between processes (processes {differing} differ from process 0); every process "
            "must build the same model with the same recipe and options"
        )


# ----------------------------------------------------------------------------------------------
# Per-type merges (they read and write the observers' buffers)
# ----------------------------------------------------------------------------------------------


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


#: attribute set on a model whose observers were merged (a second merge would count the data twice)
_SYNCED = "_qmamba_observers_synced"


def sync_observers(prepared: nn.Module) -> None:
    """Merge the calibration statistics of every observer in ``prepared`` across processes.

    Call it on every process, once, after the last calibration batch (:func:`qmamba_ao.calibrate`
    does when a process group exists). Afterwards every process holds the statistics one process
    would have after seeing every process's data (see the module docstring for what is exact), and
    fake quantizers hold the matching qparams. A model is merged once: a second call raises (it
    would count the data twice). Without an initialised process group it does nothing.
    Raises :class:`DistributedError` when the processes hold different models, or for an observer
    whose statistics cannot be merged.
    """
    if not is_distributed():
        return
    if getattr(prepared, _SYNCED, False):
        raise DistributedError(
            "this model's observers were already merged across processes; merging again would count the data "
            "twice. Calibrate in one call (chain the batches), or pass sync=False to every "
            "qmamba_ao.calibrate call but the last"
        )
    observers = [(n, m) for n, m in prepared.named_modules() if isinstance(m, ObserverBase)]
    _check_same("the list of observers", [(n, type(m).__name__) for n, m in observers])
    merges = [(n, m, _merge_for(m, n or type(prepared).__name__)) for n, m in observers]
    with torch.no_grad():
        for _, m, fn in merges:
            if fn is not None:
                fn(m)
        for m in prepared.modules():
            if isinstance(m, FakeQuantizeBase):
                _refresh_fake_quant(m)
    setattr(prepared, _SYNCED, True)


def all_reduce_max(stats: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Element-wise MAX of each named tensor over processes (e.g. the smoothing statistics' ``max|X_j|``).

    The names and shapes must agree between processes. Returns the input unchanged without a group.
    """
    if not is_distributed():
        return dict(stats)
    names = sorted(stats)
    _check_same("the smoothed layers and their widths", [(n, tuple(stats[n].shape)) for n in names])
    if not names:
        return {}
    flat = torch.cat([stats[n].detach().reshape(-1).double().cpu() for n in names])
    flat = _all_reduce(flat, torch.distributed.ReduceOp.MAX)
    out, start = {}, 0
    for n in names:
        t = stats[n]
        out[n] = flat[start : start + t.numel()].reshape(t.shape).to(dtype=t.dtype, device=t.device)
        start += t.numel()
    return out


# ----------------------------------------------------------------------------------------------
# Sharding and gathering
# ----------------------------------------------------------------------------------------------


def shard_range(n: int, rank_: Optional[int] = None, world: Optional[int] = None, block: int = 1) -> range:
    """The contiguous part of ``range(n)`` that process ``rank_`` of ``world`` handles.

    Items are dealt in blocks of ``block`` (e.g. a batch size, so that every batch is the batch one
    process would run): ``ceil(n / block)`` blocks split as evenly as possible, the first processes
    taking one block more. The shards of all processes, in rank order, are exactly ``range(n)``:
    nothing padded, repeated or dropped (unlike ``DistributedSampler``); a shard may be empty when
    there are fewer blocks than processes. Defaults: this process and the group's size.
    """
    rank_ = rank() if rank_ is None else int(rank_)
    world = world_size() if world is None else int(world)
    if n < 0 or world < 1 or block < 1 or not 0 <= rank_ < world:
        raise ValueError(f"shard_range needs n >= 0, block >= 1 and 0 <= rank < world; got {n=}, {rank_=}, {world=}")
    blocks = -(-n // block)
    per, extra = divmod(blocks, world)
    first = rank_ * per + min(rank_, extra)
    count = per + (1 if rank_ < extra else 0)
    return range(min(first * block, n), min((first + count) * block, n))


def shard_indices(n: int, rank_: Optional[int] = None, world: Optional[int] = None, block: int = 1) -> Tensor:
    """:func:`shard_range` as an int64 index tensor."""
    r = shard_range(n, rank_, world, block)
    return torch.arange(r.start, r.stop, dtype=torch.int64)


def local_shard(x: Tensor, block: int = 1) -> Tensor:
    """This process's rows of ``x`` (:func:`shard_range` along dim 0); all of ``x`` without a group."""
    r = shard_range(len(x), block=block)
    return x[r.start : r.stop]


def calibration_offsets(n: int, batch: int) -> Optional[tuple[int, int]]:
    """``(images, batches)`` before this process's share of :func:`calibration_shard` (``n`` images,
    batches of ``batch``): pass it as ``shard=`` to :func:`qmamba_ao.calibrate`.

    ``None`` without a group, and when there are fewer batches than processes (the shares are then
    not whole batches of one process's run, and the sampled statistics merge approximately).
    """
    if not is_distributed() or -(-n // batch) < world_size():
        return None
    r = shard_range(n, block=batch)
    return r.start, r.start // batch


def set_shard_offsets(prepared: nn.Module, shard: tuple[int, int], batch_images: int) -> int:
    """Tell every sampling observer of ``prepared`` where this process's calibration share starts.

    ``shard``: ``(images_before, batches_before)``, the images and batches that the processes before
    this one calibrate on (shares are contiguous runs of whole batches, as from
    :func:`calibration_shard`; :func:`calibration_offsets`); ``batch_images``: the images in this
    process's first batch. :func:`qmamba_ao.calibrate` calls it with its ``shard`` argument before
    the first batch. The observers then replay one process's random decisions for these batches,
    and :func:`sync_observers` merges their samples exactly. Returns the number of observers told.
    Without a process group only ``(0, 0)`` is accepted (a later share could never be merged).
    """
    if not isinstance(shard, (tuple, list)) or len(shard) != 2:
        raise ValueError(
            f"shard must be a pair (images_before, batches_before), e.g. from "
            f"qmamba_ao.distributed.calibration_offsets; got {shard!r}"
        )
    images_before, batches_before = shard
    ReservoirShard(images_before, batches_before, batch_images)  # checks the values
    if not is_distributed() and (images_before, batches_before) != (0, 0):
        raise ValueError(
            f"shard offsets ({images_before} images, {batches_before} batches before this process) need an "
            "initialised torch.distributed process group to merge the shares; without one, calibrate on all of "
            "the data with shard=None"
        )
    observers = [m for m in prepared.modules() if isinstance(m, ReservoirMixin)]
    for m in observers:
        m.start_shard(images_before, batches_before, batch_images)
    return len(observers)


def calibration_shard(calib: Tensor, batch: int) -> Tensor:
    """This process's part of the calibration images ``calib`` (the same seeded set on every process).

    Whole batches of ``batch`` images when there are at least as many batches as processes (each
    process then runs exactly the batches one process would), else an even split of the images.
    Raises :class:`DistributedError` when there are fewer images than processes.
    """
    if not is_distributed():
        return calib
    n, world = len(calib), world_size()
    if n < world:
        raise DistributedError(
            f"{n} calibration images cannot be split over {world} processes; use at least {world} images "
            "(e.g. a larger --calib-size) or fewer processes"
        )
    block = batch if -(-n // batch) >= world else n // world
    return local_shard(calib, block)


def gather_predictions(local: Tensor) -> Tensor:
    """Every process's ``local`` (first dimensions may differ), concatenated in rank order.

    With shards from :func:`shard_range` this is the tensor one process would compute on all the
    data. Returns ``local`` without a group.
    """
    if not is_distributed():
        return local
    parts = _all_gather_object(local.detach().cpu())
    return torch.cat(parts).to(local.device)


def all_reduce_sum(values: Any) -> list[int]:
    """Integer SUM over processes of a list of counts (exact)."""
    t = torch.tensor([int(v) for v in values], dtype=torch.int64)
    if not is_distributed():
        return t.tolist()
    return _all_reduce(t, torch.distributed.ReduceOp.SUM).tolist()


def check_all_succeeded(ok: bool = True) -> None:
    """A barrier that also checks every process got here with ``ok``; call it before writing output.

    A process that stopped (error, crash) makes the others fail here (or at an earlier collective)
    with :class:`DistributedError` instead of writing a result the group did not finish.
    """
    if not is_distributed():
        if not ok:
            raise DistributedError("the run did not succeed")
        return
    flag = _all_reduce(torch.tensor([1 if ok else 0], dtype=torch.int64), torch.distributed.ReduceOp.MIN)
    if int(flag) != 1:
        raise DistributedError("another process reported a failure; no output is written")


# ----------------------------------------------------------------------------------------------
# Launch environment
# ----------------------------------------------------------------------------------------------


def _timeout_from_env(env: Mapping[str, str]) -> datetime.timedelta:
    text = env.get(TIMEOUT_ENV)
    if text is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r}: give the timeout in seconds, a positive number")
    return datetime.timedelta(seconds=seconds)


def _world_from_env(env: Mapping[str, str]) -> Optional[tuple[int, int, int]]:
    """``(rank, world size, local rank)`` from a torchrun-style environment; ``None`` for one process."""
    text = env.get("WORLD_SIZE")
    if text is None:
        return None
    try:
        world = int(text)
    except ValueError:
        world = 0
    if world < 1:
        raise DistributedError(f"WORLD_SIZE={text!r}: must be a positive integer (the number of processes)")
    if world == 1:
        return None
    required = ("RANK", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in required if not env.get(k)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world} asks for several processes, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; launch with torchrun (which sets RANK, LOCAL_RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or unset WORLD_SIZE to run one process"
        )
    values = {}
    for key in ("RANK", "LOCAL_RANK", "MASTER_PORT"):
        if key == "LOCAL_RANK" and key not in env:
            values[key] = 0
            continue
        try:
            values[key] = int(env[key])
        except ValueError:
            raise DistributedError(f"{key}={env[key]!r}: must be an integer") from None
    if not 0 <= values["RANK"] < world:
        raise DistributedError(f"RANK={values['RANK']} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if not 0 < values["MASTER_PORT"] < 65536:
        raise DistributedError(f"MASTER_PORT={values['MASTER_PORT']} is not a TCP port (1..65535)")
    if values["LOCAL_RANK"] < 0:
        raise DistributedError(f"LOCAL_RANK={values['LOCAL_RANK']} must be >= 0")
    return values["RANK"], world, values["LOCAL_RANK"]


@contextlib.contextmanager
def process_group_from_env(env: Optional[Mapping[str, str]] = None) -> Iterator[bool]:
    """Initialise a process group from torchrun's environment variables for the ``with`` block.

    Yields whether a group of several processes was started: without ``WORLD_SIZE`` (or with
    ``WORLD_SIZE=1``) nothing happens. Backend NCCL when CUDA is available (each process on GPU
    ``LOCAL_RANK``), else gloo. Processes that do not all arrive within ``QMAMBA_AO_DIST_TIMEOUT``
    seconds (default 1800; the same limit applies to each later collective) fail with
    :class:`DistributedError`. The group is destroyed on exit, also after an error.
    """
    env = os.environ if env is None else env
    world = _world_from_env(env)
    if world is None:
        yield False
        return
    if torch.distributed.is_initialized():
        yield True  # the caller owns the group
        return
    rank_, size, local = world
    timeout = _timeout_from_env(env)
    backend = "gloo"
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local}, but this machine has {torch.cuda.device_count()} GPU(s); start at most that "
                "many processes per machine (--nproc-per-node)"
            )
        torch.cuda.set_device(local)
        backend = "nccl"
    try:
        torch.distributed.init_process_group(backend, rank=rank_, world_size=size, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"process {rank_} of {size} could not join the process group at {env.get('MASTER_ADDR')}:"
            f"{env.get('MASTER_PORT')} within {timeout.total_seconds():.0f} s ({TIMEOUT_ENV}): {e}"
        ) from None
    try:
        yield True
    finally:
        torch.distributed.destroy_process_group()
