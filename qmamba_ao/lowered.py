"""Post-pass of the x86 lowering: depthwise convolutions computed in float from their int8 weights.

fbgemm's int8 depthwise convolution (``quantized::conv1d`` with ``groups == channels``, Mamba's
4-tap causal conv) is slow at ImageNet shapes: with it the Vim-T model with int8 linears took
1,817 ms at batch 8 against 665 ms with this pass, one thread (``benchmarks/export_latency.py
--model vim_tiny_patch16_224 --data random --linears-only --int8-depthwise``). The lowered module
keeps its int8 weight, bias and output qparams and computes
``quantize(conv(dequantize(x), dequantize(w)))``: the quantized model's function, as the
reference model computes it, at float speed. It stays a subclass of torch.ao's quantized conv
with the same ``state_dict``, so models saved before or after this pass load into each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.ao.nn import quantized as nnq

__all__ = ["FloatDepthwiseConv1d", "FloatDepthwiseConv2d", "FLOAT_FORWARD", "float_depthwise_convs"]


class _FloatArithmetic:
    """``forward`` of a lowered depthwise conv in float; the module's int8 state is unchanged."""

    _conv = staticmethod(F.conv1d)

    def _get_name(self) -> str:
        return type(self).__name__

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight().dequantize()  # type: ignore[attr-defined]
        y = self._conv(x.dequantize(), w, self.bias(), self.stride, self.padding, self.dilation, self.groups)  # type: ignore[attr-defined]
        return torch.quantize_per_tensor(y, float(self.scale), int(self.zero_point), torch.quint8)  # type: ignore[attr-defined]


class FloatDepthwiseConv1d(_FloatArithmetic, nnq.Conv1d):
    """A lowered int8 depthwise ``Conv1d`` computed in float: same weights, bias, output grid and state."""


class FloatDepthwiseConv2d(_FloatArithmetic, nnq.Conv2d):
    """A lowered int8 depthwise ``Conv2d`` computed in float: same weights, bias, output grid and state."""

    _conv = staticmethod(F.conv2d)


#: torch.ao quantized conv -> its float-arithmetic subclass
FLOAT_FORWARD = {nnq.Conv1d: FloatDepthwiseConv1d, nnq.Conv2d: FloatDepthwiseConv2d}


def _is_depthwise(mod: nn.Module) -> bool:
    return (
        type(mod) in FLOAT_FORWARD
        and mod.groups > 1
        and mod.groups == mod.in_channels == mod.out_channels
        and mod.padding_mode == "zeros"
    )


def float_depthwise_convs(gm: fx.GraphModule) -> list[str]:
    """Make every lowered depthwise convolution of ``gm`` compute in float (in place); return their names."""
    names = []
    for name, mod in gm.named_modules():
        if _is_depthwise(mod):
            mod.__class__ = FLOAT_FORWARD[type(mod)]  # same state, float forward
            names.append(name)
    return names
