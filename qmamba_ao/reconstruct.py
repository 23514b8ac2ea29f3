"""Block-wise reconstruction: learn a calibrated model's quantization parameters, unit by unit.

Between calibration and conversion, :func:`reconstruct` fine-tunes the qparams of a prepared
(torch.ao ``prepare_fx``) model so that each unit's quantized output matches its float output on
the calibration images, in the spirit of BRECQ (Li et al., 2021) and QDrop (Wei et al., 2022), as
QMamba does after initialising its scales:

* **Units** follow the model's own structure: each residual block (a numbered module, e.g.
  ``layers.3`` or ``layers.1.blocks.0``, holding a selective scan and the layers around it) is one
  unit; what comes before the first block (patch embedding) and after the last (final norm, head)
  are units of their own, as is anything between blocks (e.g. a downsampling layer).
* **Inputs and targets**: a unit's input comes from the already-reconstructed quantized units before
  it; its target is the float model's output of that unit (on float inputs). The loss is the mean
  squared error of every tensor leaving the unit, relative to that tensor's mean square.
* **What is learned**: the smoothing factors of smoothed Linears (where a recipe smooths; PTQ4VM's
  JLSS) and every quantizer the unit applies - activation step sizes (per tensor and
  static per token), weight step sizes (per output channel), LtSQ's t-space step size and transform
  parameter, TGQ's per-group step sizes - as ``log`` offsets from their calibrated values, with
  straight-through rounding and LSQ's step-size gradient (:func:`~qmamba_ao.observers.learned.learnable_fake_quantize`).
  Zero points stay as calibrated.
* **Where the results go**: activation observers in the graph become
  :class:`~qmamba_ao.observers.learned.FixedQParamsObserver` (same qscheme and range), scan sites
  :class:`~qmamba_ao.observers.learned.FixedSite` holding their learned frozen quantizer, and each
  quantized layer's QConfig gets a weight observer constructor with the learned scales. So
  ``convert_fx``, the decomposed conversion, ONNX export and state_dict round trips are unchanged.

The same prepared model, data and seed give identical results (the batch order is drawn from a
seeded generator and the optimiser is deterministic on the CPU).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.ao.quantization import QConfig
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg
from tqdm import tqdm

from ._utils import batch_input, set_submodule
from .observers.affine import FrozenAffineQuant, is_per_channel
from .observers.learned import FixedQParamsObserver, FixedSite, learnable_fake_quantize
from .observers.ltsq import FrozenLtSQ, ltsq_inverse, ltsq_transform
from .observers.tgq import FrozenTGQ
from .ssm import SelectiveScan
from .ssm.quantized import ObservedSelectiveScan, freeze_site

__all__ = ["reconstruct", "ReconstructionReport", "DEFAULT_ITERS", "DEFAULT_LR", "DEFAULT_DROP"]

#: Optimisation steps per unit (one calibration batch each). Fixed, not tuned per model: see README.
DEFAULT_ITERS = 200
#: Fraction of activation elements left in float at each step (QDrop, Wei et al. 2022, whose default
#: 0.5 this is): the learned step sizes then also fit inputs that are partly unquantized. Applied to
#: the activations between layers; the scans' internal sites are always quantized.
DEFAULT_DROP = 0.5
#: Adam learning rate on the log step sizes (a relative change per step), cosine-decayed to 0.
DEFAULT_LR = 1.5e-2

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: Smallest base a learnable power transform sees (its values underflow to 0 in float32 anyway).
_TINY = 1e-30


# ----------------------------------------------------------------------------------------------
# Learnable forms of the frozen quantizers
# ----------------------------------------------------------------------------------------------


class _Learnable(nn.Module):
    """Base of the learnable quantizers: ``enabled`` switches between fake-quantized and float;
    ``drop`` > 0 keeps that fraction of the elements in float (QDrop), drawn from torch's global RNG."""

    enabled: bool = True
    drop: float = 0.0

    frozen: Any  # the fixed quantizer for the learned values (each subclass's own frozen type)

    def _mix(self, x: Tensor, xq: Tensor) -> Tensor:
        if self.drop <= 0.0:
            return xq
        return torch.where(torch.rand_like(x) < self.drop, x, xq)


