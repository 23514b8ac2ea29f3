"""Post-pass of the x86 lowering: depthwise convolutions computed in float from their int8 weights.

fbgemm's int8 depthwise 1-D convolution (``quantized::conv1d`` with ``groups == channels``, Mamba's
4-tap causal conv) took 13x the time of the float convolution on one thread at Vim-T shape
(141 ms against 10.6 ms per forward, 48 calls; ``benchmarks/export_latency.py --linears-only``
shows the whole-model effect). :class:`FloatDepthwiseConv` keeps the lowered module's int8
weight, bias and output qparams and computes ``quantize(conv(dequantize(x), dequantize(w)))``:
the quantized model's function, as the reference model computes it, at float speed. The
``state_dict`` keys stay those of the wrapped module (prefixed ``conv.``).
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.ao.nn import quantized as nnq

from ._utils import set_submodule

__all__ = ["FloatDepthwiseConv", "float_depthwise_convs"]

_CONV_FNS = {nnq.Conv1d: F.conv1d, nnq.Conv2d: F.conv2d}


def _is_depthwise(mod: nn.Module) -> bool:
    return type(mod) in _CONV_FNS and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels


class FloatDepthwiseConv(nn.Module):
    """A lowered int8 depthwise convolution computed in float: same weights, bias and output grid."""

    def __init__(self, conv: Union[nnq.Conv1d, nnq.Conv2d]) -> None:
        super().__init__()
        if not _is_depthwise(conv):
            raise ValueError(f"FloatDepthwiseConv takes a quantized depthwise Conv1d/Conv2d; got {conv!r}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding is supported; {conv!r} pads with {conv.padding_mode!r}")
        self.conv = conv
        self._fn = _CONV_FNS[type(conv)]

    def extra_repr(self) -> str:
        return "int8 weights, float arithmetic"

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        y = self._fn(x.dequantize(), c.weight().dequantize(), c.bias(), c.stride, c.padding, c.dilation, c.groups)
        return torch.quantize_per_tensor(y, float(c.scale), int(c.zero_point), torch.quint8)


def float_depthwise_convs(gm: fx.GraphModule) -> list[str]:
    """Swap every lowered depthwise convolution of ``gm`` for a :class:`FloatDepthwiseConv`; return their names."""
    names = [name for name, mod in gm.named_modules() if _is_depthwise(mod)]
    for name in names:
        set_submodule(gm, name, FloatDepthwiseConv(gm.get_submodule(name)))
    return names
