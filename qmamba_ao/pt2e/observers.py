"""torchao-side adapters around qmamba-ao's (and torch.ao's) observers, for ``prepare_pt2e`` / ``convert_pt2e``.

PT2E only treats instances of torchao's own ``ObserverBase`` as observers, so each recipe observer
(the very class the FX route uses: :class:`~qmamba_ao.observers.PercentileObserver`,
:class:`~qmamba_ao.observers.PerTokenObserver`, :class:`~qmamba_ao.observers.LtSQObserver`,
:class:`~qmamba_ao.observers.TGQObserver`, torch.ao's min/max and histogram observers) is wrapped
in a thin adapter that forwards the data and the qparams to it:

* :class:`RecipeObserver` - affine observers on linear / conv / scan inputs and outputs. No
  ``convert`` of its own: ``convert_pt2e`` turns it into the standard decomposed
  ``quantize_per_tensor`` / ``quantize_per_channel`` pairs, as the FX route's reference conversion does.
* :class:`ScanSiteObserver` - the scan's internal sites. A temporal (per-step) observer is fed
  the stacked states as one block of steps (or step by step if it takes no blocks), which records
  what the FX route's scan records. Its ``convert`` freezes
  the observer with :func:`qmamba_ao.ssm.quantized.freeze_site` (the FX route's conversion) and
  writes the frozen quantizer into the graph as ATen ops (:func:`emit_frozen`): affine sites as
  ``round(x / s + z)`` clamped and scaled back, TGQ the same with each step's group qparams
  broadcast along time, LtSQ as its transform, that grid and the inverse transform. These are the
  same operations, in the same order, as the frozen modules' own forward: the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.fx import Node, Proxy
from torch.fx.proxy import GraphAppendingTracer
from torchao.quantization.pt2e import ObserverBase
from torchao.quantization.pt2e.utils import create_getattr_from_value

from ..observers import FrozenAffineQuant, FrozenLtSQ, FrozenLtSQLog2, FrozenTGQ
from ..observers.affine import is_per_channel
from ..ssm.quantized import freeze_site

__all__ = ["RecipeObserver", "ScanSiteObserver", "emit_frozen", "frozen_ops", "pt2e_dtype"]

aten = torch.ops.aten

_PT2E_DTYPES = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.uint8: torch.uint8, torch.int8: torch.int8}


def pt2e_dtype(dtype: torch.dtype) -> torch.dtype:
    """The plain integer dtype PT2E's quantize ops take for a torch.ao observer dtype (``quint8`` -> ``uint8``)."""
    if dtype not in _PT2E_DTYPES:
        raise ValueError(f"observer dtype {dtype} has no PT2E integer dtype; use one of {list(_PT2E_DTYPES)}")
    return _PT2E_DTYPES[dtype]


class RecipeObserver(ObserverBase):
    """A torchao observer that records through ``inner`` (a recipe observer built from ``inner_ctor``).

    ``label`` names the site (``input of layers.0.mixer.in_proj``, ``layers.0.mixer.scan.dA``); it
    becomes the inner observer's ``site_name``, which its errors quote. The keyword arguments that
    ``prepare_pt2e`` passes from the QuantizationSpec are checked against the inner observer's range.
    """

    def __init__(self, inner_ctor: Callable[[], nn.Module], label: str = "", **spec: Any) -> None:
        inner = inner_ctor()
        super().__init__(dtype=pt2e_dtype(inner.dtype), is_dynamic=False)
        self.inner = inner
        self.label = label
        if label:
            inner.site_name = label
        self.quant_min, self.quant_max = int(inner.quant_min), int(inner.quant_max)
        self.qscheme = getattr(inner, "qscheme", torch.per_tensor_affine)
        if is_per_channel(self.qscheme):
            self.ch_axis = int(inner.ch_axis)
        for key in ("quant_min", "quant_max"):
            if spec.get(key) is not None and int(spec[key]) != getattr(self, key):
                raise ValueError(
                    f"{label or type(inner).__name__}: QuantizationSpec {key}={spec[key]} disagrees "
                    f"with its observer ({getattr(self, key)})"
                )

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)

    def calculate_qparams(self, **kwargs: Any):  # type: ignore[override]
        return self.inner.calculate_qparams()

    def extra_repr(self) -> str:
        return f"label={self.label!r}"