class _LearnAffine(_Learnable):
    """An affine grid (per tensor or per slice along ``axis``) with a learnable step size."""

    accepts_blocks = True  # the scan may hand over a block of stacked steps (``t`` a range)

    def __init__(self, q: FrozenAffineQuant) -> None:
        super().__init__()
        self.register_buffer("scale0", q.scale.detach().clone().float())
        self.register_buffer("zero_point", q.zero_point.detach().clone())
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        self.quant_min, self.quant_max, self.axis = q.quant_min, q.quant_max, q.axis

    def scale(self) -> Tensor:
        return self.scale0 * torch.exp(self.log_scale)

    def forward(self, x: Tensor, t: Any = None) -> Tensor:
        if not self.enabled:
            return x
        axis = self.axis
        if isinstance(t, range) and axis is not None and axis >= 0:
            axis += 1  # a block of steps stacked on a new axis 0
        return self._mix(
            x, learnable_fake_quantize(x, self.scale(), self.zero_point, self.quant_min, self.quant_max, axis)
        )

    def frozen(self) -> FrozenAffineQuant:
        return FrozenAffineQuant(self.scale().detach(), self.zero_point, self.quant_min, self.quant_max, self.axis)


class _LearnLtSQ(_Learnable):
    """LtSQ ``T^-1(FQ(T(x)))`` with a learnable t-space step size and transform parameter.

    The gradient w.r.t. ``x`` is the identity (the whole quantizer is straight-through): the
    transforms' derivatives are unbounded next to ``x = 1`` (dA without decay) and would blow up
    the gradients of the layers before the scan.
    """

    def __init__(self, q: FrozenLtSQ) -> None:
        super().__init__()
        self.kind = q.kind
        self.register_buffer("scale0", q.scale.detach().clone().float())
        self.register_buffer("param0", q.param.detach().clone().float())
        self.register_buffer("zero_point", q.zero_point.detach().clone())
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        self.log_param = nn.Parameter(torch.zeros_like(self.param0))
        self.quant_min, self.quant_max = q.quant_min, q.quant_max

    def forward(self, x: Tensor, t: Any = None) -> Tensor:
        if not self.enabled:
            return x
        p = (self.param0 * torch.exp(self.log_param)).reshape(())
        s = self.scale0 * torch.exp(self.log_scale)
        tq = learnable_fake_quantize(self._transform(x.detach(), p), s, self.zero_point, self.quant_min, self.quant_max)
        return self._mix(x, x + (self._inverse(tq, p) - x.detach()))

    # The transforms of ltsq.py, with the power kinds' bases kept off 0: d/dp b^p = b^p log(b) is NaN at
    # b = 0 (dA = 1, dBu = 0 and the zero level itself), while the values do not change (0^p = tiny^p = 0).
    def _transform(self, x: Tensor, p: Tensor) -> Tensor:
        if self.kind == "unit_power":
            return torch.pow((1.0 - x).clamp(min=_TINY), p)
        if self.kind == "signed_power":
            return torch.sign(x) * torch.pow(x.abs().clamp(min=_TINY), p)
        return ltsq_transform(x, self.kind, p)

    def _inverse(self, t: Tensor, p: Tensor) -> Tensor:
        if self.kind == "unit_power":
            return 1.0 - torch.pow(t.clamp(min=_TINY), 1.0 / p)
        if self.kind == "signed_power":
            return torch.sign(t) * torch.pow(t.abs().clamp(min=_TINY), 1.0 / p)
        return ltsq_inverse(t, self.kind, p)

    def frozen(self) -> FrozenLtSQ:
        p = (self.param0 * torch.exp(self.log_param)).detach()
        s = (self.scale0 * torch.exp(self.log_scale)).detach()
        return FrozenLtSQ(self.kind, p, s, self.zero_point, self.quant_min, self.quant_max)


