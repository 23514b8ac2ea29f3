r"""LtSQ: Long-tailed Skewness Quantization for the discrete SSM parameters ``dA`` and ``dBu``.

The QMamba paper reports that ``dA = exp(delta * A)`` and ``dBu = delta * B * u`` are long-tailed and
skewed but its equations are not available here, so this is our formulation. A uniform grid wastes
levels on the sparse tail; a pure log grid wastes them on the other side. LtSQ quantizes a
*transformed* value with an ordinary affine grid and maps back with the exact inverse:

.. math::

    \hat x = T_p^{-1}\big(\mathrm{FQ}_{s,z}(T_p(x))\big),\qquad
    \mathrm{FQ}_{s,z}(t) = s\,(\mathrm{clamp}(\mathrm{round}(t/s) + z, q_{min}, q_{max}) - z)

with one of four monotone transforms (``p`` is the transform parameter):

=================  ====================================  ==========================================
kind               :math:`T_p(x)`                        :math:`T_p^{-1}(t)`
=================  ====================================  ==========================================
``unit_power``     :math:`(1 - x)^{p}`                   :math:`1 - t^{1/p}`
``unit_log``       :math:`\log(1 + (1 - x)/p)`           :math:`1 - p\,(e^{t} - 1)`
``signed_power``   :math:`\mathrm{sign}(x)|x|^{p}`       :math:`\mathrm{sign}(t)|t|^{1/p}`
``signed_log``     :math:`\mathrm{sign}(x)\log(1+|x|/p)` :math:`\mathrm{sign}(t)\,p\,(e^{|t|} - 1)`
=================  ====================================  ==========================================

* ``unit_*`` for ``dA`` in (0, 1], mass piled near 1 and a long tail towards 0. They work on
  ``1 - x``: ``x = 1`` maps to ``t = 0``, which the affine grid represents exactly, so channels
  without decay keep ``dA = 1`` and every dequantized value stays ``<= 1`` (a quantized recurrence
  stays stable). ``p < 1`` (power) or a small knee ``p`` (log) put levels next to 1.
* ``signed_*`` for ``dBu``, signed and heavy-tailed: the power form compresses the tails, the
  log form (a mu-law compander with knee ``p``) gives near-geometric level spacing in the tails,
  which is what an MSE-optimal (Lloyd-Max) quantizer of a heavy-tailed variable looks like. The
  affine (asymmetric) grid in t-space absorbs skew.

Calibration searches the kinds allowed for the data (all four when everything observed lies in
[0, 1], else ``signed_*``), their parameter over a candidate grid (power exponents, log knees as
fractions of the observed magnitude) and a clipping ratio ``alpha`` of the t-range
(``[alpha T(min), alpha T(max)]`` with zero included), minimising the MSE in the **original** space.
The MSE is computed exactly per candidate on a bounded, deterministic sample (uniform reservoir +
exact extremes, see :class:`~qmamba_ao.observers._base.ReservoirMixin`). ``unit_power``/
``signed_power`` with ``p = 1`` and ``alpha = 1`` is the plain uniform grid and always a
candidate, so on the calibration statistics LtSQ is never worse than that grid.

At deployment the integer code ``q`` stands for ``T^{-1}(s (q - z))``: a ``2^b``-entry lookup table
on an accelerator, or elementwise ops around a standard QuantizeLinear/DequantizeLinear pair in an
exported graph.

The log2 form (``form="log2"``)
-------------------------------

Summaries of the QMamba paper describe its LtSQ differently: a log2 quantizer of ``dA``'s
complement, used on the layers whose median ``dA`` exceeds a threshold and replaced by a uniform
grid elsewhere. ``form="log2"`` implements that form next to the searched one, so the two can be
measured side by side (``"searched"``, above, stays the default). Both log2 grids fit the same
pattern, a fixed transform around an affine grid with scale 1 (:data:`LOG2_KINDS`):

=================  ====================================================  ==============================
kind               codes                                                 levels
=================  ====================================================  ==============================
``unit_log2``      ``q = clamp(round(-log2(1 - x)), 0, 2^b - 1)``        ``1 - 2^-q``
``signed_log2``    ``m = clamp(round(log2(|x| / M) + E), 1, E)``, or 0   ``sign(x) M 2^(m - E)``, 0 for
                   below half the smallest level; ``E = 2^(b-1) - 1``    ``m = 0``
                   exponents per sign
``uniform``        the min/max affine grid of the observed range         ``s (q - z)``
=================  ====================================================  ==============================

``M`` is the largest observed magnitude. ``unit_log2`` is for data in [0, 1] (dA): its levels
0, 1/2, 3/4, ... crowd towards 1, and ``dA = 1`` takes the top code. ``signed_log2`` (dBu) is a
sign-magnitude grid rounded in the log domain, except that values below half its smallest level
round to 0 (the error-minimising threshold there, as :class:`~qmamba_ao.observers.Log2Observer`
rounds); its one spare code (of the ``2^b``) stands for ``-2M``, which calibration data never
reaches. Instead of a fixed median threshold, calibration measures the MSE of the log2
grid and of the uniform min/max grid on the same sample as the search above and keeps the log2
grid only when its MSE is lower; :meth:`LtSQObserver.transform_params` reports both errors, the
calibration median and the choice. The frozen form is :class:`FrozenLtSQLog2` whatever the choice
(its kind is a buffer), so a saved state_dict loads into a model converted from any calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._base import QObserverBase, ReservoirMixin, SortedSample, storage_order_flat
from ._fake_quantize import SyncingFakeQuantize
from .affine import EPS, bits_of_range, fake_quantize

__all__ = [
    "LtSQObserver",
    "LtSQFakeQuantize",
    "FrozenLtSQ",
    "FrozenLtSQLog2",
    "ltsq_transform",
    "ltsq_inverse",
    "log2_transform",
    "log2_inverse",
    "TRANSFORMS",
    "LOG2_KINDS",
    "FORMS",
]

#: transform kind -> integer id stored in the ``kind`` buffers
TRANSFORMS = {"unit_power": 1, "unit_log": 2, "signed_power": 3, "signed_log": 4}
_KIND_NAMES = {v: k for k, v in TRANSFORMS.items()}
#: the grids of the log2 form -> integer ids in the ``kind`` buffers (disjoint from TRANSFORMS, so a
#: buffer's id alone says which form produced it)
LOG2_KINDS = {"uniform": 0, "unit_log2": 5, "signed_log2": 6}
_LOG2_NAMES = {v: k for k, v in LOG2_KINDS.items()}
#: the two formulations of LtSQ (see the module docstring)
FORMS = ("searched", "log2")
#: Data in [0, 1] (dA) also tries the signed kinds: on x >= 0 they are x^p and log(1 + x/p), grids
#: anchored at 0 instead of 1, which win when a layer's dA sits far below 1 (short memory). With
#: p = 1 that is the plain min/max grid, so LtSQ is never worse than min/max on its calibration data.
_DOMAINS = {"unit": ("unit_power", "unit_log", "signed_power", "signed_log"), "signed": ("signed_power", "signed_log")}
#: power exponents tried (1.0 first: the plain uniform grid wins ties)
DEFAULT_GAMMAS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 1 / 3, 0.25, 0.2, 1 / 6, 0.125)
#: log knees tried, as fractions of the observed magnitude (max |x|, or 1 - min for unit data)
DEFAULT_KNEES = tuple(2.0 ** (-j / 2) for j in range(41))
#: clipping ratios of the t-range tried (1.0 first: no clipping wins ties)
DEFAULT_CLIP_RATIOS = (
    1.0,
    0.98,
    0.96,
    0.94,
    0.92,
    0.9,
    0.87,
    0.84,
    0.8,
    0.75,
    0.7,
    0.65,
    0.6,
    0.55,
    0.5,
    0.45,
    0.4,
    0.35,
    0.3,
)


def _kind_id(kind: Any) -> int:
    if isinstance(kind, str):
        if kind not in TRANSFORMS:
            raise ValueError(f"LtSQ transform kind must be one of {list(TRANSFORMS)}; got {kind!r}")
        return TRANSFORMS[kind]
    if int(kind) not in _KIND_NAMES:
        raise ValueError(f"unknown LtSQ transform id {kind!r}")
    return int(kind)


def ltsq_transform(x: Tensor, kind: Any, param: Any) -> Tensor:
    """``T_p(x)`` for one of :data:`TRANSFORMS` (see the module docstring)."""
    k = _kind_id(kind)
    if k == 1:
        return torch.pow((1.0 - x).clamp(min=0.0), param)
    if k == 2:
        return torch.log1p((1.0 - x).clamp(min=0.0) / param)
    if k == 3:
        return torch.sign(x) * torch.pow(x.abs(), param)
    return torch.sign(x) * torch.log1p(x.abs() / param)


def ltsq_inverse(t: Tensor, kind: Any, param: Any) -> Tensor:
    """``T_p^{-1}(t)``: exact inverse of :func:`ltsq_transform` on its image."""
    k = _kind_id(kind)
    if k == 1:
        return 1.0 - torch.pow(t.clamp(min=0.0), 1.0 / param)
    if k == 2:
        return 1.0 - param * torch.expm1(t.clamp(min=0.0))
    if k == 3:
        return torch.sign(t) * torch.pow(t.abs(), 1.0 / param)
    return torch.sign(t) * param * torch.expm1(t.abs())


def _apply_ltsq(
    x: Tensor, kind: Any, param: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int
) -> Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad) and x.dtype == torch.float32:
        return _apply_ltsq_inplace(x, _kind_id(kind), param, scale, zero_point, quant_min, quant_max)
    p = param.to(device=x.device, dtype=torch.float32).reshape(())
    t = fake_quantize(ltsq_transform(x.to(torch.float32), kind, p), scale, zero_point, quant_min, quant_max)
    return ltsq_inverse(t, kind, p).to(x.dtype)


#: Exponents that torch's pow treats specially when given as a Python number (square, cube, square
#: root, reciprocals): their results can differ in the last bit from the general kernel that a tensor
#: exponent uses. Every other exponent takes the (several times faster) scalar kernel, same values.
_POW_SPECIAL = (0.5, 2.0, 3.0, -0.5, -1.0, -2.0, -3.0)


def _pow_(t: Tensor, exponent: Tensor) -> Tensor:
    e = float(exponent)
    return t.pow_(exponent) if e in _POW_SPECIAL else t.pow_(e)


def _apply_ltsq_inplace(
    x: Tensor, kind: int, param: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int
) -> Tensor:
    """No-grad LtSQ on one working buffer: the same operations in the same order as
    :func:`ltsq_transform`, :func:`fake_quantize` and :func:`ltsq_inverse` (hence bit-identical to
    them), without a temporary per operation. The inference hot path of ``dA``/``dBu``, which
    are ``(batch, dim, L, N)`` tensors."""
    # Scalars rounded exactly as the reference functions round them (float32 tensor arithmetic).
    param = torch.as_tensor(param, dtype=torch.float32).reshape(())
    p, inv_p = param.item(), 1.0 / param  # exponents as the reference computes them (float32)
    scale = scale.to(torch.float32).reshape(())
    s, inv, z = scale.item(), (1.0 / scale).item(), int(zero_point.reshape(()))
    if kind in (1, 2):
        t = torch.rsub(x, 1.0).clamp_(min=0.0)
        t = _pow_(t, param) if kind == 1 else t.div_(p).log1p_()
    else:  # sign(x) * f(|x|) as one copysign (equal values; only the sign of a zero may differ)
        t = x.abs()
        t = (_pow_(t, param) if kind == 3 else t.div_(p).log1p_()).copysign_(x)
    t.mul_(inv).add_(z).round_().clamp_(quant_min, quant_max).sub_(z).mul_(s)
    if kind == 1:
        return _pow_(t.clamp_(min=0.0), inv_p).neg_().add_(1.0)
    if kind == 2:
        return t.clamp_(min=0.0).expm1_().mul_(-p).add_(1.0)
    u = t.abs()
    u = _pow_(u, inv_p) if kind == 3 else u.expm1_().mul_(p)
    return u.copysign_(t)


class _FrozenTransformGrid(nn.Module):
    """A fixed affine grid around a monotone transform: ``inverse(FQ(transform(x)))``. Buffers ``kind_id``,
    ``param``, ``scale`` and ``zero_point`` (so a converted model's state_dict carries all of it); subclasses
    name their kinds and give ``_inverse(t, kind, param)``."""

    _inverse: Any
    _kind_names: dict[int, str]
    #: element by element, no state: the scan may apply it block by block (see ``ScanHooks.pointwise``)
    pointwise = True

    def __init__(
        self, kind_id: int, param: Any, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int
    ) -> None:
        super().__init__()
        bits_of_range(quant_min, quant_max)
        self.register_buffer("kind_id", torch.tensor([kind_id], dtype=torch.int64))
        self.register_buffer("param", torch.as_tensor(param, dtype=torch.float32).reshape(1).clone())
        self.register_buffer("scale", torch.as_tensor(scale).detach().to(torch.float32).reshape(1).clone())
        self.register_buffer("zero_point", torch.as_tensor(zero_point).detach().to(torch.int32).reshape(1).clone())
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)

    @property
    def kind(self) -> str:
        """The calibrated kind (one of :data:`TRANSFORMS` for LtSQ, :data:`LOG2_KINDS` for its log2 form)."""
        return self._kind_names[int(self.kind_id)]

    def levels(self) -> Tensor:
        """The ``2^b`` values the integer codes stand for (the lookup table), in code order."""
        codes = torch.arange(self.quant_min, self.quant_max + 1, dtype=torch.float32)
        t = self.scale * (codes - self.zero_point.float())
        return type(self)._inverse(t, self.kind, self.param.reshape(()))

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, param={float(self.param):.4g}, scale={float(self.scale):.4g}, "
            f"zero_point={int(self.zero_point)}, quant_min={self.quant_min}, quant_max={self.quant_max}"
        )


class FrozenLtSQ(_FrozenTransformGrid):
    """Fixed LtSQ quantizer ``T_p^{-1}(FQ(T_p(x)))`` with calibrated kind, parameter, scale and zero point."""

    _inverse = staticmethod(ltsq_inverse)
    _kind_names = _KIND_NAMES

    def __init__(
        self, kind: Any, param: Any, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int
    ) -> None:
        super().__init__(_kind_id(kind), param, scale, zero_point, quant_min, quant_max)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        key = prefix + "kind_id"
        if key in state_dict:
            _kind_id(int(state_dict[key]))  # a clear error for an unknown id
        elif key in missing_keys:
            # state_dicts saved before the kind was a buffer: keep the kind this module was built with
            missing_keys.remove(key)

    def forward(self, x: Tensor) -> Tensor:
        # Inference takes the in-place path inside _apply_ltsq: on a CPU a few element-wise passes
        # over one buffer measured ~4x faster than looking codes up among the level thresholds
        # (bucketize + gather), and they give exactly the values the fake-quant training path gives.
        return _apply_ltsq(x, self.kind, self.param, self.scale, self.zero_point, self.quant_min, self.quant_max)


def _log2_kind_id(kind: Any) -> int:
    if isinstance(kind, str):
        if kind not in LOG2_KINDS:
            raise ValueError(f"LtSQ log2-form kind must be one of {list(LOG2_KINDS)}; got {kind!r}")
        return LOG2_KINDS[kind]
    if int(kind) not in _LOG2_NAMES:
        raise ValueError(f"unknown LtSQ log2-form kind id {kind!r}; the ids are {LOG2_KINDS}")
    return int(kind)


def log2_transform(x: Tensor, kind: Any, param: Any = 1.0) -> Tensor:
    """The log2 form's transform, whose integer grid points are the levels:

    * ``unit_log2``: ``-log2(1 - x)`` (``x >= 1`` gives ``+inf``, which the grid clamps to its top code);
    * ``signed_log2``: with ``a = |x| / param`` (``param``: half the smallest non-zero level),
      ``sign(x) (log2(max(a, 2)) + min(a, 2) / 2 - 1)``: ``log2(a)`` from the smallest level up,
      linear below it, so that rounding puts 0 and that level apart at their midpoint;
    * ``uniform``: ``x`` itself.
    """
    k = _log2_kind_id(kind)
    if k == LOG2_KINDS["uniform"]:
        return x
    if k == LOG2_KINDS["unit_log2"]:
        return torch.log2((1.0 - x).clamp(min=0.0)).neg()
    a = x.abs() / param
    return torch.sign(x) * (torch.log2(a.clamp(min=2.0)) + a.clamp(max=2.0) * 0.5 - 1.0)


def log2_inverse(t: Tensor, kind: Any, param: Any = 1.0) -> Tensor:
    """The exact inverse of :func:`log2_transform`; at integer ``t`` the levels ``1 - 2^-t``
    (``unit_log2``), ``sign(t) param 2^|t|`` and 0 at ``t = 0`` (``signed_log2``), or ``t``."""
    k = _log2_kind_id(kind)
    if k == LOG2_KINDS["uniform"]:
        return t
    if k == LOG2_KINDS["unit_log2"]:
        return 1.0 - torch.exp2(-t)
    u = t.abs()
    return torch.sign(t) * param * (torch.exp2(u.clamp(min=1.0)) + 2.0 * u.clamp(max=1.0) - 2.0)


def _apply_log2(
    x: Tensor, kind: Any, param: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int
) -> Tensor:
    k = _log2_kind_id(kind)
    if k == LOG2_KINDS["uniform"]:
        return fake_quantize(x, scale, zero_point, quant_min, quant_max)
    p = param.to(device=x.device, dtype=torch.float32).reshape(())
    t = fake_quantize(log2_transform(x.to(torch.float32), k, p), scale, zero_point, quant_min, quant_max)
    return log2_inverse(t, k, p).to(x.dtype)


class FrozenLtSQLog2(_FrozenTransformGrid):
    """Fixed quantizer of LtSQ's log2 form (see the module docstring): the calibrated grid kind
    (``unit_log2``, ``signed_log2`` or ``uniform``), its parameter, scale and zero point, all buffers.

    One class whatever calibration chose, with the same buffer names as :class:`FrozenLtSQ`, so that
    a converted model's state_dict loads into a model converted from other data. ``forward`` is
    ``log2_inverse(FQ(log2_transform(x)))``: a transform around a standard affine grid.
    """

    _inverse = staticmethod(log2_inverse)
    _kind_names = _LOG2_NAMES

    def __init__(
        self, kind: Any, param: Any, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int
    ) -> None:
        super().__init__(_log2_kind_id(kind), param, scale, zero_point, quant_min, quant_max)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "kind_id"
        if key in state_dict:
            _log2_kind_id(int(state_dict[key]))  # a clear error for an unknown id
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return _apply_log2(x, self.kind, self.param, self.scale, self.zero_point, self.quant_min, self.quant_max)


class LtSQObserver(ReservoirMixin, QObserverBase):
    """Records what LtSQ calibration needs: exact min/max, a bounded sample and the exact extremes.

    Args:
        transform: ``"auto"`` (``"unit"`` when everything observed lies in [0, 1], else
            ``"signed"``), ``"unit"``, ``"signed"``, or one kind of :data:`TRANSFORMS`.
        families: which of ``("power", "log")`` to search.
        gammas: power exponents to try (default :data:`DEFAULT_GAMMAS`).
        knees: log knees to try, as fractions of the observed magnitude (default
            :data:`DEFAULT_KNEES`).
        clip_ratios: clipping ratios of the t-range to try (1.0 = no clipping).
        sample_size, tail_size, seed: the bounded, deterministic statistics the MSE is measured on
            (a uniform sample plus the exact ``tail_size`` smallest and largest values).
        dtype, qscheme, quant_min, quant_max, bits, eps: the affine grid in t-space, as torch.ao.
        form: ``"searched"`` (default: the transform search above) or ``"log2"`` (the paper's log2
            grids, each kept only where it beats the uniform min/max grid; see the module
            docstring). The log2 form takes its domain from ``transform`` (``"auto"``, ``"unit"``
            or ``"signed"``) and ignores ``families``, ``gammas``, ``knees`` and ``clip_ratios``.

    ``calculate_qparams()`` returns the affine ``(scale, zero_point)`` **in t-space**; the chosen
    transform is in :meth:`transform_params` and mirrored into the buffers ``kind``, ``param`` and
    ``clip_ratio`` (a cache of a pure function of the statistics, refreshed whenever qparams are
    computed or the state is saved). In the log2 form ``kind`` holds a :data:`LOG2_KINDS` id.
    """

    _resizable = ReservoirMixin._reservoir_buffers

    min_val: Tensor
    max_val: Tensor
    kind: Tensor
    param: Tensor
    clip_ratio: Tensor

    def __init__(
        self,
        transform: str = "auto",
        families: Sequence[str] = ("power", "log"),
        gammas: Optional[Sequence[float]] = None,
        knees: Optional[Sequence[float]] = None,
        clip_ratios: Sequence[float] = DEFAULT_CLIP_RATIOS,
        sample_size: int = 65536,
        tail_size: int = 1024,
        seed: int = 0,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        bits: Optional[int] = None,
        eps: float = EPS,
        is_dynamic: bool = False,
        form: str = "searched",
    ) -> None:
        super().__init__(dtype, qscheme, quant_min, quant_max, bits, eps, is_dynamic)
        if transform not in ("auto", *_DOMAINS, *TRANSFORMS):
            raise ValueError(
                f"transform must be 'auto', 'unit', 'signed' or one of {list(TRANSFORMS)}; got {transform!r}"
            )
        if not isinstance(form, str) or form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}; got {form!r}")
        if form == "log2" and transform in TRANSFORMS:
            raise ValueError(
                f"transform={transform!r} names a kind of the searched form; with form='log2' use 'auto', "
                "'unit' or 'signed' (which log2 grid to try), or form='searched' to keep that kind"
            )
        self.form = form
        self.transform = transform
        self.families = tuple(families)
        if not self.families or any(f not in ("power", "log") for f in self.families):
            raise ValueError(f"families must be a non-empty subset of ('power', 'log'); got {families!r}")
        self.gammas = tuple(float(g) for g in (DEFAULT_GAMMAS if gammas is None else gammas))
        if any(not 0.0 < g <= 4.0 for g in self.gammas):
            raise ValueError(f"gammas must lie in (0, 4]; got {gammas}")
        self.knees = tuple(float(c) for c in (DEFAULT_KNEES if knees is None else knees))
        if any(not c > 0.0 for c in self.knees):
            raise ValueError(f"knees must be positive; got {knees}")
        self.clip_ratios = tuple(float(a) for a in clip_ratios)
        if not self.clip_ratios or any(not 0.0 < a <= 1.0 for a in self.clip_ratios):
            raise ValueError(f"clip_ratios must be a non-empty sequence in (0, 1]; got {clip_ratios}")
        if not self._kinds("unit") or not self._kinds("signed"):
            raise ValueError(f"no candidate transform: transform={transform!r}, families={self.families}")
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self._init_reservoir(sample_size, seed, tail_size)
        first = LOG2_KINDS["uniform"] if form == "log2" else TRANSFORMS[self._kinds("signed")[0]]
        self.register_buffer("kind", torch.tensor([first], dtype=torch.int32))
        self.register_buffer("param", torch.ones(1))
        self.register_buffer("clip_ratio", torch.ones(1))
        self._memo: Optional[tuple[tuple, dict]] = None

    # -- recording ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x
        lo, hi = torch.aminmax(storage_order_flat(x.detach()))  # the scan hands dA/dBu over time-major
        self._check_finite(lo, hi)
        self.min_val = torch.minimum(self.min_val, lo.to(self.min_val))
        self.max_val = torch.maximum(self.max_val, hi.to(self.max_val))
        self._update_reservoir(x)
        return x

    # -- calibration ---------------------------------------------------------------------------
    def _kinds(self, domain: str) -> tuple[str, ...]:
        """Transform kinds searched when the data's domain is ``domain`` ("unit" or "signed")."""
        if self.transform in TRANSFORMS:
            return (self.transform,)
        if self.transform in _DOMAINS:
            domain = self.transform
        return tuple(k for k in _DOMAINS[domain] if k.split("_")[1] in self.families)

    def _domain(self) -> str:
        if self.transform in _DOMAINS:
            return self.transform
        return "unit" if float(self.min_val) >= 0.0 and float(self.max_val) <= 1.0 else "signed"

    def _candidates(self, kind: str, lo: float, hi: float) -> tuple[float, ...]:
        if kind.endswith("power"):
            return self.gammas
        magnitude = (1.0 - lo) if kind.startswith("unit") else max(abs(lo), abs(hi))
        magnitude = max(magnitude, float(self.eps))
        return tuple(c * magnitude for c in self.knees)

    def search(self) -> dict:
        """Score every ``(kind, param, alpha)`` candidate; returns the choice and the MSE table.

        Pure: depends only on the recorded statistics. A candidate's MSE is computed exactly on the
        sorted weighted sample from its ``2^b`` levels and the thresholds between them (the images
        of the t-space rounding midpoints under ``T^{-1}``), so a fine grid costs little.
        """
        data = SortedSample(*self._weighted_sample())
        lo, hi = float(self.min_val), float(self.max_val)
        alphas = torch.tensor(self.clip_ratios, dtype=torch.float64)
        codes = torch.arange(self.quant_min, self.quant_max + 1, dtype=torch.float64)
        ends = torch.tensor([lo, hi], dtype=torch.float64)
        rows, table = [], []
        for kind in self._kinds(self._domain()):
            for param in self._candidates(kind, lo, hi):
                t_ends = ltsq_transform(ends, kind, param)
                scale, zero_point = self._qparams(alphas * float(t_ends.min()), alphas * float(t_ends.max()))
                sc, zp = scale.double()[:, None], zero_point.double()[:, None]
                levels = ltsq_inverse(sc * (codes - zp), kind, param)
                bounds = ltsq_inverse(sc * (codes[:-1] + 0.5 - zp), kind, param)
                if kind.startswith("unit"):  # T is decreasing in x: run both ascending in x
                    levels, bounds = levels.flip(-1), bounds.flip(-1)
                table.append(data.mse(levels, bounds))
                rows.append((kind, param, scale, zero_point))
        mse = torch.stack(table)
        best = int(torch.argmin(mse.reshape(-1)))  # first minimum: earlier candidates win ties
        ri, ai = divmod(best, alphas.numel())
        kind, param, scale, zero_point = rows[ri]
        return {
            "kind": kind,
            "param": float(param),
            "clip_ratio": self.clip_ratios[ai],
            "scale": scale[ai : ai + 1].clone(),
            "zero_point": zero_point[ai : ai + 1].clone(),
            "mse": float(mse[ri, ai]),
            "candidates": [(k, p) for k, p, _, _ in rows],
            "mse_table": mse,
        }

    def search_log2(self) -> dict:
        """The log2 form's choice: the log2 grid of the data's domain or the uniform min/max grid,
        whichever has the lower MSE on the recorded sample (the log2 grid only if strictly lower).

        Pure, like :meth:`search`, and scored the same way (exactly, from each grid's levels and
        thresholds on the sorted weighted sample). Returns the chosen ``kind`` (one of
        :data:`LOG2_KINDS`), ``param``, t-space ``scale`` / ``zero_point``, its ``mse``, and what
        the choice rests on: ``median`` (of the calibration values), ``mse_log2``, ``mse_uniform``
        and ``grid`` (``"log2"`` or ``"uniform"``).
        """
        data = SortedSample(*self._weighted_sample())
        lo, hi = float(self.min_val), float(self.max_val)
        qmin, qmax = self.quant_min, self.quant_max
        codes = torch.arange(qmin, qmax + 1, dtype=torch.float64)
        f32 = torch.float32
        if self._domain() == "unit":
            # q = code - quant_min counts the halvings of 1 - x: levels 1 - 2^-q, q = 0 .. 2^b - 1
            kind, param, zero_point = "unit_log2", 1.0, qmin
        else:
            # sign-magnitude: E exponents per sign below the observed max magnitude, and zero
            exponents = (qmax - qmin) // 2
            magnitude = max(abs(lo), abs(hi), float(self.eps))
            kind, zero_point = "signed_log2", qmax - exponents
            param = float(torch.tensor(magnitude * 2.0**-exponents, dtype=f32))  # as the frozen module stores it
        t = codes - zero_point
        levels = log2_inverse(t, kind, param)
        bounds = log2_inverse(t[:-1] + 0.5, kind, param)
        mse_log2 = float(data.mse(levels, bounds))
        scale, zp = self._qparams(torch.tensor([lo]), torch.tensor([hi]))
        s, z = scale.double(), zp.double()
        mse_uniform = float(data.mse(s * (codes - z), s * (codes[:-1] + 0.5 - z)))
        n = data.n
        median = float(data.xs[min(int(torch.searchsorted(data.p0[1:], data.total / 2.0)), n - 1)]) if n else 0.0
        common = {"median": median, "mse_log2": mse_log2, "mse_uniform": mse_uniform, "clip_ratio": 1.0}
        if mse_log2 < mse_uniform:
            return {
                "kind": kind,
                "param": param,
                "scale": torch.ones(1, dtype=f32),
                "zero_point": torch.tensor([zero_point], dtype=torch.int32),
                "mse": mse_log2,
                "grid": "log2",
                **common,
            }
        return {
            "kind": "uniform",
            "param": 1.0,
            "scale": scale.reshape(1).clone(),
            "zero_point": zp.reshape(1).clone(),
            "mse": mse_uniform,
            "grid": "uniform",
            **common,
        }

    def _kind_id(self, kind: str) -> int:
        return LOG2_KINDS[kind] if self.form == "log2" else TRANSFORMS[kind]

    def transform_params(self) -> dict:
        """The chosen transform and t-space qparams (memoised on the statistics): :meth:`search`'s
        result, or :meth:`search_log2`'s in the log2 form."""
        if not bool(self.min_val <= self.max_val):
            self._warn_empty()
            empty = {
                "kind": "uniform" if self.form == "log2" else self._kinds("signed")[0],
                "param": 1.0,
                "clip_ratio": 1.0,
                "scale": torch.ones(1),
                "zero_point": torch.zeros(1, dtype=torch.int32),
                "mse": float("nan"),
            }
            if self.form == "log2":
                nan = float("nan")
                empty.update(median=nan, mse_log2=nan, mse_uniform=nan, grid="uniform")
            return empty
        key = (int(self.seen), int(self.num_batches), float(self.min_val), float(self.max_val))
        if self._memo is None or self._memo[0] != key:
            choice = self.search_log2() if self.form == "log2" else self.search()
            self._memo = (key, choice)
            self.kind.fill_(self._kind_id(choice["kind"]))
            self.param.fill_(choice["param"])
            self.clip_ratio.fill_(choice["clip_ratio"])
        return self._memo[1]

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        p = self.transform_params()
        return p["scale"].clone(), p["zero_point"].clone()

    def to_frozen(self) -> nn.Module:
        """:class:`FrozenLtSQ` (searched form) or :class:`FrozenLtSQLog2` (log2 form)."""
        p = self.transform_params()
        cls = FrozenLtSQLog2 if self.form == "log2" else FrozenLtSQ
        frozen = cls(p["kind"], p["param"], p["scale"], p["zero_point"], self.quant_min, self.quant_max)
        return frozen.to(self.eps.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        if bool(self.min_val <= self.max_val):
            self.transform_params()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        self._memo = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        form = f"form={self.form!r}, " if self.form != "searched" else ""
        return (
            f"{form}transform={self.transform!r}, families={self.families}, sample_size={self.sample_size}, "
            f"tail_size={self.tail_size}, " + super().extra_repr()
        )


class LtSQFakeQuantize(SyncingFakeQuantize):
    """torch.ao-style fake quantizer around :class:`LtSQObserver`.

    Built like ``torch.ao.quantization.FakeQuantize``:
    ``LtSQFakeQuantize.with_args(quant_min=0, quant_max=15, transform="unit")``; extra keyword
    arguments go to the observer (``form="log2"`` for the log2 form). Buffers ``scale`` /
    ``zero_point`` (t-space), ``kind`` and ``param`` hold the current quantizer. While the observer
    is on, the transform search reruns before each fake-quantized forward (as torch.ao's
    FakeQuantize recomputes qparams every step; it costs a few tens of ms); with fake quantization
    off it is deferred until the observer is turned off, the state is saved or :meth:`to_frozen`
    is called.
    """

    observer_class = LtSQObserver

    kind: Tensor
    param: Tensor

    def __init__(
        self,
        observer: Any = LtSQObserver,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        is_dynamic: bool = False,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__(observer, quant_min, quant_max, is_dynamic, observer_kwargs)
        self.register_buffer("kind", self.activation_post_process.kind.clone())
        self.register_buffer("param", torch.ones(1))

    @property
    def form(self) -> str:
        """The observer's form, ``"searched"`` or ``"log2"``."""
        return self.activation_post_process.form

    def _pull_qparams(self) -> None:
        obs = self.activation_post_process
        p = obs.transform_params()
        self.scale.copy_(p["scale"])
        self.zero_point.copy_(p["zero_point"])
        self.kind.fill_(obs._kind_id(p["kind"]))
        self.param.fill_(p["param"])

    def forward(self, x: Tensor) -> Tensor:
        if self.observer_enabled[0] == 1:
            self._observe(x.detach())
        if self.fake_quant_enabled[0] == 1:
            self._sync()
            apply = _apply_log2 if self.form == "log2" else _apply_ltsq
            x = apply(x, int(self.kind), self.param, self.scale, self.zero_point, self.quant_min, self.quant_max)
        return x

    def _frozen(self) -> nn.Module:
        cls = FrozenLtSQLog2 if self.form == "log2" else FrozenLtSQ
        return cls(int(self.kind), self.param, self.scale, self.zero_point, self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        names = _LOG2_NAMES if self.form == "log2" else _KIND_NAMES
        form = f"form={self.form!r}, " if self.form != "searched" else ""
        return (
            f"fake_quant_enabled={int(self.fake_quant_enabled)}, observer_enabled={int(self.observer_enabled)}, "
            f"{form}kind={names.get(int(self.kind), '?')!r}, param={float(self.param):.4g}, "
            f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"
        )