class ScanSiteObserver(RecipeObserver):
    """An internal scan site: per-step observers get ``h_t`` one step at a time; converts itself."""

    #: axis of time in the stacked states ``(batch, dim, L, N)``
    time_axis = 2

    def forward(self, x: Tensor) -> Tensor:
        if getattr(self.inner, "per_step", False):
            length = x.shape[self.time_axis]
            if getattr(self.inner, "accepts_blocks", False):  # all steps at once, stacked time-major
                self.inner(x.movedim(self.time_axis, 0), range(0, length))
            else:
                for t in range(length):
                    self.inner(x.select(self.time_axis, t), t)
            return x
        return self.inner(x)

    def calculate_qparams(self, **kwargs: Any):  # type: ignore[override]
        return self.inner.calculate_qparams()

    def frozen(self) -> nn.Module:
        """The fixed quantizer the FX route's converted scan applies at this site."""
        return freeze_site(self.inner)

    def convert(self, model: torch.fx.GraphModule, observer_node: Node) -> None:
        """Replace the observer call by the frozen quantizer's ATen ops (called by ``convert_pt2e``)."""
        frozen = self.frozen()
        with model.graph.inserting_before(observer_node):
            out = emit_frozen(model, observer_node.args[0], frozen, prefix=_attr_prefix(self.label))
        observer_node.replace_all_uses_with(out)
        model.graph.erase_node(observer_node)


def _attr_prefix(label: str) -> str:
    return "_qmamba_" + "".join(c if c.isalnum() else "_" for c in label) + "_"


# -- frozen quantizers as ops --------------------------------------------------------------------------


def _ltsq_ops(x: Any, kind: int, p: Any, inv_p: Any, fq: Callable[[Any], Any]) -> Any:
    """LtSQ's ``T^{-1}(FQ(T(x)))`` with ATen ops (works on tensors and on FX proxies alike); the same
    operations as :func:`qmamba_ao.observers.ltsq_transform` / ``ltsq_inverse``. ``p`` and ``inv_p``
    are 0-dim float32 tensors (``1 / p`` rounded as the reference rounds it)."""
    if kind in (1, 2):
        t = aten.clamp_min.default(aten.rsub.Scalar(x, 1.0), 0.0)
        t = aten.pow.Tensor_Tensor(t, p) if kind == 1 else aten.log1p.default(aten.div.Tensor(t, p))
        q = aten.clamp_min.default(fq(t), 0.0)
        if kind == 1:
            return aten.rsub.Scalar(aten.pow.Tensor_Tensor(q, inv_p), 1.0)
        return aten.rsub.Scalar(aten.mul.Tensor(p, aten.expm1.default(q)), 1.0)
    mag = aten.abs.default(x)
    mag = aten.pow.Tensor_Tensor(mag, p) if kind == 3 else aten.log1p.default(aten.div.Tensor(mag, p))
    q = fq(aten.mul.Tensor(aten.sign.default(x), mag))
    back = aten.abs.default(q)
    if kind == 3:
        back = aten.pow.Tensor_Tensor(back, inv_p)
    else:
        back = aten.mul.Tensor(p, aten.expm1.default(back))
    return aten.mul.Tensor(aten.sign.default(q), back)


def _log2_ops(x: Any, kind: str, p: Any, fq: Callable[[Any], Any]) -> Any:
    """LtSQ's log2 form, ``log2_inverse(FQ(log2_transform(x)))``, with ATen ops: the same operations
    as :func:`qmamba_ao.observers.log2_transform` / ``log2_inverse`` (``p``: a 0-dim float32 tensor)."""
    if kind == "uniform":
        return fq(x)
    if kind == "unit_log2":
        t = aten.neg.default(aten.log2.default(aten.clamp_min.default(aten.rsub.Scalar(x, 1.0), 0.0)))
        return aten.rsub.Scalar(aten.exp2.default(aten.neg.default(fq(t))), 1.0)
    a = aten.div.Tensor(aten.abs.default(x), p)
    mag = aten.add.Tensor(
        aten.log2.default(aten.clamp_min.default(a, 2.0)), aten.mul.Tensor(aten.clamp_max.default(a, 2.0), 0.5)
    )
    q = fq(aten.mul.Tensor(aten.sign.default(x), aten.sub.Tensor(mag, 1.0)))
    u = aten.abs.default(q)
    back = aten.add.Tensor(
        aten.exp2.default(aten.clamp_min.default(u, 1.0)), aten.mul.Tensor(aten.clamp_max.default(u, 1.0), 2.0)
    )
    return aten.mul.Tensor(aten.mul.Tensor(aten.sign.default(q), p), aten.sub.Tensor(back, 2.0))