class _LearnTGQ(_Learnable):
    """TGQ's fixed temporal groups, each with a learnable step size."""

    per_step = True
    accepts_blocks = True

    def __init__(self, q: FrozenTGQ) -> None:
        super().__init__()
        self.register_buffer("scale0", q.scale.detach().clone().float())
        self.register_buffer("zero_point", q.zero_point.detach().clone())
        self.register_buffer("group_index", q.group_index.detach().clone())
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        self.quant_min, self.quant_max, self.time_axis = q.quant_min, q.quant_max, q.time_axis

    def forward(self, x: Tensor, t: Any = None) -> Tensor:
        if not self.enabled:
            return x
        scale = self.scale0 * torch.exp(self.log_scale)
        if isinstance(t, range):  # steps stacked on axis 0
            index, axis = self.group_index[t.start : t.stop], 0
        elif t is None:  # a whole sequence stacked along the time axis
            index, axis = self.group_index, self.time_axis
        else:
            g = self.group_index[int(t)]
            return self._mix(
                x, learnable_fake_quantize(x, scale[g], self.zero_point[g], self.quant_min, self.quant_max)
            )
        xq = learnable_fake_quantize(x, scale[index], self.zero_point[index], self.quant_min, self.quant_max, axis)
        return self._mix(x, xq)

    def frozen(self) -> FrozenTGQ:
        scale = (self.scale0 * torch.exp(self.log_scale)).detach()
        return FrozenTGQ(scale, self.zero_point, self.group_index, self.quant_min, self.quant_max, self.time_axis)


class _Fixed(_Learnable):
    """A frozen quantizer without a learnable form here (e.g. a log2 grid): applied as it is."""

    per_step = True
    accepts_blocks = True

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.q = q

    def forward(self, x: Tensor, t: Any = None) -> Tensor:
        if not self.enabled:
            return x
        if t is None:
            return self.q(x)
        if isinstance(t, range) and not getattr(self.q, "accepts_blocks", False):
            return torch.stack([self.forward(x[i], s) for i, s in enumerate(t)])
        return self.q(x, t) if getattr(self.q, "per_step", False) or isinstance(t, range) else self.q(x)

    def frozen(self) -> nn.Module:
        return self.q


def _learnable(q: nn.Module) -> _Learnable:
    if type(q) is FrozenAffineQuant:
        return _LearnAffine(q)
    if type(q) is FrozenLtSQ:
        return _LearnLtSQ(q)
    if type(q) is FrozenTGQ:
        return _LearnTGQ(q)
    return _Fixed(q)


class _LearnSmoothing(_Learnable):
    """A smoothed Linear's float input scaling ``x * s`` (:class:`~qmamba_ao.rewrites.ChannelScale`)
    with a learnable per-channel factor ``m``: the input becomes ``x * s / m`` and the Linear's
    weight ``W * m`` (see :class:`_WeightQuantized`), so the float product is unchanged while the
    split of the range between activation and weight is learned (PTQ4VM's JLSS)."""

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale0", scale.detach().clone().float())
        self.log_m = nn.Parameter(torch.zeros_like(self.scale0))

    def value(self) -> Tensor:
        """The input scaling ``s / m`` (read where the traced graph reads the ChannelScale buffer)."""
        return self.scale0 * torch.exp(-self.log_m)


class _WeightQuantized(nn.Module):
    """A Linear / Conv layer whose weight is fake-quantized by a learnable per-channel grid (after a
    learnable smoothing factor on its input channels, when it has one)."""

    def __init__(self, layer: nn.Module, quantizer: _LearnAffine, smoothing: Optional[_LearnSmoothing] = None) -> None:
        super().__init__()
        self.layer, self.wq = layer, quantizer
        self.smoothing = [smoothing]  # a reference, not a submodule (it has its own place in the graph)

    def weight(self) -> Tensor:
        m = self.smoothing[0]
        return self.layer.weight if m is None else self.layer.weight * torch.exp(m.log_m)

    def forward(self, x: Tensor) -> Tensor:
        w = self.wq(self.weight())
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


def _weight_observer(layer: nn.Module) -> Optional[nn.Module]:
    """The calibrated weight observer ``convert_fx`` would build for ``layer`` (None if unquantized)."""
    qconfig = getattr(layer, "qconfig", None)
    if qconfig is None or qconfig.weight is None or not isinstance(layer, _WEIGHTED):
        return None
    obs = qconfig.weight()
    if getattr(obs, "dtype", None) not in (torch.qint8, torch.quint8):
        return None
    obs(layer.weight.detach())
    return obs


def _frozen_affine(obs: nn.Module) -> FrozenAffineQuant:
    scale, zero_point = obs.calculate_qparams()
    axis = int(obs.ch_axis) if is_per_channel(getattr(obs, "qscheme", None)) else None
    return FrozenAffineQuant(scale, zero_point, obs.quant_min, obs.quant_max, axis)


