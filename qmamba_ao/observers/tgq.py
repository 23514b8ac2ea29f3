r"""TGQ: Temporal Group Quantization of the hidden state ``h_t``.

The range of ``h_t`` changes strongly along the scan (it builds up from ``h_0 = 0``, follows the
input's energy and decays with ``dA``), so one per-tensor grid is too coarse for the quiet steps.
TGQ splits the ``L`` steps into ``G`` groups of **consecutive** steps, each with its own affine
parameters:

.. math::

    \hat h_t = \mathrm{FQ}_{s_{g(t)}, z_{g(t)}}(h_t),\qquad
    (s_g, z_g) = \mathrm{qparams}\big(\min_{t \in g} m_t,\ \max_{t \in g} M_t\big)

where ``m_t``/``M_t`` are the per-step min/max over calibration (batch, channels, states) and
``g(t)`` is a step->group index. Expanded per step this is exactly
``fake_quantize_per_channel_affine`` along the time axis, i.e. standard per-axis QDQ.

Clipping: ``h`` has sparse large values; at 4 bits a min/max grid spends its levels on them and
rounds the bulk to a few levels. Each group's range can be clipped using per-step histograms of
the calibration values: ``clip="percentile"`` (the default) at the ``percentile``-th percentile of
the group's ``|h|`` (the rule the recipes' uniform activation observer applies per tensor, here per
group), ``clip="mse"`` at the ratio ``a`` of ``[a m_g, a M_g]`` (from :data:`CLIP_RATIOS`) that
minimises the group's quantization MSE, ``clip="minmax"`` not at all. ``clip="auto"`` (the recipes'
default) takes, per group and for the bit width at hand, whichever of those ratios, the group's
percentile clip and the single percentile-clipped grid of the whole sequence has the least MSE on the
group's histogram: a choice measured on calibration data, never worse there than one uniform grid.

Group formation (``grouping``):

* ``"uniform"``: ``G`` groups of (near) equal length.
* ``"range"``: boundaries minimise the proxy quantization error
  :math:`\sum_g \sum_{t \in g} \min(n_t \Delta_g^2 / 12,\ S_t)` with
  :math:`\Delta_g = (\max(M_g, 0) - \min(m_g, 0)) / (q_{max} - q_{min})`, ``n_t`` the number of
  values seen at step t and ``S_t`` their sum of squares: uniform rounding noise ``Delta^2 / 12``
  per value, capped by the value's own energy (values far below the step round to 0). Solved
  exactly by dynamic programming over contiguous segments (``O(G K^2)`` after merging the steps into
  at most ``max_blocks`` blocks ``K``).

Statistics are updated step by step (``forward(h_t, t)``) or for a block of consecutive steps
stacked on axis 0 (``forward(states, range(t0, t0 + k))``, what the scan calls); the whole sequence
is never stacked. A sequence
length at inference different from calibration raises ``ValueError`` naming both lengths: the
groups are defined on the calibrated time axis and there is no faithful way to stretch them. A
longer sequence fails at the first step beyond the calibrated length; a shorter one is detected
by :class:`FrozenTGQ` when the next sequence starts (``t == 0`` after a sequence that stopped
early) or immediately for stacked input; :meth:`FrozenTGQ.check_length` checks up front.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._base import HistogramMixin, QObserverBase, histogram_quantile, resize_buffers_on_load, storage_order_flat
from ._fake_quantize import SyncingFakeQuantize
from .affine import EPS, bits_of_range, fake_quantize, fake_quantize_steps, qparams_from_minmax
from .grouping import range_groups, uniform_groups

__all__ = ["TGQObserver", "TGQFakeQuantize", "FrozenTGQ", "CLIP_RATIOS"]

#: Clipping ratios of a group's min/max range tried by ``clip="mse"`` (1.0 first: ties keep the full range).
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(15))


class TGQObserver(HistogramMixin, QObserverBase):
    """Per-step statistics of ``h_t`` and temporal groups with their own affine qparams.

    Args:
        num_groups: number of temporal groups ``G`` (clamped to the number of steps).
        grouping: ``"range"`` (DP on the per-step range curve) or ``"uniform"`` (equal sizes).
        time_axis: time axis of *stacked* input ``forward(x)`` (``(batch, dim, L, N)`` -> 2).
        max_blocks: the range DP merges steps into at most this many blocks (bounds its cost).
        clip: ``"percentile"``, ``"mse"``, ``"minmax"`` or ``"auto"`` (how each group's range is clipped).
        percentile: for ``clip="percentile"``, the percentile of a group's ``|h|`` to clip at.
        bins: histogram bins per sign and step for clipping (``2 * bins`` over ``[-R, R]``).
        dtype, qscheme, quant_min, quant_max, bits, eps: the affine grid, as torch.ao.

    ``forward(h_t, t)`` records step ``t`` (per-step min, max, sum of squares, count and, unless
    ``clip="minmax"``, a histogram; buffers of length ``max t + 1``); ``forward(x)`` records a
    stacked sequence. ``calculate_qparams()`` returns
    ``(scale[G], zero_point[G], group_index[L])``; :meth:`per_step_qparams` the same expanded to
    ``L`` steps for per-axis export.
    """

    per_step = True
    accepts_blocks = True  # forward(states, range(t0, t0 + k)) takes k stacked steps at once
    _resizable = ("min_step", "max_step", "sumsq_step", "count_step", "hist_step")
    _hist_buffer = "hist_step"  # one histogram per step (rows grow with the steps seen)

    min_step: Tensor
    max_step: Tensor
    sumsq_step: Tensor
    count_step: Tensor
    hist_step: Tensor

    def __init__(
        self,
        num_groups: int = 8,
        grouping: str = "range",
        time_axis: int = 2,
        max_blocks: int = 256,
        clip: str = "percentile",
        percentile: float = 99.99,
        bins: int = 512,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        bits: Optional[int] = None,
        eps: float = EPS,
        is_dynamic: bool = False,
    ) -> None:
        super().__init__(dtype, qscheme, quant_min, quant_max, bits, eps, is_dynamic)
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1; got {num_groups}")
        if grouping not in ("range", "uniform"):
            raise ValueError(f"grouping must be 'range' or 'uniform'; got {grouping!r}")
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1; got {max_blocks}")
        if clip not in ("percentile", "mse", "minmax", "auto"):
            raise ValueError(f"clip must be 'percentile', 'mse', 'minmax' or 'auto'; got {clip!r}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100]; got {percentile}")
        self.percentile, self.clip = float(percentile), clip
        self.num_groups, self.grouping = int(num_groups), grouping
        self.time_axis, self.max_blocks = int(time_axis), int(max_blocks)
        self.register_buffer("min_step", torch.empty(0))
        self.register_buffer("max_step", torch.empty(0))
        self.register_buffer("sumsq_step", torch.empty(0, dtype=torch.float64))
        self.register_buffer("count_step", torch.empty(0, dtype=torch.float64))
        self._init_histogram(bins, rows=0)

    @property
    def num_steps(self) -> int:
        return self.min_step.numel()

    def _grow(self, length: int) -> None:
        extra = length - self.num_steps
        if extra <= 0:
            return
        dev = self.min_step.device

        def pad(buf: Tensor, fill: float) -> Tensor:
            return torch.cat([buf, torch.full((extra,), fill, dtype=buf.dtype, device=dev)])

        self.min_step = pad(self.min_step, float("inf"))
        self.max_step = pad(self.max_step, float("-inf"))
        self.sumsq_step = pad(self.sumsq_step, 0.0)
        self.count_step = pad(self.count_step, 0.0)
        if self.clip != "minmax":
            rows = self.hist_step.new_zeros(extra, self.hist_step.shape[1])
            self.hist_step = torch.cat([self.hist_step, rows])

    def _record(self, first: int, lo: Tensor, hi: Tensor, sq: Tensor, n: int, steps: Optional[Tensor] = None) -> None:
        self._check_finite(lo, hi, sq)
        last = first + lo.numel()
        self._grow(last)
        sl = slice(first, last)
        dev = self.min_step.device
        self.min_step[sl] = torch.minimum(self.min_step[sl], lo.to(dev, torch.float32))
        self.max_step[sl] = torch.maximum(self.max_step[sl], hi.to(dev, torch.float32))
        self.sumsq_step[sl] += sq.to(dev, torch.float64)
        self.count_step[sl] += float(n)
        if self.clip != "minmax" and steps is not None:
            self._update_histogram(steps, max(-float(lo.min()), float(hi.max())), first)

    def forward(self, x: Tensor, t: Optional[Any] = None) -> Tensor:
        if isinstance(t, range):
            return self.forward_block(x, _block_start(x, t))
        if x.numel() == 0:
            return x
        xd = x.detach()
        if t is None:
            if x.dim() <= self.time_axis:
                raise ValueError(
                    f"{type(self).__name__}: stacked input needs a time axis {self.time_axis}; got shape "
                    f"{tuple(x.shape)} (call forward(h_t, t) for one step)"
                )
            steps = xd.movedim(self.time_axis, 0).reshape(x.shape[self.time_axis], -1)
            lo, hi = torch.aminmax(steps, dim=1)
            sq = steps.float().square().sum(1, dtype=torch.float64)
            self._record(0, lo, hi, sq, steps.shape[1], steps)
        else:
            t = int(t)
            if t < 0:
                raise ValueError(f"step index must be >= 0; got {t}")
            lo, hi = torch.aminmax(xd)
            v = storage_order_flat(xd).float()
            sq = torch.dot(v, v).double()  # one fused pass; per step, so float32 accumulation suffices
            self._record(t, lo.reshape(1), hi.reshape(1), sq.reshape(1), xd.numel(), v.unsqueeze(0))
        return x

    def forward_block(self, x: Tensor, t0: Any = 0) -> Tensor:
        """Record the consecutive steps ``t0, t0 + 1, ...`` stacked on axis 0 (``(steps, ...)``) at
        once: the same statistics as :meth:`forward` called with ``(x[i], t0 + i)`` for each ``i``."""
        t0 = _first_step(x, t0)
        if x.numel() == 0:
            return x
        steps = x.detach().reshape(x.shape[0], -1).float()
        lo, hi = steps.amin(1), steps.amax(1)
        sq = torch.stack([torch.dot(v, v) for v in steps]).double()  # per step, as forward sums it
        self._record(t0, lo, hi, sq, steps.shape[1], steps)
        return x

    # -- qparams -------------------------------------------------------------------------------
    def group_index(self) -> Tensor:
        """Step -> group index (int64, length L) from the recorded statistics."""
        if self.grouping == "uniform":
            return uniform_groups(self.num_steps, self.num_groups)
        return range_groups(
            self.min_step,
            self.max_step,
            self.sumsq_step,
            self.count_step,
            self.num_groups,
            self.quant_min,
            self.quant_max,
            self.symmetric,
            self.max_blocks,
        )

    def _group_qparams(self, index: Tensor) -> tuple[Tensor, Tensor]:
        g = int(index.max()) + 1
        mins = torch.full((g,), float("inf"), dtype=torch.float64)
        maxs = torch.full((g,), float("-inf"), dtype=torch.float64)
        mins = mins.scatter_reduce(0, index, self.min_step.double().cpu(), "amin", include_self=True)
        maxs = maxs.scatter_reduce(0, index, self.max_step.double().cpu(), "amax", include_self=True)
        empty = mins > maxs  # a group whose steps were never observed
        mins, maxs = mins.masked_fill(empty, 0.0), maxs.masked_fill(empty, 0.0)
        if self.clip == "minmax" or self.hist_step.shape[0] != self.num_steps:
            return self._qparams(mins, maxs)
        return self._clipped_qparams(index, mins, maxs)

    def _clipped_qparams(self, index: Tensor, mins: Tensor, maxs: Tensor) -> tuple[Tensor, Tensor]:
        """Per group, the range clipped on the group's histogram (``percentile``, least MSE or ``auto``)."""
        g = mins.numel()
        hist = self.hist_step.double().cpu()
        counts = torch.zeros(g, hist.shape[1], dtype=torch.float64).index_add_(0, index, hist)
        if self.clip == "percentile":  # the PercentileObserver rule, on each group's |h| histogram
            c = histogram_quantile(*self._abs_counts(counts), self.percentile / 100.0)
            return self._qparams(torch.maximum(mins, -c), torch.minimum(maxs, c))
        ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float64)
        lo, hi = (mins[:, None] * ratios), (maxs[:, None] * ratios)  # (groups, candidates)
        if self.clip == "auto":
            # Also the group's percentile clip and the one grid a per-tensor percentile observer would
            # give the whole sequence: on the calibration histograms TGQ is then never worse than that
            # uniform grid, at any bit width.
            c = histogram_quantile(*self._abs_counts(counts), self.percentile / 100.0)
            c_all = histogram_quantile(*self._abs_counts(counts.sum(0, keepdim=True)), self.percentile / 100.0)
            lo_all = torch.maximum(mins.min(), -c_all).expand(g, 1)
            hi_all = torch.minimum(maxs.max(), c_all).expand(g, 1)
            lo = torch.cat([lo, torch.maximum(mins, -c)[:, None], lo_all], 1)
            hi = torch.cat([hi, torch.minimum(maxs, c)[:, None], hi_all], 1)
        k = lo.shape[1]
        scale, zp = self._qparams(lo.reshape(-1), hi.reshape(-1))
        edges = self._hist_edges()
        centers = (edges[1:] + edges[:-1]) / 2
        s, z = scale.double().reshape(g, k, 1), zp.double().reshape(g, k, 1)
        q = torch.clamp(torch.round(centers / s) + z, self.quant_min, self.quant_max)
        err = (((q - z) * s - centers).square() * counts[:, None, :]).sum(-1)  # (groups, candidates)
        best = err.argmin(1)  # first minimum: ratio 1.0 wins ties
        pick = torch.arange(g) * k + best
        return scale[pick], zp[pick]

    def calculate_qparams(self) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """``(scale[G], zero_point[G], group_index[L])``; pure."""
        if self.num_steps == 0:
            self._warn_empty()
            return torch.ones(1), torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)
        index = self.group_index()
        scale, zero_point = self._group_qparams(index)
        return scale, zero_point, index

    def per_step_qparams(self) -> tuple[Tensor, Tensor]:
        """Group qparams expanded to one ``(scale, zero_point)`` per step (per-axis QDQ along time)."""
        scale, zero_point, index = self.calculate_qparams()
        return scale[index], zero_point[index]

    def running_step_qparams(self, t: int) -> tuple[Tensor, Tensor]:
        """Qparams of step ``t`` alone from the statistics so far (used while calibrating)."""
        return self._qparams(self.min_step[t : t + 1].double(), self.max_step[t : t + 1].double())

    def to_frozen(self) -> FrozenTGQ:
        scale, zero_point, index = self.calculate_qparams()
        frozen = FrozenTGQ(scale, zero_point, index, self.quant_min, self.quant_max, self.time_axis)
        return frozen.to(self.eps.device)

    def extra_repr(self) -> str:
        return (
            f"num_groups={self.num_groups}, grouping={self.grouping!r}, clip={self.clip!r}, steps={self.num_steps}, "
            + super().extra_repr()
        )


