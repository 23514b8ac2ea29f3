"""``quantize``: a recipe's model rewrite, torch.ao's prepare_fx, calibration and conversion, with a progress bar.

Nothing here does what the standard calls cannot: a user can write the same calls by hand with
:func:`qmamba_ao.get_qconfig_mapping` and the two custom configs. The one thing :func:`quantize`
adds is a recipe's float-equivalent model rewrite (``qmamba`` / ``ptq4vm``: smoothing, ``quamba``:
Hadamard rotation), applied to a copy of the model before ``prepare_fx``; with the raw calls, apply
it yourself: ``model = qmamba_ao.get_recipe(recipe).rewrite(model, calib_data)``.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase
from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx, convert_fx, prepare_fx
from torch.fx import Node
from tqdm import tqdm

from . import distributed
from ._utils import batch_input
from .lowered import float_depthwise_convs
from .observers._base import QObserverBase
from .observers.affine import bits_of_range, is_per_channel
from .qconfig import convert_custom_config, prepare_custom_config
from .recipes import Recipe, get_recipe, list_recipes
from .reconstruct import reconstruct as learn_qparams
from .ssm import is_float_scan
from .ssm.quantized import ObservedSelectiveScan, QuantizedSelectiveScan

__all__ = ["quantize", "prepare", "calibrate", "convert", "prepare_calibrated", "evaluate"]


def prepare(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    recipe: Union[str, Recipe] = "qmamba",
    w_bits: int = 4,
    a_bits: int = 4,
    qconfig_mapping: Optional[QConfigMapping] = None,
    **options: Any,
) -> torch.fx.GraphModule:
    """``prepare_fx`` with the recipe's QConfigMapping and qmamba-ao's prepare config (model copied).

    A ``qconfig_mapping`` given explicitly (e.g. a recipe edited with ``set_module_name``) is used
    as it is, instead of the recipe.

    ``prepare`` does not apply a recipe's model rewrite (it has no calibration data): for
    ``qmamba`` / ``ptq4vm`` / ``quamba`` pass ``get_recipe(recipe).rewrite(model, calib_data)`` as
    ``model``, or use :func:`quantize`.
    """
    if qconfig_mapping is not None:
        if options:
            raise ValueError(
                f"mapping option(s) {', '.join(options)} have no effect next to an explicit qconfig_mapping: "
                "set them when building the mapping (qmamba_ao.get_qconfig_mapping(recipe, w_bits, a_bits, ...))"
            )
        mapping = qconfig_mapping
    else:
        mapping = get_recipe(recipe).qconfig_mapping(w_bits, a_bits, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        return prepare_fx(
            copy.deepcopy(model).eval(),
            mapping,
            example_inputs,
            prepare_custom_config=prepare_custom_config(model),
        )


def _is_observer(mod: Any) -> bool:
    return isinstance(mod, (ObserverBase, FakeQuantizeBase))


def _arg_label(user: Node, node: Node, module: nn.Module) -> str:
    """``input of X``, or ``input 'delta' of X`` for a module called with several tensors."""
    args = [a for a in user.args if isinstance(a, Node)]
    if len(args) <= 1 or node not in user.args:
        return f"input of {user.target}"
    i = user.args.index(node)
    try:
        params = list(inspect.signature(module.forward).parameters)
        which = repr(params[i]) if i < len(params) else str(i)
    except (TypeError, ValueError):
        which = str(i)
    return f"input {which} of {user.target}"


_PASS_THROUGH = ("Identity", "Dropout", "DropPath")


def _describe_observer_node(node: Node, modules: dict[str, nn.Module]) -> str:
    """Where an observer call of a prepared graph sits, in the model's own module names.

    A quantized layer that consumes the observed tensor names it (``input of layers.0.mixer.in_proj``),
    else a quantized layer that produced it (``output of layers.0.mixer.in_proj``), else any module
    consuming it, else the nearest module upstream (``output of patch_embed.proj (after flatten)``).
    """

    def quantized(n: Any) -> bool:  # a layer the mapping quantizes (not a norm, an identity or a dropout)
        mod = modules.get(n.target)
        return getattr(mod, "qconfig", None) is not None and type(mod).__name__ not in _PASS_THROUGH

    def module_call(n: Any) -> bool:
        return isinstance(n, Node) and n.op == "call_module" and not _is_observer(modules.get(n.target))

    calls = [u for u in node.users if module_call(u)]
    src = node.args[0] if node.args else None
    for users in ([u for u in calls if quantized(u)], [] if module_call(src) and quantized(src) else calls):
        if users:
            labels = [_arg_label(u, node, modules[u.target]) for u in users]
            return ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
    hops: list[str] = []
    while isinstance(src, Node):
        if src.op == "call_module" and not _is_observer(modules.get(src.target)):
            after = f" (after {', '.join(reversed(hops))})" if hops else ""
            return f"output of {src.target}{after}"
        if src.op == "placeholder":
            return f"model input {src.target!r}" + (f" (after {', '.join(reversed(hops))})" if hops else "")
        if src.op != "call_module":
            hops.append(src.name)
        src = src.args[0] if src.args else None
    if any(u.op == "output" for u in node.users):
        return "model output"
    return f"graph node {node.name!r}"


def observer_names(prepared: nn.Module) -> dict[str, str]:
    """Module path of every observer of a prepared model -> where it sits, in the model's own names.

    torch.ao's observers (``activation_post_process_3``) are described through the prepared
    graph: ``input of layers.0.mixer.in_proj``, ``output of patch_embed.proj``, ``input 'delta'
    of layers.0.mixer.scan``; the scans' site observers as ``layers.0.mixer.scan.h``. Listed in
    the order the model runs them (graph order), then any observer the graph does not call.
    """
    modules = dict(prepared.named_modules())
    names: dict[str, str] = {}
    graph = getattr(prepared, "graph", None)
    for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
        if node.op != "call_module" or not isinstance(node.target, str):
            continue
        mod = modules.get(node.target)
        if _is_observer(mod):
            names.setdefault(node.target, _describe_observer_node(node, modules))
        elif isinstance(mod, ObservedSelectiveScan):
            for site in mod.site_modules:
                names[f"{node.target}.site_modules.{site}"] = f"{node.target}.{site}"
    for name, mod in modules.items():
        if isinstance(mod, ObservedSelectiveScan):
            for site in mod.site_modules:
                names.setdefault(f"{name}.site_modules.{site}", f"{name}.{site}")
    for name, mod in modules.items():
        if _is_observer(mod) and name not in names and not any(name.startswith(k + ".") for k in names):
            names[name] = name
    return names


def name_sites(prepared: nn.Module) -> dict[str, str]:
    """Give every observer of a prepared model a readable ``site_name`` for error messages.

    Scan sites become ``layers.3.mixer.scan.h``; torch.ao's activation observers are named after
    the layer they observe (see :func:`observer_names`). Returns :func:`observer_names`.
    """
    names = observer_names(prepared)
    for path, label in names.items():
        prepared.get_submodule(path).site_name = label
    return names


# -- calibration checks ------------------------------------------------------------------------------


def check_calibration_batch(index: int, x: Tensor) -> None:
    """Raise ValueError for a calibration batch with no values or with NaN / Inf values (named by index)."""
    if x.numel() == 0:
        what = "no images" if x.dim() == 0 or x.shape[0] == 0 else "no values"
        raise ValueError(
            f"calibration batch {index} holds {what} (shape {tuple(x.shape)}); give batches with at least one image"
        )
    if x.is_floating_point() or x.is_complex():
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            nan, total = int(torch.isnan(x).sum()), int((~finite).sum())
            rows = (~finite).reshape(x.shape[0], -1).any(1).nonzero().reshape(-1).tolist() if x.dim() > 1 else []
            where = f" in image(s) {rows[:8]}{' ...' if len(rows) > 8 else ''} of the batch" if rows else ""
            raise ValueError(
                f"calibration batch {index} has {nan} NaN and {total - nan} Inf values{where} "
                f"(shape {tuple(x.shape)}); calibration data must be finite: drop or repair those images"
            )


def _stats_holders(prepared: nn.Module, names: dict[str, str]) -> list[tuple[str, str, nn.Module]]:
    """``(path, label, module)`` of every torch.ao observer with ``min_val`` / ``max_val`` buffers, in graph order.

    qmamba-ao's own observers raise on non-finite values as they see them; torch.ao's record NaN /
    Inf silently (HistogramObserver drops Inf), so their statistics are checked after each batch.
    """
    out = []
    for path, label in names.items():
        obs = prepared.get_submodule(path)
        for mod in obs.modules():
            if isinstance(mod, QObserverBase):
                continue
            if isinstance(getattr(mod, "min_val", None), Tensor) and isinstance(getattr(mod, "max_val", None), Tensor):
                out.append((path, label, mod))
    return out


def _nonfinite(mod: nn.Module) -> bool:
    lo, hi = mod.min_val, mod.max_val
    if lo.shape != hi.shape:
        return not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all()))
    empty = (lo == float("inf")) & (hi == float("-inf"))  # nothing observed yet
    bad = torch.isnan(lo) | torch.isnan(hi) | ((torch.isinf(lo) | torch.isinf(hi)) & ~empty)
    return bool(bad.any())


def _first_nonfinite(holders: list[tuple[str, str, nn.Module]]) -> Optional[tuple[str, str, nn.Module]]:
    """The first observer (in graph order) whose statistics hold NaN or Inf, if any."""
    stats = [t.reshape(-1) for _, _, m in holders for t in (m.min_val, m.max_val)]
    if not stats or bool(torch.isfinite(torch.cat(stats)).all()):  # one check for the usual case
        return None
    return next((h for h in holders if _nonfinite(h[2])), None)


def _nonfinite_error(index: int, path: str, label: str, mod: nn.Module) -> ValueError:
    return ValueError(
        f"calibration batch {index}: non-finite values (NaN or Inf) first reached the observer at: {label} "
        f"({path}, {type(mod).__name__}). The batch itself is finite, so they arise inside the model: check the "
        f"weights and the float output of the layers up to {label.split(' of ')[-1]} on this batch"
    )


def _observer_in_traceback(tb: Any, by_id: dict[int, str]) -> Optional[str]:
    """Path of the innermost observer whose code is on the traceback (the one that raised)."""
    found = None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in by_id:
            found = by_id[id(owner)]
        tb = tb.tb_next
    return found


def _calibration_error(
    err: Exception, index: int, prepared: nn.Module, names: dict[str, str], holders: list
) -> Optional[Exception]:
    """A clearer error for one raised while calibrating on batch ``index``, or None to re-raise as it is."""
    by_id = {id(prepared.get_submodule(p)): p for p in names}
    for p in names:
        for m in prepared.get_submodule(p).modules():
            by_id.setdefault(id(m), p)
    path = _observer_in_traceback(err.__traceback__, by_id)
    text = str(err)
    nonfinite = "non-finite" in text or "not finite" in text
    if path is None or not nonfinite:
        if path is not None and isinstance(err, ValueError):
            return ValueError(f"calibration batch {index}: {text}")
        return None
    first = _first_nonfinite(holders)  # a torch.ao observer upstream may have met them first
    if first is not None:
        return _nonfinite_error(index, *first)
    return _nonfinite_error(index, path, names[path], prepared.get_submodule(path))


@torch.inference_mode()
def calibrate(
    prepared: nn.Module,
    calib_data: Iterable[Any],
    progress: bool = True,
    sync: Optional[bool] = None,
    shard: Optional[tuple[int, int]] = None,
) -> int:
    """Run the prepared model over ``calib_data``; returns the number of batches seen.

    Each batch is checked before it runs: an empty batch or one with NaN / Inf values is a
    ValueError naming the batch. Non-finite values that arise inside the model (a NaN weight, an
    overflow) are a ValueError naming the batch and the first observer that met them, by the
    layer it observes (e.g. ``output of layers.0.mixer.in_proj``), for qmamba-ao's observers and
    torch.ao's (whose statistics are checked after every batch) alike.

    Under an initialised ``torch.distributed`` process group each process passes its own share of
    the calibration data; at the end the observers are merged across processes
    (:func:`qmamba_ao.distributed.sync_observers`), so that every process holds the statistics of
    all of it. ``sync``: ``None`` (default) merges when a group exists; when calibrating in several
    calls pass ``False`` to all but the last (a model is merged once). ``shard``: ``(images,
    batches)`` that the processes before this one calibrate on, when the shares are contiguous runs
    of whole batches (:func:`qmamba_ao.distributed.calibration_offsets`); with it the sampled
    statistics (``LtSQObserver``, ``MSEObserver``) merge into exactly one process's, without it
    approximately (see :mod:`qmamba_ao.distributed`). Give it to the first call only.
    """
    names = name_sites(prepared)
    holders = _stats_holders(prepared, names)
    n = 0
    total = len(calib_data) if hasattr(calib_data, "__len__") else None  # type: ignore[arg-type]
    show = progress and distributed.is_main()
    for batch in tqdm(calib_data, total=total, desc="calibrating", disable=not show, unit="batch"):
        x = batch_input(batch)
        check_calibration_batch(n, x)
        if n == 0:
            prepared._calibration_input_shape = tuple(x.shape[1:])
            if shard is not None:
                distributed.set_shard_offsets(prepared, shard, batch_images=len(x))
        try:
            prepared(x)
        except (ValueError, RuntimeError) as e:
            better = _calibration_error(e, n, prepared, names, holders)
            if better is None:
                raise
            raise better from e
        first = _first_nonfinite(holders)
        if first is not None:
            raise _nonfinite_error(n, *first)
        n += 1
    if n == 0:
        raise ValueError("calib_data is empty: give at least one batch of calibration images")
    if sync is None or sync:
        distributed.sync_observers(prepared)
    return n


def per_channel_activations(prepared: nn.Module) -> list[str]:
    """Names of the activation observers of a prepared model that quantize per channel / per token."""
    return [
        name
        for name, m in prepared.named_modules()
        if name.rpartition(".")[2].startswith("activation_post_process") and is_per_channel(getattr(m, "qscheme", None))
    ]


def _activation_observers(prepared: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, observer)`` of the activation observers torch.ao turns into quantize ops (scan outputs included)."""
    out = []
    for name, m in prepared.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf.startswith("activation_post_process") and _is_observer(m):
            out.append((name, m))
    return out