def _affine(x: Any, inv: Any, z: Any, s: Any, quant_min: int, quant_max: int) -> Any:
    """``(clamp(round(x * inv + z), quant_min, quant_max) - z) * s``: the arithmetic of
    :func:`qmamba_ao.observers.fake_quantize` on a whole tensor (``inv`` = float32 ``1 / scale``), which
    the frozen site quantizers apply; ``inv`` / ``z`` / ``s`` are Python numbers or broadcastable tensors."""
    t = aten.round.default(aten.add.Tensor(aten.mul.Tensor(x, inv), z))
    return aten.mul.Tensor(aten.sub.Tensor(aten.clamp.default(t, quant_min, quant_max), z), s)


def _inv(scale: Tensor) -> Tensor:
    return 1.0 / scale.to(torch.float32)  # float32 division, as the frozen quantizers round it


def frozen_ops(frozen: nn.Module, x: Any, const: Callable[[str, Tensor], Any]) -> Any:
    """Apply a frozen site quantizer to ``x`` with ATen ops; ``const(name, tensor)`` supplies its constants.

    The same operations in the same order as the frozen module's own forward (hence the same values):
    per-tensor grids as :func:`qmamba_ao.observers.fake_quantize` computes them, TGQ's per-step grids
    broadcast along time, LtSQ's transforms around its grid. Eagerly (``const`` returning the tensor)
    this is a reference to test against the module itself; under :func:`emit_frozen` it writes the ops
    into a graph.
    """
    if isinstance(frozen, FrozenAffineQuant):
        scale, zp = frozen.scale.float(), frozen.zero_point.int()
        if frozen.axis is None:
            s = scale.reshape(())
            return _affine(x, _inv(s).item(), int(zp.reshape(())), s.item(), frozen.quant_min, frozen.quant_max)
        return aten.fake_quantize_per_channel_affine.default(
            x, const("scale", scale), const("zero_point", zp), int(frozen.axis), frozen.quant_min, frozen.quant_max
        )
    if isinstance(frozen, FrozenTGQ):
        index = frozen.group_index.long()
        shape = (-1,) + (1,) * (3 - int(frozen.time_axis))  # time on axis 2 of (batch, dim, L, N)
        scale = frozen.scale.float()[index].reshape(shape)
        zp = frozen.zero_point.float()[index].reshape(shape)  # integers, exact in float32
        return _affine(
            x,
            const("inv_scale", _inv(scale)),
            const("zero_point", zp),
            const("scale", scale),
            frozen.quant_min,
            frozen.quant_max,
        )
    if isinstance(frozen, FrozenLtSQ):
        param = frozen.param.float().reshape(())
        s = frozen.scale.float().reshape(())
        inv, z, sc = _inv(s).item(), int(frozen.zero_point.reshape(())), s.item()

        def fq(t: Any) -> Any:
            return _affine(t, inv, z, sc, frozen.quant_min, frozen.quant_max)

        p, inv_p = const("param", param), const("inv_param", 1.0 / param)
        return _ltsq_ops(x, int(frozen.kind_id), p, inv_p, fq)
    if isinstance(frozen, FrozenLtSQLog2):
        s = frozen.scale.float().reshape(())
        inv, z, sc = _inv(s).item(), int(frozen.zero_point.reshape(())), s.item()

        def fq2(t: Any) -> Any:
            return _affine(t, inv, z, sc, frozen.quant_min, frozen.quant_max)

        return _log2_ops(x, frozen.kind, const("param", frozen.param.float().reshape(())), fq2)
    raise NotImplementedError(
        f"the PT2E route has no graph form for the frozen site quantizer {type(frozen).__name__}; the scan's "
        "sites support affine observers, LtSQ (both forms) and TGQ"
    )


def emit_frozen(model: torch.fx.GraphModule, x: Node, frozen: nn.Module, prefix: str = "_qmamba_site_") -> Node:
    """Write ``frozen``'s ops on ``x`` into ``model.graph`` at the current insertion point; returns the output node."""
    tracer = GraphAppendingTracer(model.graph)
    device = next((b.device for b in frozen.buffers()), None)

    def const(name: str, value: Tensor) -> Proxy:
        return Proxy(create_getattr_from_value(model, model.graph, prefix + name, value, device), tracer)

    return frozen_ops(frozen, Proxy(x, tracer), const).node


def describe(frozen: Optional[nn.Module]) -> str:
    return type(frozen).__name__ if frozen is not None else "float"