# ----------------------------------------------------------------------------------------------
# Units of the graph
# ----------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    name: str
    nodes: list[Node]
    inputs: list[Node] = field(default_factory=list)
    outputs: list[Node] = field(default_factory=list)


def _module_path(node: Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return node.target if node.op == "call_module" and isinstance(node.target, str) else None


def _is_observer(mod: Any) -> bool:
    return isinstance(mod, (ObserverBase, FakeQuantizeBase))


def _block_roots(gm: GraphModule) -> list[str]:
    """Numbered module paths that hold a selective scan and a weighted layer; the deepest such."""
    modules = dict(gm.named_modules())
    scans, weighted, paths = set(), set(), set()
    for node in gm.graph.nodes:
        path = _module_path(node)
        if path is None:
            continue
        parts = path.split(".")
        paths.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, SelectiveScan):
            scans.add(path)
        elif isinstance(mod, _WEIGHTED):
            weighted.add(path)
    numbered = [p for p in paths if re.fullmatch(r"\d+", p.rsplit(".", 1)[-1])]

    def holds(root: str, group: set) -> bool:
        return any(p == root or p.startswith(root + ".") for p in group)

    roots = [p for p in numbered if holds(p, scans) and holds(p, weighted)]
    return [r for r in roots if not any(o != r and o.startswith(r + ".") for o in roots)]


def _units(gm: GraphModule) -> list[_Unit]:
    """Split the graph, in order, into contiguous units (see the module docstring)."""
    roots = _block_roots(gm)
    nodes = [n for n in gm.graph.nodes if n.op not in ("output", "placeholder")]

    def root_of(node: Node) -> Optional[str]:
        path = _module_path(node)
        if path is None:
            return None
        for r in roots:
            if path == r or path.startswith(r + "."):
                return r
        return ""  # outside every block

    # Nodes without a module (observers, attributes) go with the next node that has one.
    owner: list[Optional[str]] = [root_of(n) for n in nodes]
    nxt: Optional[str] = None
    for i in range(len(nodes) - 1, -1, -1):
        if (
            owner[i] is None
            or nodes[i].op == "call_module"
            and owner[i] == ""
            and _is_observer(gm.get_submodule(nodes[i].target))
        ):
            owner[i] = nxt if nxt is not None else ""
        nxt = owner[i]
    units: list[_Unit] = []
    for node, key in zip(nodes, owner):
        if units and units[-1].name == key:
            units[-1].nodes.append(node)
        else:
            units.append(_Unit(key or "", [node]))
    for i, u in enumerate(units):
        if not u.name:
            tops = []
            for n in u.nodes:
                p = _module_path(n)
                if n.op == "call_module" and _is_observer(gm.get_submodule(n.target)):
                    continue
                if p and p.split(".")[0] not in tops:
                    tops.append(p.split(".")[0])
            u.name = "+".join(tops[:3]) or f"part {i}"
    index = {n: i for i, u in enumerate(units) for n in u.nodes}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for i, u in enumerate(units):
        members = set(u.nodes)
        seen: set = set()
        for n in u.nodes:
            for a in n.all_input_nodes:
                if a not in members and a not in seen:
                    seen.add(a)
                    u.inputs.append(a)
        u.outputs = [n for n in u.nodes if any(index.get(usr, len(units)) > i or usr is output for usr in n.users)]
    return units


