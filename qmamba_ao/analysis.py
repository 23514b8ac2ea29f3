"""Look inside the float selective scans: the numbers and pictures that motivate LtSQ and TGQ.

QMamba's two quantizers rest on two observations about a trained vision Mamba:

* ``dA = exp(delta * A)`` piles up just below 1 with a long, thin tail towards 0, and
  ``dBu = delta * B * u`` is skewed and heavy-tailed. A uniform grid spends most of its levels on
  the empty tail (motivates LtSQ).
* The range of the hidden state ``h_t`` changes a lot along the scan, so one grid for all steps is
  far too coarse for the quiet steps (motivates TGQ).

:func:`collect_sites` records those tensors from a float model, :func:`site_statistics` turns them
into per-layer numbers, :func:`quantization_error_table` measures how each quantizer copes with
them and :func:`plot_sites` draws the three pictures. Everything runs on the float model only; no
quantized model is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ._utils import batch_input
from .observers import (
    FrozenAffineQuant,
    Log2Observer,
    LtSQObserver,
    MSEObserver,
    PercentileObserver,
    TGQObserver,
    int_range,
    qparams_from_minmax,
)
from .observers._base import ReservoirMixin
from .ssm import ScanHooks, SelectiveScan, is_float_scan

__all__ = [
    "ValueSample",
    "SiteRecord",
    "collect_sites",
    "site_statistics",
    "quantization_error_table",
    "plot_sites",
    "format_table",
]

#: default bound on the values of dA (and of dBu) kept per layer
DEFAULT_SAMPLE_SIZE = 200_000


class ValueSample(ReservoirMixin, nn.Module):
    """A bounded, deterministic uniform subsample of one site plus its exact extremes.

    Statistics on millions of values per layer do not need all of them, but the extremes do
    matter (a min-max grid is set by them), so those are kept exactly. The sample is the
    observers' reservoir (:class:`~qmamba_ao.observers._base.ReservoirMixin`, without its exact
    tails): below ``cap`` values it is the data itself, in arrival order.
    """

    def __init__(self, cap: int = DEFAULT_SAMPLE_SIZE, seed: int = 0) -> None:
        super().__init__()
        self._init_reservoir(cap, seed, tail_size=0)
        self.min, self.max = math.inf, -math.inf

    @property
    def cap(self) -> int:
        return self.sample_size

    @property
    def count(self) -> int:
        return int(self.seen)

    def update(self, x: Tensor) -> None:
        """Merge a batch (all its values, in the tensor's logical order)."""
        flat = x.detach().reshape(-1).to("cpu", torch.float32)
        if flat.numel() == 0:
            return
        lo, hi = torch.aminmax(flat)
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
        self._update_reservoir(flat)

    def extra_repr(self) -> str:
        return f"cap={self.cap}, seed={self.seed}, count={self.count}, min={self.min:.4g}, max={self.max:.4g}"


@dataclass
class SiteRecord:
    """What :func:`collect_sites` keeps for one selective scan.

    ``h_min``/``h_max``/``h_abs_mean`` are per step ``t`` over batch, channels and states (the
    curve TGQ groups). ``h`` is the stacked state ``(b, dim, L, N)`` of the first batch, or ``None``
    when this layer was beyond ``max_h_layers``.
    """

    name: str
    dA: ValueSample
    dBu: ValueSample
    h_min: Tensor = field(default_factory=lambda: torch.empty(0))
    h_max: Tensor = field(default_factory=lambda: torch.empty(0))
    h_abs_mean: Tensor = field(default_factory=lambda: torch.empty(0))
    h: Optional[Tensor] = None
    num_batches: int = 0
    _h_abs_sum: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    _h_count: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))

    @property
    def seq_len(self) -> int:
        return self.h_min.numel()

    def h_range(self) -> Tensor:
        """Per-step range ``max_t - min_t`` of the hidden state."""
        return self.h_max - self.h_min

    def _record_steps(self, lo: Tensor, hi: Tensor, abs_sum: Tensor, count: float) -> None:
        length = lo.numel()
        if self.h_min.numel() < length:  # first batch, or a longer sequence than seen so far
            extra = length - self.h_min.numel()
            self.h_min = torch.cat([self.h_min, torch.full((extra,), math.inf)])
            self.h_max = torch.cat([self.h_max, torch.full((extra,), -math.inf)])
            self._h_abs_sum = torch.cat([self._h_abs_sum, torch.zeros(extra, dtype=torch.float64)])
            self._h_count = torch.cat([self._h_count, torch.zeros(extra, dtype=torch.float64)])
        self.h_min[:length] = torch.minimum(self.h_min[:length], lo)
        self.h_max[:length] = torch.maximum(self.h_max[:length], hi)
        self._h_abs_sum[:length] += abs_sum
        self._h_count[:length] += count
        self.h_abs_mean = (self._h_abs_sum / self._h_count.clamp(min=1.0)).float()


