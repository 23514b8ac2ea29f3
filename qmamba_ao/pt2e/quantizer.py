"""``QMambaQuantizer``: a recipe's quantization as a torchao PT2E ``Quantizer``.

It reads the recipe's own ``QConfigMapping`` (:meth:`qmamba_ao.Recipe.qconfig_mapping`, the one the
FX route prepares with), so both routes put the same observer, with the same arguments, on the
same tensors:

* ``aten.linear`` / ``aten.conv1d`` / ``aten.conv2d`` called by an ``nn.Linear`` / ``nn.Conv1d`` /
  ``nn.Conv2d`` that the mapping quantizes (module-name patterns first, e.g. 8-bit patch embedding
  and head, then the module type): the input and the output with the activation observer (per
  tensor, or static per token), the weight with the weight observer (symmetric per output channel).
  The bias stays in float. ``aten.layer_norm`` / ``aten.gelu`` of an ``nn.LayerNorm`` / ``nn.GELU``
  that a module-name rule covers (the 8-bit patch embedding of VMamba): input and output, as FX
  quantizes them. The helper modules of the rewrites (``ChannelScale``, ``Hadamard``) stay
  in float, as in the mapping.
* every selective scan the mapping quantizes: its inputs ``u``, ``delta``, ``B``, ``C``, ``z`` and
  its output with the scan's activation observer, and its internal sites ``dA``, ``dBu``, ``h``,
  ``y`` with the recipe's site quantizers (LtSQ, TGQ, ...), found through the site markers of
  :mod:`qmamba_ao.pt2e.scan`.

Where a quantized layer's output feeds another quantized layer's input directly, the consumer
reuses the producer's observer, as torch.ao's FX prepare does; nothing else is shared (PT2E's
implicit sharing would also merge two different observers of one tensor, e.g. a conv's min/max
input and the scan's percentile input ``u``, which FX keeps apart). ``h_feedback=True`` is refused: the
exported scan quantizes ``h`` only on its way to the read-out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.ao.quantization import QConfig
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)

from ..observers.affine import is_per_channel
from ..recipes import Recipe, check_mapping_options, get_recipe
from ..ssm import SelectiveScan
from ..ssm.functional import INPUT_SITES, INTERNAL_SITES
from ..ssm.quantized import ScanQuantSpec, _default_sites
from .observers import RecipeObserver, ScanSiteObserver, pt2e_dtype
from .scan import OUTPUT_SITE, SITE_KEY

__all__ = ["QMambaQuantizer", "ANNOTATION_KEY"]

ANNOTATION_KEY = "quantization_annotation"
aten = torch.ops.aten
_LAYER_OPS = {aten.linear.default: nn.Linear, aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d}
#: ops without weights that torch.ao's FX prepare also quantizes (input and output) when a module-name
#: rule of the mapping covers their module, e.g. the patch embedding's norms and activation under the
#: 8-bit first/last rule
_ACTIVATION_OPS = {aten.layer_norm.default: nn.LayerNorm, aten.gelu.default: nn.GELU}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_of(node: Node) -> tuple[str, str]:
    """``(module path, class qualified name)`` of the innermost module that called ``node``; ``("", "")`` if none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    path = re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "")
    name = _qualname(cls) if isinstance(cls, type) else str(cls)
    return path, name


def site_of(node: Node) -> Optional[str]:
    """The scan site a marker node names, or None for any other node."""
    if node.op != "call_function" or node.target is not aten.alias.default:
        return None
    custom = node.meta.get("custom") or {}
    return custom.get(SITE_KEY)


def _spec(ctor: Callable[[], nn.Module], label: str, observer: type = RecipeObserver) -> QuantizationSpec:
    probe = ctor()
    qscheme = getattr(probe, "qscheme", torch.per_tensor_affine)
    return QuantizationSpec(
        dtype=pt2e_dtype(probe.dtype),
        observer_or_fake_quant_ctr=observer.with_args(inner_ctor=ctor, label=label),
        quant_min=int(probe.quant_min),
        quant_max=int(probe.quant_max),
        qscheme=qscheme,
        ch_axis=int(probe.ch_axis) if is_per_channel(qscheme) else None,
    )