def lowering_problem(prepared: nn.Module) -> Optional[str]:
    """Why ``convert(prepared, reference=False)`` would be wrong (None if it would not).

    torch.ao's x86 lowering stores every activation in a quint8 tensor (0..255) with the
    observer's scale and zero point, and neither its kernels nor the quantize ops clamp to a
    narrower ``quant_min``/``quant_max``: an activation observed at 4 bits (0..15) would carry
    16, 17, ... for inputs beyond the calibrated range, so the lowered model would not compute
    what the observers describe. 7-bit activations (0..127, torch.ao's own x86 default and
    :meth:`Recipe.x86_qconfig_mapping <qmamba_ao.recipes.Recipe.x86_qconfig_mapping>`) and 8-bit
    ones are what the kernels are made for.
    """
    narrow = []
    for name, obs in _activation_observers(prepared):
        qmin, qmax = getattr(obs, "quant_min", None), getattr(obs, "quant_max", None)
        if isinstance(qmin, int) and isinstance(qmax, int) and qmax - qmin + 1 < 128:
            label = getattr(obs, "site_name", None) or name
            narrow.append((bits_of_range(qmin, qmax), f"{label} ({qmin}..{qmax})"))
    if not narrow:
        return None
    low = min(b for b, _ in narrow)
    examples = "; ".join(d for _, d in narrow[:3]) + (f"; and {len(narrow) - 3} more" if len(narrow) > 3 else "")
    return (
        f"torch.ao's x86 int8 kernels (reference=False) take 7- or 8-bit activations: they store every activation "
        f"in 8 bits and do not clamp it to a narrower observer range, so {low}-bit activations would leave their "
        f"{2**low} levels. {len(narrow)} activation observer(s) have fewer than 7 bits: {examples}. Activations "
        "below 7 bits (a_bits, first_last_bits) are only simulated: use reference=True (quantize's default)"
    )