def _first_step(x: Tensor, t0: Any) -> int:
    t0 = int(t0)
    if t0 < 0:
        raise ValueError(f"step index must be >= 0; got {t0}")
    if x.dim() < 1:
        raise ValueError("a block of steps needs the steps stacked on axis 0; got a 0-d tensor")
    return t0


def _block_start(x: Tensor, steps: range) -> int:
    """First step of ``forward(x, range(t0, t0 + k))``: ``k`` consecutive steps stacked on axis 0."""
    if steps.step != 1 or x.dim() < 1 or len(steps) != x.shape[0]:
        raise ValueError(
            f"a block of steps must be a range of consecutive steps, one per entry of axis 0; got {steps} for a "
            f"tensor of shape {tuple(x.shape)}"
        )
    return steps.start


def _length_error(calibrated: int, got: int, how: str) -> ValueError:
    return ValueError(
        f"TGQ was calibrated on sequences of length {calibrated} but {how} {got}; temporal groups are "
        "defined on the calibrated time axis, so calibrate with the inference sequence length"
    )


def _apply_groups(q: FrozenTGQ | TGQFakeQuantize, x: Tensor, t: Optional[Any]) -> Tensor:
    """Fake-quantize ``x`` with the fixed temporal groups of ``q`` (a :class:`FrozenTGQ` or a frozen
    :class:`TGQFakeQuantize`): its ``scale``/``zero_point`` per group, ``group_index`` per step,
    range and time axis. ``q._groups`` caches ``group_index`` as a list for the per-step lookup."""
    if q._groups is None:
        q._groups = q.group_index.tolist()
    index, time_axis = q.group_index, q.time_axis
    length = index.numel()
    if t is None:
        if x.dim() <= time_axis or x.shape[time_axis] != length:
            got = x.shape[time_axis] if x.dim() > time_axis else 0
            raise _length_error(length, got, "got a stacked sequence of length")
        return fake_quantize(x, q.scale[index], q.zero_point[index], q.quant_min, q.quant_max, axis=time_axis)
    t = int(t)
    if t >= length:
        raise _length_error(length, t + 1, f"got step t={t}, i.e. a sequence of length at least")
    g = q._groups[t]
    return fake_quantize(x, q.scale[g], q.zero_point[g], q.quant_min, q.quant_max)


