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
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase

from ..observers._base import ReservoirMixin, ReservoirShard

# The group and the per-type merges live in submodules; every name stays reachable from here.
from ._group import (  # noqa: F401 (re-exported)
    DistributedError,
    _all_gather_object,
    _all_reduce,
    _check_same,
    _collective,
    _comm_device,
    is_distributed,
    is_main,
    rank,
    world_size,
)
from .merge import (  # noqa: F401 (re-exported)
    _MERGES,
    _STATELESS,
    _UNMERGEABLE,
    _approximate_sample,
    _exact_sample,
    _merge_for,
    _merge_minmax,
    _merge_power_of_two_histogram,
    _merge_reservoir,
    _refresh_fake_quant,
    combine_reservoir_parts,
    merge_ltsq,
    merge_minmax,
    merge_mse,
    merge_percentile,
    merge_tgq,
    merge_torch_histogram,
    reservoir_part,
)

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