def convert(prepared: nn.Module, reference: bool = False) -> torch.fx.GraphModule:
    """``convert_fx`` (x86 quantized kernels) or torch.ao's decomposed reference conversion, with qmamba-ao's config.

    torch.ao's x86 backend has no kernels for per-channel (per-token) activations, and its
    lowering moves shape ops such as ``transpose`` onto per-channel quantized tensors, which fails
    at run time. A prepared model with such observers (recipe ``ptq4vm``) is therefore converted
    as the reference model even when ``reference=False``, with a warning.

    ``reference=False`` refuses activations below 7 bits (a ValueError, see :func:`lowering_problem`):
    the x86 lowering keeps activations in quint8 without clamping them to the observer's range,
    so a 4-bit activation would not stay on 16 levels. Such models run as the reference model.

    The reference model's scans are :class:`~qmamba_ao.ssm.quantized.FakeQuantizedSelectiveScan`
    (``convert_custom_config(float_output=True)``), which return their fake-quantized output in float.
    A model with static per-token activations runs at its calibration input size only: a different
    token count is a ValueError naming the layer and both sizes.
    """
    if not reference and per_channel_activations(prepared):
        warnings.warn(
            "the model quantizes activations per token (per channel), which torch.ao's x86 backend has no "
            "kernels for; converting to the reference model (simulated quantization) instead. "
            "Pass reference=True to silence this warning.",
            UserWarning,
            stacklevel=2,
        )
        reference = True
    if not reference:
        name_sites(prepared)
        problem = lowering_problem(prepared)
        if problem:
            raise ValueError(problem)
    calibration_shape = getattr(prepared, "_calibration_input_shape", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        # A recipe may keep every scan in float (ptq4vm): then there is no observed scan to check for.
        checked = None if any(is_float_scan(m) for m in prepared.modules()) else prepared
        if not reference:
            gm = convert_fx(prepared, convert_custom_config=convert_custom_config(checked))
            float_depthwise_convs(gm)  # fbgemm's int8 depthwise kernels are many times slower than float
        else:
            cfg = convert_custom_config(checked, float_output=True)
            gm = _convert_to_reference_decomposed_fx(prepared, convert_custom_config=cfg)
            gm = _guard_token_counts(_activation_qparams_as_buffers(_drop_scan_dequantize(gm)), calibration_shape)
    for name, mod in gm.named_modules():
        if isinstance(mod, QuantizedSelectiveScan):
            mod.layer_name, mod.calibration_input_shape = name, calibration_shape
    return gm


def _shape_text(shape: Optional[tuple[int, ...]]) -> str:
    return "x".join(map(str, shape)) if shape else "unknown"


def check_token_count(x: Tensor, tokens: int, axis: int, layer: str, calibration_shape: Optional[tuple]) -> Tensor:
    """Return ``x`` if it has ``tokens`` entries along ``axis``; otherwise a ValueError naming ``layer``.

    Placed before each static per-token quantize op of a converted model, where a different input
    size would otherwise fail deep inside the op with a bare size mismatch.
    """
    got = x.shape[axis] if x.dim() > axis else None
    if got != tokens:
        size = f" (calibration input {_shape_text(calibration_shape)} per image)" if calibration_shape else ""
        raise ValueError(
            f"{layer} quantizes its input with static per-token scales calibrated for {tokens} tokens{size}, "
            f"but got {got} tokens (tensor of shape {tuple(x.shape)}): the input image size differs from the "
            "calibration one. Run the quantized model at its calibration input size, or quantize again with "
            "calibration images of the new size"
        )
    return x


torch.fx.wrap("check_token_count")


def _guard_token_counts(gm: torch.fx.GraphModule, calibration_shape: Optional[tuple]) -> torch.fx.GraphModule:
    """Put :func:`check_token_count` in front of every per-channel activation quantize op of a decomposed graph."""
    qd = torch.ops.quantized_decomposed
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not qd.quantize_per_channel.default:
            continue
        x, scales, axis = node.args[0], node.args[1], node.args[3]
        if not isinstance(x, Node) or x.op == "get_attr":  # weights are quantized from their own buffers
            continue
        if not (isinstance(scales, Node) and scales.op == "get_attr" and isinstance(axis, int)):
            continue
        tokens = _get_attr(gm, scales.target).numel()
        users = [u for d in node.users for u in d.users if u.op == "call_module"]
        layer = users[0].target if users else f"per-token quantize op {node.name!r}"
        with gm.graph.inserting_before(node):
            guard = gm.graph.call_function(check_token_count, (x, tokens, axis, layer, calibration_shape))
        node.args = (guard, *node.args[1:])
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _get_attr(gm: nn.Module, target: str) -> Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _activation_qparams_as_buffers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Move the per-tensor activation qparams of a decomposed graph from code literals into buffers.

    The decomposed conversion writes each activation's scale and zero point into the generated
    code, so a ``state_dict`` would not carry them and a saved model could not be restored. Here
    every such pair becomes two buffers read by the ``.tensor`` overload of the same op.
    """
    qd = torch.ops.quantized_decomposed
    overloads = {
        qd.quantize_per_tensor.default: qd.quantize_per_tensor.tensor,
        qd.dequantize_per_tensor.default: qd.dequantize_per_tensor.tensor,
    }
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in overloads:
            continue
        scale, zero_point = node.args[1], node.args[2]
        if not isinstance(scale, (int, float)) or not isinstance(zero_point, int):
            continue
        s = torch.tensor(float(scale), dtype=torch.float32)
        if s.item() != float(scale):  # keep the exact value the code had
            s = torch.tensor(float(scale), dtype=torch.float64)
        names = (f"_activation_scale_{count}", f"_activation_zero_point_{count}")
        gm.register_buffer(names[0], s)
        gm.register_buffer(names[1], torch.tensor(zero_point, dtype=torch.int64))
        count += 1
        with gm.graph.inserting_before(node):
            attrs = [gm.graph.get_attr(n) for n in names]
        node.args = (node.args[0], *attrs, *node.args[3:])
        node.target = overloads[node.target]
    gm.graph.lint()
    gm.recompile()
    return gm


def _drop_scan_dequantize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove the ``dequantize`` torch.ao writes after each converted scan: its output is already float.

    The reference model is torch.ao's *decomposed* reference conversion: quantize/dequantize pairs
    on plain integer tensors that clamp to each observer's ``quant_min``/``quant_max``. (The public
    ``convert_to_reference_fx`` stores activations in quint8 tensors, which clamp to 0..255 whatever
    the observer's range, so a 4-bit activation outside its calibrated range kept up to 256 levels.)
    There each scan fake-quantizes its own output, so the ``dequantize`` after it goes.
    """
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), QuantizedSelectiveScan):
            continue
        for user in list(node.users):
            if user.op == "call_method" and user.target == "dequantize":
                user.replace_all_uses_with(node)
                gm.graph.erase_node(user)
    gm.graph.lint()
    gm.recompile()
    return gm