def _apply_block(q: FrozenTGQ | TGQFakeQuantize, x: Tensor, t0: int) -> Tensor:
    """:func:`_apply_groups` for the consecutive steps ``t0, t0 + 1, ...`` stacked on axis 0."""
    index = q.group_index
    length, last = index.numel(), t0 + x.shape[0]
    if last > length:
        raise _length_error(length, last, f"got steps up to t={last - 1}, i.e. a sequence of length at least")
    groups = index[t0:last]
    return fake_quantize_steps(x, q.scale[groups], q.zero_point[groups], q.quant_min, q.quant_max)


class FrozenTGQ(nn.Module):
    """Fixed temporal-group quantizer; ``forward(h_t, t)`` per step, ``forward(x)`` stacked along
    ``time_axis`` or ``forward(states, range(t0, t0 + k))`` for ``k`` steps stacked on axis 0."""

    per_step = True
    accepts_blocks = True

    scale: Tensor
    zero_point: Tensor
    group_index: Tensor

    def __init__(
        self,
        scale: Tensor,
        zero_point: Tensor,
        group_index: Tensor,
        quant_min: int,
        quant_max: int,
        time_axis: int = 2,
    ) -> None:
        super().__init__()
        bits_of_range(quant_min, quant_max)
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(-1).clone())
        self.register_buffer("group_index", group_index.detach().to(torch.int64).reshape(-1).clone())
        self.quant_min, self.quant_max, self.time_axis = int(quant_min), int(quant_max), int(time_axis)
        self._groups: Optional[list] = None
        self._last_t: Optional[int] = None

    @property
    def seq_len(self) -> int:
        return self.group_index.numel()

    def check_length(self, length: int) -> None:
        """Raise ``ValueError`` unless ``length`` is the calibrated sequence length."""
        if int(length) != self.seq_len:
            raise _length_error(self.seq_len, int(length), "is asked to quantize a sequence of length")

    def forward(self, x: Tensor, t: Optional[Any] = None) -> Tensor:
        if isinstance(t, range):
            return self.forward_block(x, _block_start(x, t))
        if t is not None:
            t = int(t)
            last, self._last_t = self._last_t, None  # stays None if this call raises
            if t == 0 and last is not None and last != self.seq_len - 1:
                raise _length_error(self.seq_len, last + 1, "the previous sequence ended after")
        out = _apply_groups(self, x, t)
        if t is not None:
            self._last_t = t
        return out

    def forward_block(self, x: Tensor, t0: Any = 0) -> Tensor:
        """The steps ``t0, t0 + 1, ...`` stacked on axis 0 at once; same values and length checks as
        :meth:`forward` called step by step."""
        t0 = _first_step(x, t0)
        last, self._last_t = self._last_t, None
        if t0 == 0 and last is not None and last != self.seq_len - 1:
            raise _length_error(self.seq_len, last + 1, "the previous sequence ended after")
        out = _apply_block(self, x, t0)
        self._last_t = t0 + x.shape[0] - 1
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        self._groups, self._last_t = None, None
        resize_buffers_on_load(self, state_dict, prefix, ("scale", "zero_point", "group_index"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"groups={self.scale.numel()}, seq_len={self.seq_len}, quant_min={self.quant_min}, "
            f"quant_max={self.quant_max}"
        )


class TGQFakeQuantize(SyncingFakeQuantize):
    """torch.ao-style fake quantizer around :class:`TGQObserver`; ``forward(h_t, t)``.

    While the observer is on, each step is fake-quantized with its *own* running range (the groups
    are not known until the whole calibration set has been seen, and recomputing the DP at every
    step would be wasteful). Turning the observer off, saving the state or :meth:`to_frozen` fixes
    the groups into the buffers ``scale[G]``, ``zero_point[G]`` and ``group_index[L]``.
    """

    per_step = True
    accepts_blocks = True
    observer_class = TGQObserver
    _resizable = ("scale", "zero_point", "group_index")

    group_index: Tensor

    def __init__(
        self,
        observer: Any = TGQObserver,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        is_dynamic: bool = False,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__(observer, quant_min, quant_max, is_dynamic, observer_kwargs)
        self.time_axis = self.activation_post_process.time_axis
        self.register_buffer("group_index", torch.zeros(0, dtype=torch.int64))
        self._groups: Optional[list] = None

    def _pull_qparams(self) -> None:
        scale, zero_point, index = self.activation_post_process.calculate_qparams()
        dev = self.scale.device
        self.scale = scale.to(dev)
        self.zero_point = zero_point.to(dev)
        self.group_index = index.to(dev)
        self._groups = None

    def forward(self, x: Tensor, t: Optional[Any] = None) -> Tensor:
        if isinstance(t, range):
            return self.forward_block(x, _block_start(x, t))
        obs = self.activation_post_process
        if self.observer_enabled[0] == 1:
            self._observe(x.detach(), t)
            if self.fake_quant_enabled[0] == 1:
                if t is None:
                    lo = obs.min_step[: x.shape[self.time_axis]].double()
                    hi = obs.max_step[: x.shape[self.time_axis]].double()
                    scale, zero_point = qparams_from_minmax(
                        lo, hi, self.quant_min, self.quant_max, obs.symmetric, float(obs.eps)
                    )
                    return fake_quantize(x, scale, zero_point, self.quant_min, self.quant_max, axis=self.time_axis)
                scale, zero_point = obs.running_step_qparams(int(t))
                return fake_quantize(x, scale, zero_point, self.quant_min, self.quant_max)
            return x
        if self.fake_quant_enabled[0] == 1:
            self._sync()
            return _apply_groups(self, x, t)
        return x

    def forward_block(self, x: Tensor, t0: Any = 0) -> Tensor:
        """The steps ``t0, t0 + 1, ...`` stacked on axis 0 at once; same values as :meth:`forward`
        called step by step."""
        t0 = _first_step(x, t0)
        obs = self.activation_post_process
        if self.observer_enabled[0] == 1:
            obs.forward_block(x.detach(), t0)
            self._stale = True
            if self.fake_quant_enabled[0] == 1:
                sl = slice(t0, t0 + x.shape[0])
                scale, zero_point = qparams_from_minmax(
                    obs.min_step[sl].double(),
                    obs.max_step[sl].double(),
                    self.quant_min,
                    self.quant_max,
                    obs.symmetric,
                    float(obs.eps),
                )  # each step's own running range, as forward uses while calibrating
                return fake_quantize_steps(x, scale, zero_point, self.quant_min, self.quant_max)
            return x
        if self.fake_quant_enabled[0] == 1:
            self._sync()
            return _apply_block(self, x, t0)
        return x

    def _frozen(self) -> FrozenTGQ:
        return FrozenTGQ(self.scale, self.zero_point, self.group_index, self.quant_min, self.quant_max, self.time_axis)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        self._groups = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={int(self.fake_quant_enabled)}, observer_enabled={int(self.observer_enabled)}, "
            f"groups={self.scale.numel()}, seq_len={self.group_index.numel()}, quant_min={self.quant_min}, "
            f"quant_max={self.quant_max}"
        )
