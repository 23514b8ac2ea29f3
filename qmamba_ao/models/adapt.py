"""Swap foreign Mamba mixers for qmamba-ao's traceable ones, weights included.

Supported (detected by class name, defining package and attribute layout, never by importing the
foreign package, so ``mamba_ssm`` need not be installed unless the model already contains it):

* ``mamba_ssm``'s ``Mamba`` (``mamba_ssm.modules.mamba_simple``) -> :class:`~qmamba_ao.models.mixer.UniMambaMixer`;
* the bidirectional fork shipped with Vim (``bimamba_type="v2"``: extra ``A_b_log``, ``D_b``,
  ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``) -> :class:`~qmamba_ao.models.vim.BiMambaMixer`;
* transformers' ``MambaMixer`` -> :class:`~qmamba_ao.models.mixer.UniMambaMixer`.

The replacement takes the foreign module's place (same attribute path), so state-dict keys stay
as they were except for the scan parameters, which move into the ``SelectiveScan`` leaf:
``A_log -> scan.A_log``, ``D -> scan.D``, ``dt_proj.bias -> scan.delta_bias`` (and the ``_b``
counterparts -> ``scan_b.*``), the same renames :func:`qmamba_ao.models.vim.checkpoint_filter_fn`
applies to official Vim checkpoints.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from qmamba_ao._utils import set_submodule
from qmamba_ao.ssm import SelectiveScan, is_float_scan

from .mixer import UniMambaMixer
from .vim import BiMambaMixer

__all__ = ["adapt_mamba", "find_mamba_mixers"]

_BACKWARD_PARTS = ("A_b_log", "D_b", "conv1d_b", "x_proj_b", "dt_proj_b")
_SUPPORTED_ACTIVATIONS = ("silu", "swish")
_KNOWN_LAYOUTS = (
    "mamba_ssm.modules.mamba_simple.Mamba (bimamba_type 'none' or 'v2'), "
    "transformers.models.mamba.modeling_mamba.MambaMixer"
)
# Foreign modules that look like a Mamba mixer: they own the scan's A matrix directly, or say so by name.
_A_PARAM = re.compile(r"^A_(b_)?logs?$")
_MIXER_NAME = re.compile(r"mamba.*mixer", re.IGNORECASE)


@dataclass
class _Found:
    path: str
    module: nn.Module
    kind: str  # "mamba_ssm", "bimamba_v2", "transformers" or "unknown"
    reason: str = ""


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _package(m: nn.Module) -> str:
    return type(m).__module__.split(".", 1)[0]


def _looks_like_mixer(m: nn.Module) -> bool:
    if _package(m) == "qmamba_ao":
        return False
    own = [name for name, _ in m.named_parameters(recurse=False)]
    return any(_A_PARAM.match(n) for n in own) or bool(_MIXER_NAME.search(type(m).__name__))


def _describe(m: nn.Module) -> str:
    params = [f"{n}{list(p.shape)}" for n, p in m.named_parameters(recurse=False)]
    children = [f"{n}:{type(c).__name__}" for n, c in m.named_children()]
    return f"parameters {params or 'none'}, children {children or 'none'}"


def _layout_problems(m: nn.Module, backward: bool) -> list[str]:
    """What stops ``m`` from being read as a Mamba mixer (empty when the layout is the known one)."""
    problems = []
    suffixes = ("", "_b") if backward else ("",)
    for sfx in suffixes:
        for name, kind in (("conv1d", nn.Conv1d), ("x_proj", nn.Linear), ("dt_proj", nn.Linear)):
            if not isinstance(getattr(m, name + sfx, None), kind):
                problems.append(f"no {kind.__name__} '{name + sfx}'")
        a_name, d_name = ("A_log", "D") if sfx == "" else ("A_b_log", "D_b")
        for name in (a_name, d_name):
            if not isinstance(getattr(m, name, None), Tensor):
                problems.append(f"no parameter '{name}'")
    for name in ("in_proj", "out_proj"):
        if not isinstance(getattr(m, name, None), nn.Linear):
            problems.append(f"no Linear '{name}'")
    if problems:
        return problems

    d_model, d_inner = m.in_proj.in_features, m.in_proj.out_features // 2
    n = m.A_log.shape[-1] if m.A_log.dim() == 2 else -1
    r = m.dt_proj.in_features
    if m.in_proj.out_features != 2 * d_inner or m.out_proj.in_features != d_inner or m.out_proj.out_features != d_model:
        sizes = f"in_proj {d_model}->{m.in_proj.out_features}, "
        sizes += f"out_proj {m.out_proj.in_features}->{m.out_proj.out_features}"
        problems.append(f"{sizes} are not the x/z split of a Mamba mixer")
    for sfx in suffixes:
        conv, x_proj, dt_proj = (getattr(m, k + sfx) for k in ("conv1d", "x_proj", "dt_proj"))
        a, d = (m.A_log, m.D) if sfx == "" else (m.A_b_log, m.D_b)
        k = conv.kernel_size[0]
        if (conv.in_channels, conv.out_channels, conv.groups) != (d_inner,) * 3 or conv.padding[0] != k - 1:
            problems.append(f"conv1d{sfx} is not a causal depthwise conv over {d_inner} channels (padding kernel-1)")
        if x_proj.in_features != d_inner or x_proj.out_features != r + 2 * n or x_proj.bias is not None:
            problems.append(f"x_proj{sfx} {x_proj.in_features}->{x_proj.out_features} is not {d_inner}->{r}+2*{n}")
        if dt_proj.out_features != d_inner or dt_proj.in_features != r or dt_proj.bias is None:
            problems.append(
                f"dt_proj{sfx} {dt_proj.in_features}->{dt_proj.out_features} (bias required) is not {r}->{d_inner}"
            )
        if tuple(a.shape) != (d_inner, n) or tuple(d.shape) != (d_inner,):
            problems.append(f"A/D{sfx} shapes {tuple(a.shape)}/{tuple(d.shape)} are not ({d_inner}, N)/({d_inner},)")
    if backward and m.conv1d_b.kernel_size != m.conv1d.kernel_size:
        problems.append("conv1d and conv1d_b have different kernel sizes")
    act = getattr(m, "activation", "silu")
    if act not in _SUPPORTED_ACTIVATIONS:
        problems.append(f"activation {act!r} (only SiLU is supported)")
    if getattr(m, "init_layer_scale", None) is not None or isinstance(getattr(m, "gamma", None), Tensor):
        problems.append("layer scale (init_layer_scale / gamma) is not supported")
    if backward and d_inner % d_model:
        problems.append(f"d_inner {d_inner} is not a multiple of d_model {d_model}")
    return problems


def _classify(path: str, m: nn.Module) -> Optional[_Found]:
    name, package = type(m).__name__, _package(m)
    if package == "mamba_ssm" and name == "Mamba":
        bimamba = getattr(m, "bimamba_type", "none")
        has_backward = [p for p in _BACKWARD_PARTS if hasattr(m, p)]
        if bimamba == "v2":
            problems = _layout_problems(m, backward=True)
            return _Found(path, m, "unknown" if problems else "bimamba_v2", "; ".join(problems))
        if bimamba not in (None, "none") or has_backward:
            why = f"bimamba_type={bimamba!r}" + (f" with backward parameters {has_backward}" if has_backward else "")
            return _Found(path, m, "unknown", f"{why}; only 'none' and 'v2' are supported")
        problems = _layout_problems(m, backward=False)
        return _Found(path, m, "unknown" if problems else "mamba_ssm", "; ".join(problems))
    if package == "transformers" and name == "MambaMixer":
        problems = _layout_problems(m, backward=False)
        return _Found(path, m, "unknown" if problems else "transformers", "; ".join(problems))
    if _looks_like_mixer(m):
        return _Found(path, m, "unknown", "not a known Mamba mixer class")
    return None


def _find(model: nn.Module) -> list[_Found]:
    """Every foreign Mamba-like module, outermost first; the parts of a found module are not searched."""
    found: list[_Found] = []
    for path, m in model.named_modules():
        if any(f.path == "" or path.startswith(f.path + ".") for f in found):
            continue
        hit = _classify(path, m)
        if hit is not None:
            found.append(hit)
    return found


def find_mamba_mixers(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(path, class, kind)`` of every foreign Mamba-like module in ``model``.

    ``kind`` is ``"mamba_ssm"``, ``"bimamba_v2"`` (Vim's fork), ``"transformers"``, or ``"unknown"``
    for a module :func:`adapt_mamba` would refuse.
    """
    return [(f.path, _qualname(f.module), f.kind) for f in _find(model)]