def prepare_calibrated(
    model: nn.Module,
    calib_data: Iterable[Any],
    recipe: Union[str, Recipe] = "qmamba",
    w_bits: int = 4,
    a_bits: int = 4,
    example_inputs: Optional[tuple[Any, ...]] = None,
    progress: bool = True,
    qconfig_mapping: Optional[QConfigMapping] = None,
    shard: Optional[tuple[int, int]] = None,
    reconstruct: Union[bool, Mapping[str, Any], None] = None,
    **options: Any,
) -> torch.fx.GraphModule:
    """:func:`quantize` up to the conversion: the recipe's model rewrite, ``prepare_fx``, calibration and,
    if asked, reconstruction.

    ``calib_data``: an iterable of input batches or ``(input, target)`` pairs (a DataLoader works).
    ``example_inputs`` default to the first calibration batch. ``options`` go to
    :meth:`Recipe.qconfig_mapping <qmamba_ao.recipes.Recipe.qconfig_mapping>`. The same data gives
    identical qparams. The recipe's rewrite is applied to a copy of ``model`` with ``calib_data``,
    also when ``qconfig_mapping`` is given; an unknown recipe name next to an explicit mapping
    means no rewrite. ``shard``: this process's place in a sharded calibration (see :func:`calibrate`).
    ``reconstruct``: ``True`` or a dict of :func:`qmamba_ao.reconstruct` options (``iters``, ``lr``,
    ``drop``, ``seed``) learns the qparams on ``calib_data`` after calibration.
    """
    rec = reconstruction_for(recipe, reconstruct)
    if rec is not None and distributed.world_size() > 1:
        raise ValueError(
            "reconstruction runs in one process (each unit learns from every calibration batch): "
            "launch without torchrun, or quantize without reconstruction"
        )
    prepared, calib_data = _prepare_for(
        model, calib_data, recipe, w_bits, a_bits, example_inputs, qconfig_mapping, options
    )
    calibrate(prepared, calib_data, progress=progress, shard=shard)
    if rec is not None:
        learn_qparams(prepared, calib_data, progress=progress, **rec)
    return prepared