def _run(gm: GraphModule, unit: _Unit, env: dict[Node, Any], attrs: Optional[dict[str, Any]] = None) -> dict[Node, Any]:
    """Evaluate a unit's nodes from ``env`` (values of its inputs); returns its outputs. ``attrs``: learnables
    whose ``value()`` replaces the attribute a ``get_attr`` node reads."""
    local = dict(env)
    attrs = attrs or {}
    for n in unit.nodes:
        args = map_arg(n.args, lambda a: local[a])
        kwargs = map_arg(n.kwargs, lambda a: local[a])
        if n.op == "get_attr" and n.target in attrs:
            local[n] = attrs[n.target].value()
        elif n.op == "get_attr":
            obj: Any = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            local[n] = obj
        elif n.op == "call_function":
            local[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            self_obj, *rest = args
            local[n] = getattr(self_obj, n.target)(*rest, **kwargs)
        elif n.op == "call_module":
            local[n] = gm.get_submodule(n.target)(*args, **kwargs)
        else:
            raise RuntimeError(f"unexpected node {n.op} {n.target}")
    return {n: local[n] for n in unit.outputs}


# ----------------------------------------------------------------------------------------------
# The procedure
# ----------------------------------------------------------------------------------------------


@dataclass
class ReconstructionReport:
    """What :func:`reconstruct` did, per unit: ``(name, parameters learned, loss before, loss after)``."""

    units: list[tuple[str, int, float, float]]
    seconds: float

    def table(self) -> str:
        rows = [f"{'unit':<24} {'params':>7} {'loss before':>12} {'loss after':>11}"]
        rows += [f"{n:<24} {p:>7} {a:>12.5f} {b:>11.5f}" for n, p, a, b in self.units]
        return "\n".join(rows)


def _check_options(iters: Any, lr: Any, drop: Any, batches: int) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters={iters!r}: use an integer >= 0 (optimisation steps per unit; 0 keeps the calibration)")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r}: use a positive number (Adam's step on the log step sizes), e.g. {DEFAULT_LR}")
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        raise ValueError(f"drop={drop!r}: use a number in [0, 1) (fraction of activations kept in float per step)")
    if batches == 0:
        raise ValueError("calib_data is empty: give at least one batch of calibration images")


def _swap_in(
    gm: GraphModule, smoothing: bool = False
) -> tuple[dict[str, _Learnable], dict[str, nn.Module], dict[str, tuple]]:
    """Put learnable quantizers in place of the calibrated observers and weighted layers.

    Returns the learnables by the path they occupy, the originals those paths held, and for
    weighted layers ``(learnable, weight observer)``.
    """
    learn: dict[str, _Learnable] = {}
    originals: dict[str, nn.Module] = {}
    weights: dict[str, tuple] = {}
    shared: dict[int, _Learnable] = {}  # torch.ao may register one observer under several names
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in originals:
            continue
        path = node.target
        mod = gm.get_submodule(path)
        if _is_observer(mod):
            if getattr(mod, "dtype", None) not in (torch.quint8, torch.qint8, torch.uint8, torch.int8):
                continue
            if id(mod) not in shared:
                shared[id(mod)] = _learnable(mod.to_frozen() if hasattr(mod, "to_frozen") else _frozen_affine(mod))
            learn[path], originals[path] = shared[id(mod)], mod
        elif isinstance(mod, ObservedSelectiveScan):
            for site, obs in mod.site_modules.items():
                sp = f"{path}.site_modules.{site}"
                learn[sp], originals[sp] = _learnable(freeze_site(obs)), obs
        elif isinstance(mod, _WEIGHTED):
            obs = _weight_observer(mod)
            if obs is not None:
                wq = _LearnAffine(_frozen_affine(obs))
                learn[path + ".wq"], originals[path], weights[path] = wq, mod, (wq, obs)
    if smoothing:  # FX traces a ScaledLinear's ChannelScale into a get_attr of "<linear>.scale.scale" and a mul
        for node in gm.graph.nodes:
            path = node.target if node.op == "get_attr" else None
            if path is None or not path.endswith(".scale.scale") or path in learn:
                continue
            if path[: -len("scale.scale")] + "linear" in weights:
                learn[path] = _LearnSmoothing(gm.get_submodule(path[: -len(".scale")]).scale)
    for path, q in learn.items():
        if isinstance(q, _LearnSmoothing):
            continue
        if path.endswith(".wq") and path[:-3] in weights:
            smooth = learn.get(path[: -len("linear.wq")] + "scale.scale")
            set_submodule(gm, path[:-3], _WeightQuantized(originals[path[:-3]], q, smooth))
        else:
            set_submodule(gm, path, q)
    return learn, originals, weights


