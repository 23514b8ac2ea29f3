"""Shared affine math: integer ranges, qparams, fake quantization on the grid (property tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qmamba_ao.observers.affine import (
    FrozenAffineQuant,
    bits_of_range,
    check_bits,
    fake_quantize,
    int_range,
    qparams_from_minmax,
    resolve_quant_range,
)

FAST = settings(max_examples=40, deadline=None)
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -3, True, 2.5, "4"])
def test_check_bits_rejects_outside_2_to_8(bits):
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        check_bits(bits)


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_range(bits):
    assert int_range(bits, signed=False) == (0, 2**bits - 1)
    assert int_range(bits, signed=True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert bits_of_range(*int_range(bits, True)) == bits


def test_resolve_quant_range():
    assert resolve_quant_range(torch.quint8) == (0, 255)
    assert resolve_quant_range(torch.qint8, bits=4) == (-8, 7)
    assert resolve_quant_range(torch.quint8, 0, 15) == (0, 15)
    assert resolve_quant_range(torch.quint8, 0, 15, bits=4) == (0, 15)
    with pytest.raises(ValueError, match="disagrees"):
        resolve_quant_range(torch.quint8, 0, 15, bits=8)
    with pytest.raises(ValueError, match="needs 1 bits"):
        resolve_quant_range(torch.quint8, 0, 1)
    with pytest.raises(ValueError, match="does not fit"):
        resolve_quant_range(torch.quint8, -8, 7)
    with pytest.raises(ValueError, match="must contain 0"):
        resolve_quant_range(torch.quint8, 3, 15)
    with pytest.raises(ValueError, match="both quant_min and quant_max"):
        resolve_quant_range(torch.quint8, 0, None)
    with pytest.raises(ValueError, match="bits must be"):
        resolve_quant_range(torch.quint8, bits=9)


@FAST
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    symmetric=st.booleans(),
    a=finite,
    b=finite,
    seed=st.integers(0, 2**16),
)
def test_fake_quant_lands_on_the_integer_grid(bits, signed, symmetric, a, b, seed):
    lo, hi = min(a, b), max(a, b)
    qmin, qmax = int_range(bits, signed)
    scale, zp = qparams_from_minmax(torch.tensor([lo]), torch.tensor([hi]), qmin, qmax, symmetric)
    # integer-representable parameters: float32 scale > 0, int32 zero point inside the range
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert float(scale) > 0 and qmin <= int(zp) <= qmax
    g = torch.Generator().manual_seed(seed)
    span = max(hi - lo, 1e-3)
    x = lo - 0.2 * span + 1.4 * span * torch.rand(257, generator=g)
    y = fake_quantize(x, scale, zp, qmin, qmax)
    q = y.double() / float(scale) + int(zp)
    assert torch.all((q - q.round()).abs() < 1e-3)
    assert q.round().min() >= qmin and q.round().max() <= qmax
    # zero is exactly representable
    assert float(fake_quantize(torch.zeros(1), scale, zp, qmin, qmax)) == 0.0
    # inside the covered range the error is at most half a step
    inside = (x >= min(lo, 0.0)) & (x <= max(hi, 0.0))
    if not symmetric:
        err = (y - x)[inside].abs()
        assert err.numel() == 0 or float(err.max()) <= 0.5 * float(scale) * (1 + 1e-4) + 1e-6


@FAST
@given(bits=st.integers(2, 8), n=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_per_axis_equals_per_slice(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, 5, generator=g) * torch.rand(1, n, 1, generator=g) * 10
    qmin, qmax = int_range(bits, signed=False)
    scale, zp = qparams_from_minmax(x.amin((0, 2)), x.amax((0, 2)), qmin, qmax)
    assert scale.shape == (n,)
    per_axis = fake_quantize(x, scale, zp, qmin, qmax, axis=1)
    for i in range(n):
        assert torch.equal(per_axis[:, i], fake_quantize(x[:, i], scale[i], zp[i], qmin, qmax))


def test_symmetric_unsigned_zero_point_is_mid():
    scale, zp = qparams_from_minmax(torch.tensor([-1.0]), torch.tensor([3.0]), 0, 15, symmetric=True)
    assert int(zp) == 8 and float(scale) == pytest.approx(3.0 / 7.5)
    scale, zp = qparams_from_minmax(torch.tensor([-1.0]), torch.tensor([3.0]), -8, 7, symmetric=True)
    assert int(zp) == 0


def test_degenerate_range_uses_eps():
    scale, zp = qparams_from_minmax(torch.tensor([0.0]), torch.tensor([0.0]), 0, 15)
    assert float(scale) > 0 and int(zp) == 0


def test_frozen_affine_checks_axis_length():
    frozen = FrozenAffineQuant(torch.ones(4), torch.zeros(4, dtype=torch.int32), 0, 15, axis=1)
    frozen(torch.rand(2, 4))
    with pytest.raises(ValueError, match="has 5 entries there but 4 scales"):
        frozen(torch.rand(2, 5))
    with pytest.raises(ValueError, match="supports 2..8 bits|needs 9 bits"):
        FrozenAffineQuant(torch.ones(1), torch.zeros(1, dtype=torch.int32), 0, 511)


def test_fake_quantize_keeps_dtype():
    x = torch.randn(8, dtype=torch.float64)
    scale, zp = qparams_from_minmax(x.min(), x.max(), 0, 255)
    assert fake_quantize(x, scale, zp, 0, 255).dtype == torch.float64
