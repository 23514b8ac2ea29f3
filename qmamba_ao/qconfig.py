"""torch.ao configuration factories: custom-module mappings and the PTQ recipes.

A recipe is only a choice of observer per place; everything goes through torch.ao's
``QConfigMapping``. The scan's QConfig carries a :class:`~qmamba_ao.ssm.quantized.ScanQuantSpec`
(one quantizer per internal site), which survives ``prepare_fx`` where a QConfig subclass would not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.fx.custom_config import ConvertCustomConfig, PrepareCustomConfig
from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver

from .observers import LtSQObserver, PercentileObserver, PerTokenObserver, TGQObserver, check_bits, int_range
from .ssm import SelectiveScan
from .ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan, ScanQuantSpec
from .transforms import ChannelScale, Hadamard, rotate_out_proj, smooth_linears

__all__ = [
    "prepare_custom_config",
    "convert_custom_config",
    "get_qconfig_mapping",
    "list_recipes",
    "describe_recipes",
    "weight_observer",
    "activation_observer",
    "per_token_activation_observer",
    "recipe_transform",
]

ObserverCtor = Callable[..., nn.Module]

#: Modules that sit at the ends of the network and keep 8 bits by default (timm names of the
#: Vim and VMamba families): the patch embedding and the classifier head.
FIRST_LAST_PATTERNS = (r"^patch_embed\..*", r"^patch_embed$", r"^head$", r"^classifier\.head$")


def _require_scan(model: Optional[nn.Module], expected: type) -> None:
    if model is None:
        return
    if not any(isinstance(m, expected) for m in model.modules()):
        found = sorted({type(m).__name__ for m in model.modules()})[:12]
        raise ValueError(
            f"{type(model).__name__} contains no {expected.__name__} module, so qmamba-ao has nothing to "
            f"quantize inside a selective scan. Build the model from qmamba_ao.models (timm names such as "
            f"'vim_tiny_patch16_224') or convert foreign Mamba mixers first. Module types found: {found}"
        )


def prepare_custom_config(model: Optional[nn.Module] = None) -> PrepareCustomConfig:
    """PrepareCustomConfig mapping SelectiveScan -> ObservedSelectiveScan (an FX leaf).

    Pass ``model`` to check that it really contains a SelectiveScan.
    """
    _require_scan(model, SelectiveScan)
    return PrepareCustomConfig().set_float_to_observed_mapping(SelectiveScan, ObservedSelectiveScan)


def convert_custom_config(model: Optional[nn.Module] = None) -> ConvertCustomConfig:
    """ConvertCustomConfig mapping ObservedSelectiveScan -> QuantizedSelectiveScan.

    Pass the prepared ``model`` to check that it contains an observed scan.
    """
    _require_scan(model, ObservedSelectiveScan)
    return ConvertCustomConfig().set_observed_to_quantized_mapping(ObservedSelectiveScan, QuantizedSelectiveScan)


# ----------------------------------------------------------------------------------------------
# Observer constructors
# ----------------------------------------------------------------------------------------------


def weight_observer(bits: int) -> ObserverCtor:
    """Symmetric per-output-channel weights in the narrow signed range ``[-(2^(b-1)-1), 2^(b-1)-1]``.

    The narrow range keeps the grid symmetric, and it matters for correctness: with the full range
    torch.ao's symmetric scale maps the largest weight to ``2^(b-1) - 0.5``, which rounds one level
    beyond ``quant_max``, and the x86 conversion stores it without clamping (a 6-bit weight
    becomes 32).
    """
    _, qmax = int_range(bits, signed=True)
    return PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-qmax, quant_max=qmax
    )


def activation_observer(kind: str, bits: int, percentile: float = 99.99) -> ObserverCtor:
    """Per-tensor asymmetric activations in an unsigned ``bits``-bit range (stored as quint8)."""
    qmin, qmax = int_range(bits, signed=False)
    common = dict(dtype=torch.quint8, quant_min=qmin, quant_max=qmax)
    if kind == "minmax":
        return MinMaxObserver.with_args(**common)
    if kind == "percentile":
        return PercentileObserver.with_args(percentile=percentile, **common)
    if kind == "histogram":
        return HistogramObserver.with_args(**common)
    raise ValueError(f"unknown activation observer kind {kind!r}; use 'minmax', 'percentile' or 'histogram'")


def per_token_activation_observer(bits: int, token_axis: int = 1) -> ObserverCtor:
    """Static per-token asymmetric activations (PTQ4VM's PTS): one calibrated min/max per token position.

    ``token_axis=1`` fits Linear inputs ``(batch, tokens, channels)``. torch.ao treats it as a
    per-channel activation (``ch_axis = token_axis``); the token count must stay fixed (Vim's is).
    """
    qmin, qmax = int_range(bits, signed=False)
    return PerTokenObserver.with_args(
        token_axis=token_axis, dtype=torch.quint8, qscheme=torch.per_channel_affine, quant_min=qmin, quant_max=qmax
    )


# ----------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """What a recipe quantizes and with which observer.

    ``act``: observer for linear/conv inputs and the scan's inputs and output; ``scan``: whether
    the selective scan is quantized at all; ``dA``/``dBu``/``h``/``y``: ``"ltsq"``, ``"tgq"``,
    ``"uniform"`` (the recipe's ``act`` observer), ``"minmax"`` or ``None`` (float).

    Optional fields (baseline recipes): ``transform``: a float-equivalent model transform applied
    before ``prepare_fx`` (``"smooth"``: :func:`qmamba_ao.transforms.smooth_linears`,
    ``"hadamard"``: :func:`qmamba_ao.transforms.rotate_out_proj`), see :func:`recipe_transform`;
    ``linear_act``: ``"per_token"`` for static per-token Linear inputs (``None``: ``act``);
    ``scan_act``: observer kind for the scan's inputs/output and its ``"uniform"`` sites
    (``None``: ``act``); ``scan_percentile``: fixed percentile for a percentile ``scan_act``
    (``None``: the ``percentile`` option).
    """

    name: str
    act: str
    scan: bool
    dA: Optional[str]
    dBu: Optional[str]
    h: Optional[str]
    y: Optional[str]
    summary: str
    transform: Optional[str] = None
    linear_act: Optional[str] = None
    scan_act: Optional[str] = None
    scan_percentile: Optional[float] = None


_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # QMamba's two quantizers on the scan; the Linear layers handled as PTQ4VM does (smoothing +
        # static per-token inputs), so that the scan quantizers are compared on top of the best
        # linear-layer scheme here: without it, 4-bit per-tensor Linear inputs dominate the error.
        Recipe(
            "qmamba",
            "minmax",
            True,
            "ltsq",
            "ltsq",
            "tgq",
            "uniform",
            "QMamba: LtSQ on dA and dBu, TGQ on h; scan inputs/output and y percentile-clipped; "
            "Linear inputs smoothed + static per-token (as ptq4vm)",
            transform="smooth",
            linear_act="per_token",
            scan_act="percentile",
        ),
        Recipe(
            "qmamba-ltsq-only",
            "minmax",
            True,
            "ltsq",
            "ltsq",
            "uniform",
            "uniform",
            "ablation: qmamba with a percentile-clipped uniform h instead of TGQ",
            transform="smooth",
            linear_act="per_token",
            scan_act="percentile",
        ),
        Recipe(
            "qmamba-tgq-only",
            "minmax",
            True,
            "uniform",
            "uniform",
            "tgq",
            "uniform",
            "ablation: qmamba with percentile-clipped uniform dA and dBu instead of LtSQ",
            transform="smooth",
            linear_act="per_token",
            scan_act="percentile",
        ),
        Recipe(
            "minmax",
            "minmax",
            True,
            "uniform",
            "uniform",
            "uniform",
            "uniform",
            "min/max uniform everywhere, scan sites included",
        ),
        Recipe(
            "percentile",
            "percentile",
            True,
            "uniform",
            "uniform",
            "uniform",
            "uniform",
            "percentile-clipped uniform everywhere, scan sites included",
        ),
        Recipe(
            "histogram",
            "histogram",
            True,
            "uniform",
            "uniform",
            "uniform",
            "uniform",
            "torch.ao's HistogramObserver (L2-optimal range) everywhere, scan sites included",
        ),
        # Baselines. PTQ4VM (Cho et al., 2024): static per-token (PTS) Linear inputs after
        # SmoothQuant-style smoothing of the mixer Linears, selective scan in float (as its code).
        # NOT included: JLSS, its gradient-based joint learning of smoothing scales and step sizes,
        # and the Lp-search initialisation of the step sizes (per-token min/max here). Unlike its
        # code, Conv1d / patch embedding / head are quantized too (min/max; 8-bit first/last), so
        # that every recipe covers the same layers. Quamba (Chiang et al., 2024): scan input clipped
        # at the 99.999th percentile (torch.ao observes all scan inputs and the output with one
        # activation observer, so delta/B/C/z and the output get it too), Hadamard rotation of
        # out_proj's input folded into its weight, min/max elsewhere; activations stay asymmetric.
        Recipe(
            "ptq4vm",
            "minmax",
            False,
            None,
            None,
            None,
            None,
            "PTQ4VM without its learned JLSS step: SmoothQuant smoothing (alpha 0.5) + static per-token "
            "Linear inputs, selective scan in float",
            transform="smooth",
            linear_act="per_token",
        ),
        Recipe(
            "ptq4vm-naive-ssm",
            "minmax",
            True,
            "uniform",
            "uniform",
            "uniform",
            "uniform",
            "ptq4vm (no JLSS) + percentile-clipped uniform scan inputs/output and dA, dBu, h, y",
            transform="smooth",
            linear_act="per_token",
            scan_act="percentile",
        ),
        Recipe(
            "quamba",
            "minmax",
            True,
            "minmax",
            "minmax",
            "minmax",
            "minmax",
            "Quamba: 99.999th-percentile scan input, Hadamard-rotated out_proj input, min/max elsewhere",
            transform="hadamard",
            scan_act="percentile",
            scan_percentile=99.999,
        ),
    )
}

#: Float-equivalent transforms a recipe may name (``Recipe.transform``).
TRANSFORMS = ("smooth", "hadamard")


def list_recipes() -> list[str]:
    """Names accepted by :func:`get_qconfig_mapping`."""
    return list(_RECIPES)


def describe_recipes() -> list[tuple[str, str]]:
    """``(name, one-line summary)`` for every recipe."""
    return [(r.name, r.summary) for r in _RECIPES.values()]


def _site_observer(choice: Optional[str], act: ObserverCtor, bits: int, options: dict) -> Optional[ObserverCtor]:
    if choice is None:
        return None
    if choice == "uniform":
        return act
    if choice == "minmax":
        return activation_observer("minmax", bits)
    qmin, qmax = int_range(bits, signed=False)
    if choice == "ltsq":
        return LtSQObserver.with_args(dtype=torch.quint8, quant_min=qmin, quant_max=qmax)
    if choice == "tgq":
        return TGQObserver.with_args(
            num_groups=options["tgq_groups"],
            grouping=options["tgq_grouping"],
            clip=options["tgq_clip"],
            percentile=options["percentile"],
            dtype=torch.quint8,
            quant_min=qmin,
            quant_max=qmax,
        )
    raise ValueError(f"unknown site quantizer {choice!r}")


def get_qconfig_mapping(
    recipe: str = "qmamba",
    w_bits: int = 4,
    a_bits: int = 4,
    *,
    first_last_bits: Optional[int] = 8,
    h_feedback: bool = False,
    tgq_groups: int = 8,
    tgq_grouping: str = "uniform",
    tgq_clip: str = "percentile",
    percentile: float = 99.99,
) -> QConfigMapping:
    """The QConfigMapping of a recipe at ``w_bits`` / ``a_bits`` (each 2..8).

    Quantized: every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (weights symmetric per output
    channel, inputs per tensor) and, unless the recipe keeps it in float, every SelectiveScan (its
    inputs and output through torch.ao, its internal sites ``dA``, ``dBu``, ``h``, ``y`` through
    the recipe's site quantizers). Norms, residual adds and element-wise ops stay in float.
    ``first_last_bits`` (default 8; ``None`` = same as the rest) applies to the patch embedding
    and the classifier head. ``h_feedback``: whether the quantized state feeds the recurrence
    (default False, chosen by measurement; README "Results" has both settings). ``tgq_groups``,
    ``tgq_grouping`` and ``tgq_clip`` configure TGQ (:class:`~qmamba_ao.observers.TGQObserver`);
    ``percentile`` is the clipping percentile of the percentile observers and of TGQ's groups.
    """
    if recipe not in _RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {list_recipes()}")
    for name, b in (("w_bits", w_bits), ("a_bits", a_bits)) + (
        (("first_last_bits", first_last_bits),) if first_last_bits is not None else ()
    ):
        try:
            check_bits(b)
        except ValueError as e:
            raise ValueError(f"{name}={b!r}: {e}") from None
    if tgq_groups < 1:
        raise ValueError(f"tgq_groups must be >= 1; got {tgq_groups}")
    if tgq_clip not in ("percentile", "mse", "minmax"):
        raise ValueError(f"tgq_clip must be 'percentile', 'mse' or 'minmax'; got {tgq_clip!r}")
    r = _RECIPES[recipe]
    options = dict(tgq_groups=tgq_groups, tgq_grouping=tgq_grouping, tgq_clip=tgq_clip, percentile=percentile)
    per_token = r.linear_act == "per_token"

    def layer_qconfig(wb: int, ab: int, token: bool = False) -> QConfig:
        act = per_token_activation_observer(ab) if token else activation_observer(r.act, ab, percentile)
        return QConfig(activation=act, weight=weight_observer(wb))

    mapping = QConfigMapping()
    mapping.set_object_type(nn.Linear, layer_qconfig(w_bits, a_bits, per_token))
    for op in (nn.Conv1d, nn.Conv2d):
        mapping.set_object_type(op, layer_qconfig(w_bits, a_bits))
    if r.scan:
        scan_pct = percentile if r.scan_percentile is None else r.scan_percentile
        act = activation_observer(r.scan_act or r.act, a_bits, scan_pct)
        sites = {s: _site_observer(getattr(r, s), act, a_bits, options) for s in ("dA", "dBu", "h", "y")}
        spec = ScanQuantSpec(act, sites, h_feedback=h_feedback)
        # torch.ao insists on a weight constructor for custom modules; the scan has no weight.
        mapping.set_object_type(SelectiveScan, QConfig(activation=spec, weight=weight_observer(8)))
    else:
        mapping.set_object_type(SelectiveScan, None)
    # The transforms' helper modules (online 1/s scaling, Hadamard rotation) always stay in float.
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


def recipe_transform(recipe: str, *, alpha: float = 0.5) -> Optional[Callable[[nn.Module, Iterable[Any]], nn.Module]]:
    """The float-equivalent model transform a recipe applies before ``prepare_fx``, or ``None``.

    Returns ``fn(model, calib_batches) -> new_model`` (the input model is not modified):
    ``qmamba`` (and its ablations), ``ptq4vm`` and ``ptq4vm-naive-ssm`` smooth the mixers' Linears with ``alpha``
    (:func:`qmamba_ao.transforms.smooth_linears`, a float calibration pass over ``calib_batches``);
    ``quamba`` rotates each ``out_proj`` input (:func:`qmamba_ao.transforms.rotate_out_proj`,
    data-free). :func:`qmamba_ao.quantize` calls it for you; with the raw torch.ao calls, run
    ``model = recipe_transform(recipe)(model, calib_data)`` before ``prepare_fx``.
    """
    if recipe not in _RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {list_recipes()}")
    kind = _RECIPES[recipe].transform
    if kind is None:
        return None
    if kind == "smooth":

        def smooth(model: nn.Module, calib_batches: Iterable[Any]) -> nn.Module:
            return smooth_linears(model, calib_batches, alpha=alpha)

        return smooth
    if kind == "hadamard":

        def rotate(model: nn.Module, calib_batches: Iterable[Any] = ()) -> nn.Module:
            return rotate_out_proj(model)

        return rotate
    raise ValueError(f"recipe {recipe!r} names an unknown transform {kind!r}; known: {list(TRANSFORMS)}")