_RECONSTRUCT_KEYS = ("iters", "lr", "drop", "seed", "smoothing")


def reconstruction_for(
    recipe: Union[str, Recipe, None], reconstruct: Union[bool, Mapping[str, Any], None]
) -> Optional[dict[str, Any]]:
    """The reconstruction a quantization runs: ``reconstruct`` when given (see :func:`reconstruct_options`),
    else the recipe's own (``Recipe.reconstruct``: PTQ4VM's JLSS), else none."""
    if reconstruct is None:
        known = isinstance(recipe, Recipe) or (isinstance(recipe, str) and recipe in list_recipes())
        return {} if known and get_recipe(recipe).reconstruct else None  # type: ignore[arg-type]
    return reconstruct_options(reconstruct)


def reconstruct_options(reconstruct: Union[bool, Mapping[str, Any], None]) -> Optional[dict[str, Any]]:
    """``None`` (no reconstruction) or the keyword arguments of :func:`qmamba_ao.reconstruct` for a
    ``reconstruct=`` argument: ``False`` / ``None``, ``True`` (defaults) or a dict of options."""
    if reconstruct is None or reconstruct is False:
        return None
    if reconstruct is True:
        return {}
    if not isinstance(reconstruct, Mapping):
        raise ValueError(f"reconstruct={reconstruct!r}: use True, False or a dict with keys {list(_RECONSTRUCT_KEYS)}")
    unknown = [k for k in reconstruct if k not in _RECONSTRUCT_KEYS]
    if unknown:
        raise ValueError(f"unknown reconstruction option(s) {unknown}; the options are {list(_RECONSTRUCT_KEYS)}")
    return dict(reconstruct)