def _param(src: Tensor) -> nn.Parameter:
    return nn.Parameter(src.detach().clone(), requires_grad=src.requires_grad)


def _linear(src: nn.Linear, with_bias: bool = True, scale: float = 1.0) -> nn.Linear:
    """A plain copy of ``src`` (its dtype and device); ``with_bias=False`` drops the bias."""
    keep_bias = with_bias and src.bias is not None
    out = nn.Linear(src.in_features, src.out_features, bias=keep_bias, device="meta")
    out.weight = _param(src.weight * scale if scale != 1.0 else src.weight)
    if keep_bias:
        out.bias = _param(src.bias)
    return out


def _conv(src: nn.Conv1d) -> nn.Conv1d:
    out = nn.Conv1d(
        src.in_channels,
        src.out_channels,
        src.kernel_size,
        groups=src.groups,
        padding=src.padding,
        bias=src.bias is not None,
        device="meta",
    )
    out.weight = _param(src.weight)
    if src.bias is not None:
        out.bias = _param(src.bias)
    return out


def _fill_scan(scan: SelectiveScan, a_log: Tensor, d: Tensor, dt_proj: nn.Linear) -> None:
    scan.A_log = _param(a_log)
    scan.D = _param(d)
    scan.delta_bias = _param(dt_proj.bias)