class _ScanRecorder:
    """Per-scan recording hooks; one instance per SelectiveScan, reused for every batch."""

    def __init__(self, record: SiteRecord, keep_h: bool) -> None:
        self.record, self.keep_h = record, keep_h
        self._lo: list[Tensor] = []
        self._hi: list[Tensor] = []
        self._abs: list[Tensor] = []
        self._states: list[Tensor] = []

    def _dA(self, x: Tensor) -> Tensor:
        self.record.dA.update(x)
        return x

    def _dBu(self, x: Tensor) -> Tensor:
        self.record.dBu.update(x)
        return x

    def _h(self, h: Tensor, t: int) -> Tensor:
        # Reduce each step right away: stacking every state of every layer would not fit in memory.
        lo, hi = torch.aminmax(h)
        self._lo.append(lo)
        self._hi.append(hi)
        self._abs.append(h.abs().sum(dtype=torch.float64))
        if self.keep_h and self.record.h is None:
            self._states.append(h.detach().to("cpu", copy=True))
        return h

    def hooks(self) -> ScanHooks:
        return ScanHooks(dA=self._dA, dBu=self._dBu, h=self._h)

    def finish_batch(self, per_step: int) -> None:
        rec = self.record
        if self._lo:
            lo = torch.stack(self._lo).float().cpu()
            hi = torch.stack(self._hi).float().cpu()
            rec._record_steps(lo, hi, torch.stack(self._abs).cpu(), float(per_step))
        if self._states:
            rec.h = torch.stack(self._states, dim=2)  # (b, d, L, N), time on axis 2 like dA/dBu
        rec.num_batches += 1
        self._lo, self._hi, self._abs, self._states = [], [], [], []

    def __call__(self, mod: SelectiveScan, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook: run the same scan again with recording hooks (output left untouched)."""
        names = ("u", "delta", "B", "C", "z")
        inputs = dict(zip(names, args))
        inputs.update(kwargs)
        u = inputs["u"]
        mod.run(u, inputs["delta"], inputs["B"], inputs["C"], inputs.get("z"), self.hooks())
        b, d, _ = u.shape
        self.finish_batch(b * d * mod.d_state)


def _batches(images: Any) -> Iterator[Tensor]:
    """A tensor is one batch; an ``(x, y)`` pair of tensors is one batch; anything else is iterated."""
    if isinstance(images, Tensor):
        yield images
        return
    if (
        isinstance(images, (tuple, list))
        and len(images) == 2
        and all(isinstance(t, Tensor) for t in images)
        and images[0].dim() == 4
        and images[1].dim() <= 1
    ):
        yield images[0]
        return
    for batch in images:
        yield batch_input(batch)


def collect_sites(
    model: nn.Module,
    images: Union[Tensor, Iterable[Any]],
    max_h_layers: Optional[int] = None,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
) -> dict[str, SiteRecord]:
    """Run the float model on ``images`` and record dA, dBu and h of every selective scan.

    The scan's internal tensors exist only inside the functional, so a forward hook on each
    :class:`SelectiveScan` replays ``mod.run`` on the same inputs with recording
    :class:`ScanHooks`. That costs one extra scan per layer but leaves the model and its output
    untouched; the hooks are removed even if the forward fails.

    ``images``: a tensor batch, an ``(x, y)`` pair, or an iterable of either. ``max_h_layers``:
    keep the stacked state ``(b, dim, L, N)`` of the first batch only for the first that many
    scans (``None``: all); it is the only large thing recorded (``b * dim * L * N`` floats per
    layer), so use a small first batch or a small limit on big models.
    """
    scans = [(name, m) for name, m in model.named_modules() if is_float_scan(m)]
    if not scans:
        raise ValueError(f"{type(model).__name__} has no SelectiveScan submodule; nothing to record")
    records: dict[str, SiteRecord] = {}
    handles = []
    was_training = model.training
    try:
        for i, (name, mod) in enumerate(scans):
            rec = SiteRecord(name, ValueSample(sample_size, seed + 2 * i), ValueSample(sample_size, seed + 2 * i + 1))
            records[name] = rec
            keep_h = max_h_layers is None or i < max_h_layers
            handles.append(mod.register_forward_hook(_ScanRecorder(rec, keep_h), with_kwargs=True))
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.inference_mode():
            for x in _batches(images):
                model(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if all(r.num_batches == 0 for r in records.values()):
        raise ValueError("collect_sites got no images (empty iterable)")
    return records


# -- statistics ----------------------------------------------------------------------------------
def _moments(x: Tensor) -> tuple[float, float]:
    """(skewness, excess kurtosis); NaN for constant data, where both are undefined."""
    x = x.double()
    sd = float(x.std(correction=0)) if x.numel() else 0.0
    if sd == 0.0:
        return math.nan, math.nan
    z = (x - x.mean()) / sd
    return float(z.pow(3).mean()), float(z.pow(4).mean() - 3.0)


def _quantiles(x: Tensor, qs: Sequence[float]) -> list[float]:
    if not x.numel():
        return [math.nan] * len(qs)
    return torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64)).tolist()


def site_statistics(records: dict[str, SiteRecord]) -> list[dict[str, Any]]:
    """One row per scan with the shape numbers behind LtSQ (dA, dBu) and TGQ (h).

    * dA: mean, skewness (strongly negative: mass near 1, tail to 0), the fraction ``>= 0.9``, the
      tail mass ``<= 0.5`` and the 1st/50th/99th percentiles.
    * dBu: skewness, excess kurtosis (0 for a Gaussian) and ``max|x| / p99(|x|)``: how far the
      extreme values reach beyond the bulk a uniform grid has to share its levels with.
    * h: the per-step range ``max_t - min_t``; its min and max over t, their ratio and its
      coefficient of variation over t (how much a per-tensor grid overshoots the quiet steps).

    Percentiles and moments come from the bounded sample; min/max values are exact.
    """
    rows = []
    for name, rec in records.items():
        a, bu = rec.dA.sample, rec.dBu.sample
        a_skew, _ = _moments(a)
        p1, p50, p99 = _quantiles(a, (0.01, 0.5, 0.99))
        bu_skew, bu_kurt = _moments(bu)
        (bu_p99,) = _quantiles(bu.abs(), (0.99,))
        bu_amax = max(abs(rec.dBu.min), abs(rec.dBu.max))
        rng = rec.h_range().double()
        r_min, r_max = (float(rng.min()), float(rng.max())) if rng.numel() else (math.nan, math.nan)
        r_mean = float(rng.mean()) if rng.numel() else math.nan
        rows.append(
            {
                "layer": name,
                "dA_min": rec.dA.min,
                "dA_max": rec.dA.max,
                "dA_mean": float(a.double().mean()) if a.numel() else math.nan,
                "dA_skew": a_skew,
                "dA_frac_ge_0.9": float((a >= 0.9).double().mean()) if a.numel() else math.nan,
                "dA_tail_le_0.5": float((a <= 0.5).double().mean()) if a.numel() else math.nan,
                "dA_p1": p1,
                "dA_p50": p50,
                "dA_p99": p99,
                "dBu_skew": bu_skew,
                "dBu_kurtosis": bu_kurt,
                "dBu_tail_ratio": bu_amax / bu_p99 if bu_p99 > 0 else math.inf,
                "h_range_min": r_min,
                "h_range_max": r_max,
                "h_range_ratio": r_max / r_min if r_min > 0 else math.inf,
                "h_range_cv": float(rng.std(correction=0)) / r_mean if r_mean > 0 else math.nan,
            }
        )
    return rows


# -- quantization error --------------------------------------------------------------------------
def _minmax_quant(x: Tensor, bits: int, axis: Optional[int] = None) -> nn.Module:
    """What torch.ao's MinMaxObserver (per tensor) or a per-axis min/max observer would freeze into."""
    qmin, qmax = int_range(bits, signed=False)
    if axis is None:
        lo, hi = torch.aminmax(x)
    else:
        steps = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        lo, hi = torch.aminmax(steps, dim=1)
    scale, zero_point = qparams_from_minmax(lo.reshape(-1), hi.reshape(-1), qmin, qmax)
    return FrozenAffineQuant(scale, zero_point, qmin, qmax, axis=axis)


def _calibrated(observer: nn.Module, x: Tensor) -> nn.Module:
    observer(x)
    return observer.to_frozen()  # type: ignore[operator]


def _mse(quant: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        return float((quant(x).double() - x.double()).pow(2).mean())


def _param_methods(site: str, bits: int, n: int) -> list[tuple[str, Callable[[Tensor], nn.Module]]]:
    # Let the sampling observers keep every recorded value: their search is then exact on it.
    size = max(n, 4096)
    methods: list[tuple[str, Callable[[Tensor], nn.Module]]] = [
        ("minmax", lambda x: _minmax_quant(x, bits)),
        ("percentile", lambda x: _calibrated(PercentileObserver(bits=bits), x)),
        ("mse_clip", lambda x: _calibrated(MSEObserver(bits=bits, sample_size=size), x)),
        ("log2", lambda x: _calibrated(Log2Observer(bits=bits), x)),
    ]
    if site == "dA":
        methods.append(("log2_complement", lambda x: _calibrated(Log2Observer(complement=True, bits=bits), x)))
    methods.append(("ltsq", lambda x: _calibrated(LtSQObserver(bits=bits, sample_size=size), x)))
    return methods


def _h_methods(bits: int, num_groups: int) -> list[tuple[str, Callable[[Tensor], nn.Module]]]:
    # percentile 99.99: the recipes' activation rule, per tensor and (TGQ's default clip) per group
    return [
        ("minmax", lambda x: _minmax_quant(x, bits)),
        ("percentile", lambda x: _calibrated(PercentileObserver(percentile=99.99, bits=bits), x)),
        ("per_step", lambda x: _minmax_quant(x, bits, axis=2)),
        ("tgq_uniform_minmax", lambda x: _calibrated(TGQObserver(num_groups, "uniform", clip="minmax", bits=bits), x)),
        ("tgq_uniform", lambda x: _calibrated(TGQObserver(num_groups, "uniform", bits=bits), x)),
        ("tgq_range", lambda x: _calibrated(TGQObserver(num_groups, "range", bits=bits), x)),
    ]


def quantization_error_table(
    records: dict[str, SiteRecord], bits: int = 4, num_groups: int = 8
) -> list[dict[str, Any]]:
    """MSE of each quantizer, calibrated and evaluated on the recorded values of each layer.

    dA and dBu: min-max, percentile (99.999 of ``|x|``), MSE-optimal clipping, log2 (and log2 of
    ``1 - dA``) and LtSQ, on the bounded sample plus the exact extremes (so min-max sees the true
    range). h: per-tensor min-max and 99.99th percentile, one min-max grid per step, and TGQ with
    ``num_groups`` uniform (unclipped or percentile-clipped) or range-based groups, on the stacked
    first-batch state (open loop: the error of quantizing the float states, not of running the
    recurrence quantized). ``rel_to_minmax`` is the MSE divided
    by min-max's for that layer and site (below 1 = better).
    """
    rows: list[dict[str, Any]] = []
    for name, rec in records.items():
        sites: list[tuple[str, Tensor, list]] = []
        for site, vs in (("dA", rec.dA), ("dBu", rec.dBu)):
            if vs.count == 0:
                continue
            x = torch.cat([vs.sample, torch.tensor([vs.min, vs.max])])
            sites.append((site, x, _param_methods(site, bits, x.numel())))
        if rec.h is not None:
            sites.append(("h", rec.h, _h_methods(bits, num_groups)))
        for site, x, methods in sites:
            site_rows = [{"layer": name, "site": site, "method": m, "mse": _mse(make(x), x)} for m, make in methods]
            base = site_rows[0]["mse"]
            for row in site_rows:
                row["rel_to_minmax"] = row["mse"] / base if base > 0 else math.nan
            rows.extend(site_rows)
    return rows


# -- pictures and tables -------------------------------------------------------------------------
def _pick_layers(records: dict[str, SiteRecord], layers: Optional[Sequence[str]], k: int = 4) -> list[str]:
    names = list(records)
    if layers is not None:
        missing = [n for n in layers if n not in records]
        if missing:
            raise KeyError(f"no record for {missing}; recorded layers: {names}")
        return list(layers)
    if len(names) <= k:
        return names
    return [names[round(i * (len(names) - 1) / (k - 1))] for i in range(k)]  # first, last and evenly between


def plot_sites(records: dict[str, SiteRecord], path: Union[str, Path], layers: Optional[Sequence[str]] = None) -> Path:
    """Save one PNG with three panels: dA histogram, dBu histogram, per-step range of h.

    Log-scale counts make the thin tails visible next to the bulk (dA near 1, dBu near 0); the
    log-scale h range over t shows how far the steps differ, which is what TGQ exploits.
    ``layers``: record names to draw (default: up to four spread over the model).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # optional dependency
        raise ImportError('plot_sites needs matplotlib: pip install "qmamba-ao[plot]"') from err

    names = _pick_layers(records, layers)
    # A bare Figure on an Agg canvas: no pyplot, so the caller's backend and global state are untouched.
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_a, ax_b, ax_h = fig.subplots(1, 3)
    for name in names:
        rec = records[name]
        if rec.dA.sample.numel():
            ax_a.hist(rec.dA.sample.numpy(), bins=100, histtype="step", label=name)
        if rec.dBu.sample.numel():
            # Layers differ in scale by orders of magnitude; normalising puts every tail on [-1, 1].
            amax = max(abs(rec.dBu.min), abs(rec.dBu.max)) or 1.0
            ax_b.hist((rec.dBu.sample / amax).numpy(), bins=150, range=(-1, 1), histtype="step", label=name)
        if rec.seq_len:
            ax_h.plot(range(rec.seq_len), rec.h_range().clamp(min=1e-12).numpy(), label=name)
    ax_a.set(yscale="log", xlabel="dA = exp(delta A)", ylabel="count (sample)", title="dA")
    ax_b.set(yscale="log", xlabel="dBu / max|dBu|", ylabel="count (sample)", title="dBu = delta B u (normalised)")
    ax_h.set(yscale="log", xlabel="step t", ylabel="max(h_t) - min(h_t)", title="h: range per step")
    for ax in (ax_a, ax_b, ax_h):
        ax.legend(fontsize=7)
    out = Path(path)
    fig.savefig(out, format="png", dpi=100)
    return out


def format_table(rows: Sequence[dict[str, Any]], floatfmt: str = ".4g") -> str:
    """Rows of dicts (as returned above) as a plain-text table."""
    from tabulate import tabulate

    return tabulate(list(rows), headers="keys", floatfmt=floatfmt)