def _prepare_for(
    model: nn.Module,
    calib_data: Iterable[Any],
    recipe: Union[str, Recipe],
    w_bits: int,
    a_bits: int,
    example_inputs: Optional[tuple[Any, ...]],
    qconfig_mapping: Optional[QConfigMapping],
    options: dict[str, Any],
) -> tuple[torch.fx.GraphModule, Iterable[Any]]:
    """:func:`prepare_calibrated` without the calibration: the prepared model and the data to calibrate on."""
    # An explicit mapping makes the recipe's name matter only for its rewrite.
    explicit_only = qconfig_mapping is not None and not isinstance(recipe, Recipe) and recipe not in list_recipes()
    if not explicit_only:
        recipe = get_recipe(recipe)
    if qconfig_mapping is None:  # bad options fail before the model rewrite runs
        recipe.qconfig_mapping(w_bits, a_bits, **options)  # type: ignore[union-attr]
    rewrites = isinstance(recipe, Recipe) and recipe.rewrites_model
    if example_inputs is None or rewrites:
        items = list(calib_data)
        if not items:
            raise ValueError("calib_data is empty: give at least one batch of calibration images")
        for i, item in enumerate(items):  # before the rewrite's float pass and before tracing
            check_calibration_batch(i, batch_input(item))
        calib_data = items
    if example_inputs is None:
        example_inputs = (batch_input(items[0])[:1],)
    if rewrites:
        model = recipe.rewrite(model, calib_data)  # type: ignore[union-attr]
    prepared = prepare(model, example_inputs, recipe, w_bits, a_bits, qconfig_mapping, **options)
    return prepared, calib_data