def _build(found: _Found) -> nn.Module:
    m = found.module
    d_model, d_inner = m.in_proj.in_features, m.in_proj.out_features // 2
    d_state, dt_rank, d_conv = m.A_log.shape[1], m.dt_proj.in_features, m.conv1d.kernel_size[0]
    # Built on the meta device, then every parameter is replaced by a copy of the foreign one.
    with torch.device("meta"):
        if found.kind == "bimamba_v2":
            new: nn.Module = BiMambaMixer(d_model, d_state, d_conv, expand=d_inner // d_model, dt_rank=dt_rank)
        else:
            new = UniMambaMixer(d_model, d_state, d_conv, dt_rank=dt_rank, d_inner=d_inner)
    new.in_proj = _linear(m.in_proj)
    new.conv1d = _conv(m.conv1d)
    new.x_proj = _linear(m.x_proj)
    new.dt_proj = _linear(m.dt_proj, with_bias=False)
    _fill_scan(new.scan, m.A_log, m.D, m.dt_proj)
    new.out_proj = _linear(m.out_proj)
    if found.kind == "bimamba_v2":
        new.conv1d_b = _conv(m.conv1d_b)
        new.x_proj_b = _linear(m.x_proj_b)
        new.dt_proj_b = _linear(m.dt_proj_b, with_bias=False)
        _fill_scan(new.scan_b, m.A_b_log, m.D_b, m.dt_proj_b)
        divide = getattr(m, "if_devide_out", getattr(m, "if_divide_out", True))
        if not divide:
            # The fork sums the two directions; BiMambaMixer averages them. out_proj is linear, so
            # doubling its weight (not its bias) gives the sum.
            new.out_proj = _linear(m.out_proj, scale=2.0)
        if getattr(m, "use_fast_path", True) is False:
            warnings.warn(
                f"{found.path or 'model'}: this bidirectional Mamba has use_fast_path=False, whose forward runs the "
                "forward direction only; the replacement computes both directions (bimamba v2), the model the "
                "released checkpoints were trained as.",
                UserWarning,
                stacklevel=3,
            )
    leftover = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if leftover:  # a layout this adapter fills incompletely; never hand back a half-built module
        raise RuntimeError(f"adapt_mamba left parameters uninitialised in {found.path}: {leftover}")
    new.train(m.training)
    return new


def adapt_mamba(model: nn.Module) -> nn.Module:
    """Replace every foreign Mamba mixer in ``model`` by qmamba-ao's equivalent; returns the model.

    The model is changed in place (``copy.deepcopy`` it first to keep the original); if ``model`` is
    itself a mixer, the replacement is returned. Parameters keep their dtype, device and
    ``requires_grad``. Each replacement computes what the foreign module's full-sequence forward
    computes (for the Vim fork, its bimamba v2 fast path), with the scan as a
    :class:`~qmamba_ao.ssm.SelectiveScan` leaf that torch.ao can quantize.

    Decoding caches are not supported: for a transformers model, ``config.use_cache`` is set to
    False so that a plain ``model(input_ids)`` works, and passing a cache raises ValueError.

    Raises ValueError, before changing anything, if the model has no Mamba mixer, or if any
    Mamba-like module has a layout this function does not know (all of them are listed).
    A model already built from qmamba-ao's modules (it has SelectiveScan leaves) is returned unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt_mamba expects a torch.nn.Module, got {type(model).__name__}")
    found = _find(model)
    unknown = [f for f in found if f.kind == "unknown"]
    if unknown:
        lines = [f"adapt_mamba cannot convert {len(unknown)} Mamba-like module(s) whose layout it does not know:"]
        for f in unknown:
            lines.append(f"  {f.path or '<model>'}: {_qualname(f.module)} ({f.reason}); {_describe(f.module)}")
        known = [f for f in found if f.kind != "unknown"]
        if known:
            lines.append(f"  ({len(known)} supported mixer(s) found as well; nothing was changed.)")
        lines.append(f"Supported layouts: {_KNOWN_LAYOUTS}.")
        raise ValueError("\n".join(lines))
    if not found:
        if any(is_float_scan(m) for m in model.modules()):
            return model  # already built from qmamba-ao's modules
        types = sorted({_qualname(m) for m in model.modules()})
        shown = ", ".join(types[:15]) + (", ..." if len(types) > 15 else "")
        raise ValueError(
            f"adapt_mamba found no Mamba mixer in {type(model).__name__}. Supported layouts: {_KNOWN_LAYOUTS}. "
            f"Module types found ({len(types)}): {shown}"
        )

    replacements = [(f, _build(f)) for f in found]  # all built before the model is touched
    for f, new in replacements:
        if f.path == "":
            return new
        set_submodule(model, f.path, new)
    config = getattr(model, "config", None)
    if any(f.kind == "transformers" for f in found) and getattr(config, "use_cache", None):
        config.use_cache = False
    return model
