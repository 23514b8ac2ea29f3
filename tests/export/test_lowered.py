"""The x86 lowering's depthwise convolutions: int8 weights, float arithmetic, same function."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.quantization import QConfigMapping, get_default_qconfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from qmamba_ao.lowered import FloatDepthwiseConv1d, FloatDepthwiseConv2d, float_depthwise_convs

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


class Convs(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        self.depthwise = conv(8, 8, 3, groups=8, padding=2)
        self.grouped = conv(8, 8, 1, groups=2)  # grouped, not depthwise: stays an int8 kernel
        self.dense = conv(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.grouped(self.depthwise(x)))


def _lowered(dim: int, seed: int = 0) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(4, 8, *([12] * dim))
    prepared = prepare_fx(Convs(dim).eval(), QConfigMapping().set_global(get_default_qconfig("x86")), (x,))
    prepared(x)
    return convert_fx(prepared), x


@pytest.mark.parametrize("dim", [1, 2])
def test_depthwise_convs_compute_the_int8_kernels_function(dim):
    gm, x = _lowered(dim)
    reference = copy.deepcopy(gm)
    assert float_depthwise_convs(gm) == ["depthwise"]
    assert type(gm.depthwise) is (FloatDepthwiseConv1d if dim == 1 else FloatDepthwiseConv2d)
    assert type(gm.grouped) is type(gm.dense) is (nnq.Conv1d if dim == 1 else nnq.Conv2d)
    assert "FloatDepthwiseConv" in repr(gm.depthwise)
    with torch.no_grad():
        q_in = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)
        a, b = gm.depthwise(q_in), reference.depthwise(q_in)
        # same output grid; integer accumulation against float rounding: at most one step apart
        assert a.q_scale() == b.q_scale() and a.q_zero_point() == b.q_zero_point()
        steps = (a.int_repr().int() - b.int_repr().int()).abs()
        assert steps.max().item() <= 1 and (steps == 0).float().mean().item() > 0.99
        torch.testing.assert_close(gm(x).dequantize(), reference(x).dequantize(), atol=3 * a.q_scale(), rtol=0)


def test_state_dict_is_the_lowered_conv_s_own():
    """Files saved with or without the float forward load into each other: same keys, same values."""
    gm, x = _lowered(1)
    plain = copy.deepcopy(gm)
    float_depthwise_convs(gm)
    assert gm.state_dict().keys() == plain.state_dict().keys()
    other, _ = _lowered(1, seed=1)
    float_depthwise_convs(other)
    with torch.no_grad():
        assert not torch.equal(other(x), gm(x))
        other.load_state_dict(plain.state_dict())
        assert torch.equal(other(x), gm(x))