def _write_back(gm: GraphModule, learn: dict[str, _Learnable], originals: dict[str, nn.Module], weights: dict) -> None:
    """Replace the learnables by observers that hold the learned qparams (see the module docstring)."""
    for path, q in learn.items():
        if isinstance(q, _LearnSmoothing):  # fold the learned factor: x * s / m and W * m
            linear = originals[path[: -len("scale.scale")] + "linear"]
            with torch.no_grad():
                linear.weight.mul_(torch.exp(q.log_m))
                gm.get_submodule(path[: -len(".scale")]).scale.copy_(q.value())
    for path, q in learn.items():
        if isinstance(q, _LearnSmoothing):
            continue
        if path.endswith(".wq") and path[:-3] in weights:
            layer = originals[path[:-3]]
            obs = weights[path[:-3]][1]
            fq = q.frozen()
            ctor = FixedQParamsObserver.with_args(
                scale=fq.scale.clone(),
                zero_point=fq.zero_point.clone(),
                dtype=obs.dtype,
                qscheme=obs.qscheme,
                quant_min=obs.quant_min,
                quant_max=obs.quant_max,
                ch_axis=int(getattr(obs, "ch_axis", 0)),
            )
            layer.qconfig = QConfig(activation=layer.qconfig.activation, weight=ctor)
            set_submodule(gm, path[:-3], layer)
        elif ".site_modules." in path:
            set_submodule(gm, path, FixedSite(q.frozen()))
        else:
            orig = originals[path]
            fq = q.frozen()
            if isinstance(fq, FrozenAffineQuant):
                fixed = FixedQParamsObserver(
                    fq.scale,
                    fq.zero_point,
                    dtype=orig.dtype,
                    qscheme=orig.qscheme,
                    quant_min=fq.quant_min,
                    quant_max=fq.quant_max,
                    ch_axis=int(getattr(orig, "ch_axis", 0) or 0),
                )
                if hasattr(orig, "site_name"):
                    fixed.site_name = orig.site_name
                set_submodule(gm, path, fixed)
            else:
                set_submodule(gm, path, orig)


def _restore(gm: GraphModule, originals: dict[str, nn.Module]) -> None:
    for path, mod in originals.items():
        set_submodule(gm, path, mod)


def _relative_mse(out: dict[Node, Any], target: dict[Node, Any]) -> Tensor:
    losses = []
    for n, t in target.items():
        o = out[n]
        if isinstance(t, Tensor) and t.is_floating_point():
            losses.append((o - t).square().mean() / t.square().mean().clamp(min=1e-12))
    return torch.stack(losses).sum() if losses else torch.zeros(())