def quantize(
    model: nn.Module,
    calib_data: Iterable[Any],
    recipe: Union[str, Recipe] = "qmamba",
    w_bits: int = 4,
    a_bits: int = 4,
    example_inputs: Optional[tuple[Any, ...]] = None,
    reference: bool = True,
    route: str = "fx",
    **kwargs: Any,
) -> torch.fx.GraphModule:
    """Quantize ``model`` with a recipe: its model rewrite, ``prepare_fx``, calibration, conversion.

    Everything up to the conversion is :func:`prepare_calibrated`; ``kwargs`` (``progress``,
    ``qconfig_mapping``, ``shard``, ``reconstruct`` and the mapping options such as ``h_feedback``) go
    there. ``reconstruct=True`` (or a dict of options) learns the qparams block by block between
    calibration and conversion (:func:`qmamba_ao.reconstruct`).

    ``reference=True`` (default) converts with torch.ao's decomposed reference conversion:
    quantize/dequantize around float ops, exact on every CPU, what accuracy tables should use.
    ``reference=False`` lowers to torch.ao's x86 int8 kernels (``convert_fx``). Those kernels take
    7- or 8-bit activations: they keep every activation in 8 bits without clamping it to a narrower
    observer range, so ``a_bits`` (or ``first_last_bits``) below 7 is refused with a ValueError before
    calibration (see :func:`lowering_problem`); such bit widths are only simulated, with
    ``reference=True``. On CPUs without
    VNNI those kernels saturate with full-range 8-bit activations (torch.ao's own x86 default uses
    7-bit activations for that reason, see :meth:`Recipe.x86_qconfig_mapping
    <qmamba_ao.recipes.Recipe.x86_qconfig_mapping>`), so compare against the reference model before
    trusting a lowered W8A8 model.

    ``qmamba`` / ``ptq4vm`` / ``ptq4vm-naive-ssm`` quantize Linear inputs per token, which torch.ao's
    x86 backend has no kernels for: they are always converted to the reference (simulated) model,
    see :func:`convert`.

    ``route="pt2e"`` takes the PT2E route instead (:func:`qmamba_ao.pt2e.quantize_pt2e`: the same
    rewrite, ``torch.export``, torchao's ``prepare_pt2e`` with :class:`qmamba_ao.pt2e.QMambaQuantizer`,
    the same calibration, ``convert_pt2e``; the same qparams). It needs torchao, takes the mapping
    options and ``progress`` but not ``reference=False``, ``qconfig_mapping``, ``shard`` or
    ``h_feedback=True``; compile its result with ``torch.compile`` to deploy.
    """
    if route not in ("fx", "pt2e"):
        raise ValueError(f"route={route!r}: use 'fx' (torch.ao prepare_fx / convert_fx) or 'pt2e' (torchao PT2E)")
    if route == "pt2e":
        if reconstruction_for(recipe, kwargs.pop("reconstruct", None)) is not None:
            raise ValueError(
                "reconstruct: the PT2E route has no reconstruction yet (recipes ptq4vm and ptq4vm-naive-ssm always "
                "reconstruct: their JLSS step); use route='fx', or reconstruct=False"
            )
        extra = [k for k in ("qconfig_mapping", "shard") if k in kwargs] + ([] if reference else ["reference=False"])
        if extra:
            raise ValueError(
                f"{', '.join(extra)}: FX-route options; route='pt2e' takes the recipe, bits, mapping options and "
                "progress (deploy its result with torch.compile)"
            )
        from .pt2e import quantize_pt2e

        return quantize_pt2e(model, calib_data, recipe, w_bits, a_bits, example_inputs, **kwargs)
    progress = kwargs.pop("progress", True)
    qconfig_mapping = kwargs.pop("qconfig_mapping", None)
    shard = kwargs.pop("shard", None)
    rec = reconstruction_for(recipe, kwargs.pop("reconstruct", None))
    if rec is not None and distributed.world_size() > 1:
        raise ValueError(
            "reconstruction runs in one process (each unit learns from every calibration batch): "
            "launch without torchrun, or quantize without reconstruction"
        )
    prepared, calib_data = _prepare_for(
        model, calib_data, recipe, w_bits, a_bits, example_inputs, qconfig_mapping, kwargs
    )
    if not reference and not per_channel_activations(prepared):
        name_sites(prepared)
        problem = lowering_problem(prepared)
        if problem:  # before spending the calibration
            raise ValueError(problem)
    calibrate(prepared, calib_data, progress=progress, shard=shard)
    if rec is not None:
        learn_qparams(prepared, calib_data, progress=progress, **rec)
    return convert(prepared, reference=reference)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    batch_size: int = 500,
    progress: bool = True,
    desc: str = "eval",
    shard: Optional[bool] = None,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (in %) and the predictions of ``model`` on in-memory images.

    Ties break towards the lower class index (as ``argmax`` in torch, NumPy and ONNX): with 4-bit
    outputs two classes often share the top logit, and an arbitrary tie order would make two
    runtimes that compute identical logits disagree on the prediction.

    Under an initialised ``torch.distributed`` process group (every process passing the same
    ``images``) each process evaluates its own whole batches (:func:`qmamba_ao.distributed.shard_range`)
    and the counts and predictions are gathered: the result is the one process's result.
    ``shard=False`` evaluates every image in this process.
    """
    rows = range(len(images))
    if shard is None or shard:
        rows = distributed.shard_range(len(images), block=batch_size)
    preds, correct1, correct5 = [], 0, 0
    steps = range(rows.start, rows.stop, batch_size)
    for i in tqdm(steps, desc=desc, disable=not (progress and distributed.is_main()), unit="batch"):
        end = min(i + batch_size, rows.stop)
        logits = model(images[i:end])
        if logits.is_quantized:
            logits = logits.dequantize()
        y = labels[i:end]
        top = logits.sort(dim=-1, descending=True, stable=True).indices[:, :5]
        preds.append(top[:, 0])
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(-1).sum().item()
    local = torch.cat(preds) if preds else labels.new_zeros(0, dtype=torch.int64)
    if shard is None or shard:
        correct1, correct5 = distributed.all_reduce_sum([correct1, correct5])
        local = distributed.gather_predictions(local)
    n = len(images)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "preds": local}
