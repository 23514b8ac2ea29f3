"""The PTQ recipes: what each one quantizes, with which observer, and which model rewrite comes first.

A :class:`Recipe` owns everything its name stands for: its torch.ao ``QConfigMapping``
(:meth:`Recipe.qconfig_mapping`), the float-equivalent rewrite applied before ``prepare_fx``
(:meth:`Recipe.rewrite`), whether its own mapping lowers to torch.ao's x86 int8 kernels
(:attr:`Recipe.lowers_to_x86`) and its 7-bit variant for those kernels
(:meth:`Recipe.x86_qconfig_mapping`). :func:`get_recipe` is the one place a name is resolved;
callers look a recipe up once and pass the object along. A new recipe is a ``Recipe(...)``
(``dataclasses.replace`` of an existing one works too) passed wherever a name is accepted.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping

from .observers import LtSQObserver, TGQObserver, int_range
from .observers.affine import MAX_BITS, MIN_BITS
from .observers.ltsq import FORMS as _LTSQ_FORMS
from .qconfig import (
    FIRST_LAST_PATTERNS,
    ObserverCtor,
    activation_observer,
    per_token_activation_observer,
    reduce_range,
    weight_observer,
)
from .rewrites import ChannelScale, Hadamard, rotate_out_proj, smooth_linears
from .ssm import SelectiveScan
from .ssm.quantized import ScanQuantSpec

__all__ = [
    "Recipe",
    "get_recipe",
    "list_recipes",
    "describe_recipes",
    "get_qconfig_mapping",
    "check_mapping_options",
    "bits_label",
    "parse_site_bits",
    "MAPPING_OPTIONS",
    "RECIPES",
]

_ACTIVATION_KINDS = ("minmax", "percentile", "histogram")
_SITE_KINDS = (None, "uniform", "minmax", "ltsq", "tgq")
_REWRITES = (None, "smooth", "hadamard")
_LINEAR_ACTS = (None, "per_token")
_SITES = ("dA", "dBu", "h", "y")


#: The options of :meth:`Recipe.qconfig_mapping` (and of every call that passes options on to it) with
#: their defaults.
MAPPING_OPTIONS: dict[str, Any] = {
    "first_last_bits": 8,
    "h_feedback": False,
    "tgq_groups": 8,
    "tgq_grouping": "uniform",
    "tgq_clip": "auto",
    "percentile": 99.99,
    "site_bits": None,
    "ltsq_form": "searched",
}
_TGQ_GROUPINGS = ("uniform", "range")
_TGQ_CLIPS = ("auto", "percentile", "mse", "minmax")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _site_hint(name: Any) -> str:
    """``'H' (did you mean 'h'?)``: a misspelt scan site with the closest real one, if any."""
    same_case = [s for s in _SITES if s.lower() == str(name).lower()]
    close = same_case or difflib.get_close_matches(str(name), _SITES, n=1)
    return f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _check_site_bits(site_bits: Any) -> Optional[dict[str, int]]:
    """``site_bits`` as a plain dict in site order (``None`` when empty); a ValueError says what is wrong."""
    if site_bits is None:
        return None
    if not isinstance(site_bits, Mapping):
        text = " (parse_site_bits turns a string such as 'h=8' into one)" if isinstance(site_bits, str) else ""
        raise ValueError(
            f"site_bits={_describe(site_bits)}: use a dict from scan site to bit width, e.g. {{'h': 8}}{text}, "
            "or None (every site at a_bits)"
        )
    unknown = [k for k in site_bits if k not in _SITES]
    if unknown:
        raise ValueError(
            f"site_bits: unknown scan site(s) {', '.join(_site_hint(k) for k in unknown)}; "
            f"the sites are {', '.join(_SITES)}"
        )
    for site, b in site_bits.items():
        if not _is_int(b) or not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(f"site_bits[{site!r}]={_describe(b)}: use an integer bit width in {MIN_BITS}..{MAX_BITS}")
    return {s: int(site_bits[s]) for s in _SITES if s in site_bits} or None


def check_mapping_options(w_bits: Any, a_bits: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every mapping option with its default filled in, each checked for its type and range.

    Values are taken strictly: ``h_feedback="off"`` is not a boolean (a truthy string would turn
    the feedback on), ``tgq_groups=2.5`` or ``"8"`` is not an integer, ``w_bits=True`` is not a
    bit width. Raises ValueError naming the option, the value given and what it accepts.
    """
    unknown = [k for k in options if k not in MAPPING_OPTIONS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), MAPPING_OPTIONS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"unknown quantization option(s) {', '.join(hints)}; the options are {', '.join(MAPPING_OPTIONS)}"
        )
    opts = {**MAPPING_OPTIONS, **options}
    bits = {"w_bits": w_bits, "a_bits": a_bits}
    if opts["first_last_bits"] is not None:
        bits["first_last_bits"] = opts["first_last_bits"]
    for name, b in bits.items():
        if not _is_int(b) or not MIN_BITS <= b <= MAX_BITS:
            extra = " or None (same as the rest)" if name == "first_last_bits" else ""
            raise ValueError(f"{name}={_describe(b)}: use an integer in {MIN_BITS}..{MAX_BITS}{extra}")
    if not isinstance(opts["h_feedback"], bool):
        raise ValueError(f"h_feedback={_describe(opts['h_feedback'])}: use True or False")
    groups = opts["tgq_groups"]
    if not _is_int(groups) or groups < 1:
        raise ValueError(f"tgq_groups={_describe(groups)}: use an integer >= 1")
    for name, allowed in (("tgq_grouping", _TGQ_GROUPINGS), ("tgq_clip", _TGQ_CLIPS)):
        if not isinstance(opts[name], str) or opts[name] not in allowed:
            raise ValueError(f"{name}={_describe(opts[name])}: use one of {', '.join(map(repr, allowed))}")
    pct = opts["percentile"]
    if not _is_real(pct) or not 50.0 < float(pct) <= 100.0:
        raise ValueError(f"percentile={_describe(pct)}: use a number in (50, 100], e.g. 99.99")
    if not isinstance(opts["ltsq_form"], str) or opts["ltsq_form"] not in _LTSQ_FORMS:
        raise ValueError(f"ltsq_form={_describe(opts['ltsq_form'])}: use one of {', '.join(map(repr, _LTSQ_FORMS))}")
    opts["site_bits"] = _check_site_bits(opts["site_bits"])
    opts["h_feedback"] = bool(opts["h_feedback"])
    opts["tgq_groups"] = int(groups)
    opts["percentile"] = float(pct)
    for name in bits:
        opts[name] = int(bits[name])
    return opts


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What a recipe quantizes and with which observer (all fields keyword-only).

    ``act``: observer kind (``"minmax"``, ``"percentile"``, ``"histogram"``) for Linear/Conv inputs
    and the scan's inputs and output; ``scan``: whether the selective scan is quantized at all;
    ``dA``/``dBu``/``h``/``y``: the internal site quantizers, ``"ltsq"``, ``"tgq"``, ``"uniform"``
    (the scan's activation observer), ``"minmax"`` or ``None`` (float).

    ``model_rewrite``: the float-equivalent rewrite applied before ``prepare_fx``: ``"smooth"``
    (:func:`qmamba_ao.rewrites.smooth_linears` with ``smooth_alpha``), ``"hadamard"``
    (:func:`qmamba_ao.rewrites.rotate_out_proj`) or ``None``. ``linear_act``: ``"per_token"`` for
    static per-token Linear inputs (``None``: ``act``). ``scan_act``: observer kind for the scan's
    inputs/output and its ``"uniform"`` sites (``None``: ``act``). ``scan_percentile``: fixed
    percentile for a percentile ``scan_act`` (``None``: the ``percentile`` option). ``reconstruct``:
    whether the method itself learns its qparams after calibration (PTQ4VM's JLSS), i.e. whether
    :func:`qmamba_ao.quantize` runs :func:`qmamba_ao.reconstruct` (with learned smoothing) unless told
    ``reconstruct=False``.
    """

    name: str
    summary: str
    act: str = "minmax"
    scan: bool = True
    dA: Optional[str] = "uniform"
    dBu: Optional[str] = "uniform"
    h: Optional[str] = "uniform"
    y: Optional[str] = "uniform"
    model_rewrite: Optional[str] = None
    smooth_alpha: float = 0.5
    linear_act: Optional[str] = None
    scan_act: Optional[str] = None
    scan_percentile: Optional[float] = None
    reconstruct: bool = False

    def __post_init__(self) -> None:
        def check(field: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise ValueError(f"recipe {self.name!r}: {field}={value!r}; use one of {list(allowed)}")

        check("act", self.act, _ACTIVATION_KINDS)
        check("scan_act", self.scan_act, (None, *_ACTIVATION_KINDS))
        for site in _SITES:
            check(site, getattr(self, site), _SITE_KINDS)
        check("model_rewrite", self.model_rewrite, _REWRITES)
        check("linear_act", self.linear_act, _LINEAR_ACTS)
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"recipe {self.name!r}: smooth_alpha must be in [0, 1]; got {self.smooth_alpha}")

    # -- mapping --------------------------------------------------------------------------------

    def qconfig_mapping(self, w_bits: int = 4, a_bits: int = 4, **options: Any) -> QConfigMapping:
        """The recipe's QConfigMapping at ``w_bits`` / ``a_bits`` (each an integer 2..8).

        Quantized: every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (weights symmetric per output
        channel, inputs per tensor) and, unless the recipe keeps it in float, every SelectiveScan (its
        inputs and output through torch.ao, its internal sites ``dA``, ``dBu``, ``h``, ``y`` through
        the recipe's site quantizers). Norms, residual adds and element-wise ops stay in float.

        ``options`` (defaults in :data:`MAPPING_OPTIONS`, checked by :func:`check_mapping_options`):
        ``first_last_bits`` (default 8; ``None`` = same as the rest) applies to the patch embedding
        and the classifier head. ``h_feedback`` (``True`` / ``False``, default False, chosen by
        measurement; README "Results" has both settings): whether the quantized state feeds the
        recurrence. ``tgq_groups`` (integer >= 1), ``tgq_grouping`` (``"uniform"`` / ``"range"``) and
        ``tgq_clip`` (``"auto"``, the default, / ``"percentile"`` / ``"mse"`` / ``"minmax"``) configure TGQ
        (:class:`~qmamba_ao.observers.TGQObserver`); ``percentile`` (in (50, 100]) is the clipping
        percentile of the percentile observers and of TGQ's groups. ``site_bits`` (a dict such as
        ``{"h": 8}``, default None) gives scan sites their own bit width (2..8), each with the
        recipe's quantizer for that site at that width; sites not named, and the scan's inputs and
        output, stay at ``a_bits``, and sites the recipe keeps in float stay float. Label such
        results with :func:`bits_label`. ``ltsq_form`` (``"searched"``, the default, or ``"log2"``)
        is the form of the LtSQ sites (:class:`~qmamba_ao.observers.LtSQObserver`'s ``form``). A
        misspelt or mistyped option is a ValueError naming it and what it accepts.
        """
        opts = check_mapping_options(w_bits, a_bits, options)
        w_bits, a_bits, first_last_bits = opts["w_bits"], opts["a_bits"], opts["first_last_bits"]
        h_feedback, percentile = opts["h_feedback"], opts["percentile"]
        tgq = {k: opts[k] for k in ("tgq_groups", "tgq_grouping", "tgq_clip", "percentile")}
        site_bits, ltsq_form = opts["site_bits"] or {}, opts["ltsq_form"]
        per_token = self.linear_act == "per_token"

        def layer_qconfig(wb: int, ab: int, token: bool = False) -> QConfig:
            act = per_token_activation_observer(ab) if token else activation_observer(self.act, ab, percentile)
            return QConfig(activation=act, weight=weight_observer(wb))

        mapping = QConfigMapping()
        mapping.set_object_type(nn.Linear, layer_qconfig(w_bits, a_bits, per_token))
        for op in (nn.Conv1d, nn.Conv2d):
            mapping.set_object_type(op, layer_qconfig(w_bits, a_bits))
        if self.scan:
            scan_pct = percentile if self.scan_percentile is None else self.scan_percentile
            act = activation_observer(self.scan_act or self.act, a_bits, scan_pct)
            sites = {}
            for s in _SITES:
                bits = site_bits.get(s, a_bits)
                site_act = act if bits == a_bits else activation_observer(self.scan_act or self.act, bits, scan_pct)
                sites[s] = _site_observer(getattr(self, s), site_act, bits, tgq, ltsq_form)
            spec = ScanQuantSpec(act, sites, h_feedback=h_feedback)
            # torch.ao insists on a weight constructor for custom modules; the scan has no weight.
            mapping.set_object_type(SelectiveScan, QConfig(activation=spec, weight=weight_observer(8)))
        else:
            mapping.set_object_type(SelectiveScan, None)
        # The rewrites' helper modules (online 1/s scaling, Hadamard rotation) always stay in float.
        mapping.set_object_type(ChannelScale, None)
        mapping.set_object_type(Hadamard, None)
        if first_last_bits is not None:
            for pattern in FIRST_LAST_PATTERNS:
                mapping.set_module_name_regex(pattern, layer_qconfig(first_last_bits, first_last_bits))
        elif per_token:
            # The head's input (batch, channels) has no token axis: first/last layers stay per tensor.
            for pattern in FIRST_LAST_PATTERNS:
                mapping.set_module_name_regex(pattern, layer_qconfig(w_bits, a_bits))
        return mapping

    @property
    def lowers_to_x86(self) -> bool:
        """Whether a model prepared with this recipe's own mapping converts to torch.ao's x86 kernels.

        Static per-token Linear inputs have no x86 kernel: such a model is converted to the
        reference model (see :func:`qmamba_ao.convert`); :meth:`x86_qconfig_mapping` gives a
        variant that lowers.
        """
        return self.linear_act != "per_token"

    def x86_qconfig_mapping(self, w_bits: int = 8, a_bits: int = 8, **options: Any) -> QConfigMapping:
        """The recipe's mapping with every 8-bit activation observer (linear, conv and scan inputs and
        outputs) reduced to 7 bits, for ``convert_fx`` lowering to torch.ao's x86 int8 kernels.

        Static per-token Linear inputs (``qmamba``, ``ptq4vm*``) become per-tensor min/max: the
        kernels take one activation scale per tensor. The recipe's rewrite still applies. The scan's
        internal sites keep their bits: they run in float inside the scan module.
        """
        mapping = self.qconfig_mapping(w_bits, a_bits, **options)

        def narrow(qconfig: Optional[QConfig]) -> Optional[QConfig]:
            if qconfig is None:
                return None
            return QConfig(activation=reduce_range(qconfig.activation), weight=qconfig.weight)

        mapping.global_qconfig = narrow(mapping.global_qconfig)
        for table in (
            mapping.object_type_qconfigs,
            mapping.module_name_regex_qconfigs,
            mapping.module_name_qconfigs,
            mapping.module_name_object_type_order_qconfigs,
        ):
            for key in list(table):
                table[key] = narrow(table[key])
        return mapping

    # -- model rewrite --------------------------------------------------------------------------

    @property
    def rewrites_model(self) -> bool:
        """Whether :meth:`rewrite` changes the model (a recipe without a rewrite returns it as it is)."""
        return self.model_rewrite is not None

    def rewrite(self, model: nn.Module, calib_data: Optional[Iterable[Any]] = None) -> nn.Module:
        """The float-equivalent model the recipe quantizes; ``model`` itself is not modified.

        ``smooth`` (``qmamba`` and its ablations, ``ptq4vm*``) smooths the mixers' Linears with
        scales from a float pass over ``calib_data``; ``hadamard`` (``quamba``) rotates each
        ``out_proj`` input, data-free. A recipe without a rewrite returns ``model``.
        ``calib_data=None`` builds the same module structure with neutral values (unit smoothing
        scales): the skeleton that a saved quantized ``state_dict`` is loaded into after
        ``prepare``. :func:`qmamba_ao.quantize` calls this for you; with the raw torch.ao calls,
        run ``model = recipe.rewrite(model, calib_data)`` before ``prepare_fx``.
        """
        if self.model_rewrite == "smooth":
            return smooth_linears(model, calib_data, alpha=self.smooth_alpha)
        if self.model_rewrite == "hadamard":
            return rotate_out_proj(model)
        return model


def _site_observer(
    choice: Optional[str], act: ObserverCtor, bits: int, tgq: dict, ltsq_form: str = "searched"
) -> Optional[ObserverCtor]:
    """The observer constructor of one internal scan site; ``act`` is the scan's activation observer
    at ``bits``, what a ``"uniform"`` site uses."""
    if choice is None:
        return None
    if choice == "uniform":
        return act
    if choice == "minmax":
        return activation_observer("minmax", bits)
    qmin, qmax = int_range(bits, signed=False)
    if choice == "ltsq":
        return LtSQObserver.with_args(dtype=torch.quint8, quant_min=qmin, quant_max=qmax, form=ltsq_form)
    if choice == "tgq":
        return TGQObserver.with_args(
            num_groups=tgq["tgq_groups"],
            grouping=tgq["tgq_grouping"],
            clip=tgq["tgq_clip"],
            percentile=tgq["percentile"],
            dtype=torch.quint8,
            quant_min=qmin,
            quant_max=qmax,
        )
    raise ValueError(f"unknown site quantizer {choice!r}")


# QMamba's two quantizers on the scan; the Linear layers handled as PTQ4VM does (smoothing + static
# per-token inputs), so that the scan quantizers are compared on top of the best linear-layer scheme
# here: without it, 4-bit per-tensor Linear inputs dominate the error.
_QMAMBA_LINEARS = dict(model_rewrite="smooth", linear_act="per_token", scan_act="percentile")
#: PTQ4VM's layout: the smoothed, per-token Linears and the whole selective scan in float.
_PTQ4VM = dict(scan=False, dA=None, dBu=None, h=None, y=None, model_rewrite="smooth", linear_act="per_token")

# Baselines. PTQ4VM (Cho et al., 2024): static per-token (PTS) Linear inputs after SmoothQuant-style
# smoothing of the mixer Linears, selective scan in float (as its code), then JLSS: block by block,
# the smoothing factors and the activation and weight step sizes are learned against the float block
# output (qmamba_ao.reconstruct with smoothing). Differences from its code (docs/method.md has the
# list): step sizes start from per-token min/max, not its Lp search; the loss is our relative MSE of
# the block output, not its cosine distance on the mixer output; Adam on log step sizes with QDrop
# and our step count; Conv1d / patch embedding / head are quantized too (min/max; 8-bit first/last),
# so that every recipe covers the same layers. Quamba
# (Chiang et al., 2024): scan input clipped at the 99.999th percentile (torch.ao observes all scan
# inputs and the output with one activation observer, so delta/B/C/z and the output get it too),
# Hadamard rotation of out_proj's input folded into its weight, min/max elsewhere; activations stay
# asymmetric.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="qmamba",
            summary="QMamba: LtSQ on dA and dBu, TGQ on h; scan inputs/output and y percentile-clipped; "
            "Linear inputs smoothed + static per-token (as ptq4vm)",
            dA="ltsq",
            dBu="ltsq",
            h="tgq",
            **_QMAMBA_LINEARS,
        ),
        Recipe(
            name="qmamba-ltsq-only",
            summary="ablation: qmamba with a percentile-clipped uniform h instead of TGQ",
            dA="ltsq",
            dBu="ltsq",
            **_QMAMBA_LINEARS,
        ),
        Recipe(
            name="qmamba-tgq-only",
            summary="ablation: qmamba with percentile-clipped uniform dA and dBu instead of LtSQ",
            h="tgq",
            **_QMAMBA_LINEARS,
        ),
        Recipe(name="minmax", summary="min/max uniform everywhere, scan sites included"),
        Recipe(
            name="percentile",
            summary="percentile-clipped uniform everywhere, scan sites included",
            act="percentile",
        ),
        Recipe(
            name="histogram",
            summary="torch.ao's HistogramObserver (L2-optimal range) everywhere, scan sites included",
            act="histogram",
        ),
        Recipe(
            name="ptq4vm",
            summary="PTQ4VM: SmoothQuant smoothing (alpha 0.5) + static per-token Linear inputs, then JLSS "
            "(block-wise learning of smoothing factors and step sizes); selective scan in float",
            reconstruct=True,
            **_PTQ4VM,
        ),
        Recipe(
            name="ptq4vm-closed-form",
            summary="ptq4vm without JLSS: the calibrated smoothing and per-token step sizes as they are",
            **_PTQ4VM,
        ),
        Recipe(
            name="ptq4vm-naive-ssm",
            summary="ptq4vm (with JLSS) + percentile-clipped uniform scan inputs/output and dA, dBu, h, y",
            reconstruct=True,
            **_QMAMBA_LINEARS,
        ),
        Recipe(
            name="quamba",
            summary="Quamba: 99.999th-percentile scan input, Hadamard-rotated out_proj input, min/max elsewhere",
            dA="minmax",
            dBu="minmax",
            h="minmax",
            y="minmax",
            model_rewrite="hadamard",
            scan_act="percentile",
            scan_percentile=99.999,
        ),
    )
}


def get_recipe(recipe: Union[str, Recipe]) -> Recipe:
    """The :class:`Recipe` of a name (a :class:`Recipe` is returned as it is); a ValueError names the choices."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in RECIPES:
        return RECIPES[recipe]
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {list_recipes()}")


def list_recipes() -> list[str]:
    """Names accepted wherever a recipe is (:func:`get_recipe`, :func:`qmamba_ao.quantize`, ...)."""
    return list(RECIPES)


def describe_recipes() -> list[tuple[str, str]]:
    """``(name, one-line summary)`` for every recipe."""
    return [(r.name, r.summary) for r in RECIPES.values()]


def get_qconfig_mapping(
    recipe: Union[str, Recipe] = "qmamba", w_bits: int = 4, a_bits: int = 4, **options: Any
) -> QConfigMapping:
    """The QConfigMapping of a recipe at ``w_bits`` / ``a_bits``; ``options`` as :meth:`Recipe.qconfig_mapping`."""
    return get_recipe(recipe).qconfig_mapping(w_bits, a_bits, **options)


def bits_label(
    w_bits: int, a_bits: int, site_bits: Optional[Mapping[str, int]] = None, first_last_bits: Optional[int] = 8
) -> str:
    """A result's bit widths as one label: ``"W4A4"``, ``"W4A4, h8"``, ``"W4A4, dA8 h8"``.

    Scan sites whose width differs from ``a_bits`` are listed (in the order dA, dBu, h, y), so a
    mixed-width result is never mistaken for a plain one. The first/last layers appear only when
    they differ from the default 8 bits (``"W4A4, first/last W6A6"``; ``None``: at ``w_bits`` /
    ``a_bits``). Arguments are checked as :func:`check_mapping_options` checks them.
    """
    opts = check_mapping_options(w_bits, a_bits, {"site_bits": site_bits, "first_last_bits": first_last_bits})
    w_bits, a_bits = opts["w_bits"], opts["a_bits"]
    parts = [f"W{w_bits}A{a_bits}"]
    sites = [f"{s}{b}" for s, b in (opts["site_bits"] or {}).items() if b != a_bits]
    if sites:
        parts.append(" ".join(sites))
    fl = opts["first_last_bits"]
    if fl != MAPPING_OPTIONS["first_last_bits"]:
        parts.append(f"first/last W{w_bits}A{a_bits}" if fl is None else f"first/last W{fl}A{fl}")
    return ", ".join(parts)


def parse_site_bits(spec: str) -> dict[str, int]:
    """``"h=8,dA=8"`` -> ``{"h": 8, "dA": 8}`` (a command-line value of ``site_bits``).

    Comma-separated ``SITE=BITS`` pairs; spaces around names and numbers are ignored. Unknown
    sites, repeated sites, missing ``=`` and bit widths outside 2..8 are ValueErrors that say what
    was given and what is accepted.
    """
    example = "e.g. 'h=8' or 'dA=8,h=8'"
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"site bits {spec!r}: give comma-separated SITE=BITS pairs, {example}")
    out: dict[str, int] = {}
    for item in spec.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value:
            raise ValueError(f"site bits {spec!r}: {item.strip()!r} is not SITE=BITS; {example}")
        if name not in _SITES:
            raise ValueError(
                f"site bits {spec!r}: unknown scan site {_site_hint(name)}; the sites are {', '.join(_SITES)}"
            )
        if name in out:
            raise ValueError(f"site bits {spec!r}: site {name!r} is given twice")
        try:
            bits = int(value)
        except ValueError:
            raise ValueError(
                f"site bits {spec!r}: {value!r} for {name!r} is not an integer; "
                f"use a bit width in {MIN_BITS}..{MAX_BITS}"
            ) from None
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"site bits {spec!r}: {name}={bits} is outside {MIN_BITS}..{MAX_BITS}")
        out[name] = bits
    return out