def reconstruct(
    prepared: GraphModule,
    calib_data: Iterable[Any],
    iters: Optional[int] = None,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    drop: float = DEFAULT_DROP,
    smoothing: bool = True,
    progress: bool = True,
) -> ReconstructionReport:
    """Learn the qparams of a calibrated ``prepared`` model unit by unit (see the module docstring).

    ``calib_data``: the calibration batches (inputs or ``(input, target)`` pairs), usually the ones
    calibrated on. ``iters``: optimisation steps per unit (default :data:`DEFAULT_ITERS`), each on
    one calibration batch drawn with ``seed``; ``lr``: Adam's learning rate on the log step sizes
    (cosine-decayed); ``drop``: QDrop's fraction of activations kept in float per step;
    ``smoothing``: also learn the smoothing factors of smoothed Linears, where the recipe smooths
    (PTQ4VM's JLSS; the learned factors are folded into the model's scaling buffers and weights).
    Modifies ``prepared`` in place (its observers end up holding the learned qparams) and returns a
    report. A progress bar runs per unit. Call it after :func:`qmamba_ao.calibrate` and before
    :func:`qmamba_ao.convert`.
    """
    if not isinstance(prepared, GraphModule):
        raise TypeError(
            "reconstruct takes a prepared model (a torch.fx GraphModule from prepare_fx); "
            f"got {type(prepared).__name__}"
        )
    batches = [batch_input(b) for b in calib_data]
    iters = DEFAULT_ITERS if iters is None else iters
    _check_options(iters, lr, drop, len(batches))
    start = time.perf_counter()
    was_training = prepared.training
    prepared.eval()
    frozen_params = [(p, p.requires_grad) for p in prepared.parameters()]
    for p, _ in frozen_params:
        p.requires_grad_(False)
    units = _units(prepared)
    learn, originals, weights = _swap_in(prepared, smoothing=bool(smoothing))
    attrs = {path: q for path, q in learn.items() if isinstance(q, _LearnSmoothing)}
    report: list[tuple[str, int, float, float]] = []
    try:
        placeholders = [n for n in prepared.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(f"reconstruct supports models with one input; this one has {len(placeholders)}")
        env_q = [{placeholders[0]: x} for x in batches]
        env_f = [{placeholders[0]: x} for x in batches]
        owner = {n: i for i, u in enumerate(units) for n in u.nodes}
        last_use: dict[Node, int] = {}
        for i, u in enumerate(units):
            for a in u.inputs:
                last_use[a] = i
        gen = torch.Generator().manual_seed(int(seed))
        for k, unit in enumerate(units):
            members = {n.target for n in unit.nodes if n.op in ("call_module", "get_attr")}
            params: list[nn.Parameter] = []
            for path, q in learn.items():
                host = path[:-3] if path.endswith(".wq") else path.split(".site_modules.")[0]
                if host in members:
                    params += [p for p in q.parameters() if all(p is not o for o in params)]
            for p in params:
                p.requires_grad_(True)
            inputs = [{a: env[a] for a in unit.inputs} for env in env_q]
            _set_enabled(learn, False)
            with torch.no_grad():
                targets = [_run(prepared, unit, {a: env[a] for a in unit.inputs}, attrs) for env in env_f]
            _set_enabled(learn, True)
            n_params = sum(p.numel() for p in params)
            before = after = float("nan")
            if params and iters > 0:
                # QDrop on the activations between layers (torch.ao's observers), not inside the scans,
                # whose per-step tensors are the largest (every recipe is treated alike)
                acts = [q for path, q in learn.items() if path.startswith("activation_post_process")]
                order = torch.randint(len(inputs), (iters,), generator=gen).tolist()
                before, after = _optimise(
                    prepared,
                    unit,
                    params,
                    acts,
                    inputs,
                    targets,
                    attrs,
                    order,
                    lr,
                    drop,
                    int(seed) * 1000003 + k,
                    progress,
                )
            report.append((unit.name, n_params, before, after))
            with torch.no_grad():
                for j in range(len(batches)):
                    env_q[j].update(_run(prepared, unit, inputs[j], attrs))
                    env_f[j].update(targets[j])
            for env in (*env_q, *env_f):
                for n in [n for n in env if last_use.get(n, -1) <= k and owner.get(n, -1) <= k]:
                    del env[n]
    except BaseException:
        _restore(prepared, originals)
        raise
    finally:
        for p, flag in frozen_params:
            p.requires_grad_(flag)
        prepared.train(was_training)
    _write_back(prepared, learn, originals, weights)
    return ReconstructionReport(report, time.perf_counter() - start)


def _mean_loss(gm: GraphModule, unit: _Unit, inputs: list, targets: list, attrs: dict) -> float:
    with torch.no_grad():
        return float(sum(_relative_mse(_run(gm, unit, i, attrs), t) for i, t in zip(inputs, targets))) / len(inputs)


def _optimise(
    gm: GraphModule,
    unit: _Unit,
    params: list[nn.Parameter],
    acts: list[_Learnable],
    inputs: list[dict[Node, Any]],
    targets: list[dict[Node, Any]],
    attrs: dict[str, _LearnSmoothing],
    order: list[int],
    lr: float,
    drop: float,
    seed: int,
    progress: bool,
) -> tuple[float, float]:
    """Adam (cosine-decayed) on one unit's parameters, one calibration batch per step (``order``);
    returns the unit's mean loss before and after."""
    before = _mean_loss(gm, unit, inputs, targets, attrs)
    opt = torch.optim.Adam(params, lr=lr)
    steps = len(order)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for q in acts:
        q.drop = float(drop)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for b in tqdm(order, desc=f"reconstruct {unit.name}", disable=not progress, unit="step", leave=False):
                opt.zero_grad(set_to_none=True)
                loss = _relative_mse(_run(gm, unit, inputs[b], attrs), targets[b])
                if bool(torch.isfinite(loss)):  # a non-finite loss would spoil every step size
                    loss.backward()
                    if all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
                        opt.step()
                sched.step()
    finally:
        for q in acts:
            q.drop = 0.0
        for p in params:
            p.requires_grad_(False)
    return before, _mean_loss(gm, unit, inputs, targets, attrs)


def _set_enabled(learn: dict[str, _Learnable], enabled: bool) -> None:
    for q in learn.values():
        q.enabled = enabled