class QMambaQuantizer(Quantizer):
    """A recipe (name or :class:`~qmamba_ao.Recipe`) at ``w_bits`` / ``a_bits`` as a torchao ``Quantizer``.

    ``options`` are the recipe's mapping options (:data:`qmamba_ao.recipes.MAPPING_OPTIONS`), checked
    as on the FX route; ``h_feedback=True`` is a ValueError here. ``layers=False`` leaves linears and
    convs to another quantizer (e.g. torchao's ``X86InductorQuantizer`` in a ``ComposableQuantizer``,
    listed after this one); ``scans=False`` leaves the scans alone. Nodes already annotated by a
    quantizer listed earlier are not touched.
    """

    def __init__(
        self,
        recipe: Union[str, Recipe] = "qmamba",
        w_bits: int = 4,
        a_bits: int = 4,
        *,
        layers: bool = True,
        scans: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        self.recipe = get_recipe(recipe)
        opts = check_mapping_options(w_bits, a_bits, options)
        if opts["h_feedback"]:
            raise ValueError(
                "h_feedback=True is not available on the PT2E route: the exported scan quantizes h only where it "
                "feeds the read-out (h_feedback=False). Use the FX route (route='fx') for a quantized recurrence."
            )
        for name, value in (("layers", layers), ("scans", scans)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r}: use True or False")
        self.w_bits, self.a_bits, self.options = w_bits, a_bits, dict(options)
        self.layers, self.scans = layers, scans
        self.mapping = self.recipe.qconfig_mapping(w_bits, a_bits, **options)

    def __repr__(self) -> str:
        return (
            f"QMambaQuantizer(recipe={self.recipe.name!r}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
            f"layers={self.layers}, scans={self.scans})"
        )

    # -- which qconfig a module gets: torch.ao's order (module-name patterns, then the type) ---------
    def qconfig_for(self, path: str, cls_name: str) -> Optional[QConfig]:
        m = self.mapping
        if path in m.module_name_qconfigs:
            return m.module_name_qconfigs[path]
        for pattern, qconfig in m.module_name_regex_qconfigs.items():
            if re.match(pattern, path):
                return qconfig
        for cls, qconfig in m.object_type_qconfigs.items():
            if isinstance(cls, type) and _qualname(cls) == cls_name:
                return qconfig
        return m.global_qconfig

    # -- Quantizer API -----------------------------------------------------------------------------
    def annotate(self, model: GraphModule) -> GraphModule:
        produced: dict[Node, QuantizationSpec] = {}
        for node in model.graph.nodes:
            if ANNOTATION_KEY in node.meta:
                continue
            if self.layers and node.op == "call_function" and node.target in _LAYER_OPS:
                self._annotate_layer(node, produced)
            elif self.layers and node.op == "call_function" and node.target in _ACTIVATION_OPS:
                self._annotate_activation_op(node, produced)
            elif self.scans and site_of(node) is not None:
                self._annotate_site(node)
        self._share_with_producers(model, produced)
        return model

    def validate(self, model: GraphModule) -> None:
        pass

    def _annotate_layer(self, node: Node, produced: dict[Node, QuantizationSpec]) -> None:
        path, cls_name = module_of(node)
        if cls_name != _qualname(_LAYER_OPS[node.target]):
            return  # a functional call inside another module: the mapping covers module types only
        qconfig = self.qconfig_for(path, cls_name)
        if qconfig is None or not isinstance(node.args[0], Node) or not isinstance(node.args[1], Node):
            return
        out = _spec(qconfig.activation, f"output of {path}")
        node.meta[ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map={
                node.args[0]: _spec(qconfig.activation, f"input of {path}"),
                node.args[1]: _spec(qconfig.weight, f"weight of {path}"),
            },
            output_qspec=out,
            allow_implicit_sharing=False,
            _annotated=True,
        )
        produced[node] = out

    def _annotate_activation_op(self, node: Node, produced: dict[Node, QuantizationSpec]) -> None:
        path, cls_name = module_of(node)
        if cls_name != _qualname(_ACTIVATION_OPS[node.target]) or not isinstance(node.args[0], Node):
            return
        qconfig = self.qconfig_for(path, cls_name)
        if qconfig is None:
            return
        out = _spec(qconfig.activation, f"output of {path}")
        node.meta[ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map={node.args[0]: _spec(qconfig.activation, f"input of {path}")},
            output_qspec=out,
            allow_implicit_sharing=False,
            _annotated=True,
        )
        produced[node] = out

    def _annotate_site(self, node: Node) -> None:
        site = site_of(node)
        path, _ = module_of(node)
        qconfig = self.qconfig_for(path, _qualname(SelectiveScan))
        if qconfig is None or not isinstance(node.args[0], Node):
            return
        spec = qconfig.activation
        if site in INPUT_SITES or site == OUTPUT_SITE:
            act = spec.activation if isinstance(spec, ScanQuantSpec) else spec
            label = f"output of {path}" if site == OUTPUT_SITE else f"input {site!r} of {path}"
            qspec = _spec(act, label)
        elif site in INTERNAL_SITES:
            sites = spec.sites if isinstance(spec, ScanQuantSpec) else _default_sites(spec)
            ctor = sites.get(site)
            if ctor is None:
                return  # this site stays in float
            qspec = _spec(ctor, f"{path}.{site}", ScanSiteObserver)
        else:
            raise ValueError(f"unknown scan site marker {site!r} in node {node.name}")
        node.meta[ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map={node.args[0]: qspec}, allow_implicit_sharing=False, _annotated=True
        )

    def _share_with_producers(self, model: GraphModule, produced: dict[Node, QuantizationSpec]) -> None:
        """A quantized output read directly by a quantized input is quantized once, with the producer's observer."""
        for node in model.graph.nodes:
            ann = node.meta.get(ANNOTATION_KEY)
            if not isinstance(ann, QuantizationAnnotation) or not ann._annotated:
                continue
            for arg in list(ann.input_qspec_map):
                if arg in produced:
                    ann.input_qspec_map[arg] = SharedQuantizationSpec(arg)
