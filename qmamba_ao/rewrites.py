"""Float-equivalent model rewrites used by the recipes (applied before ``prepare_fx``).

Each rewrite returns a new model (the input is deep-copied, never modified) whose float output
equals the original's up to rounding; it only changes *what* the quantizers later see.

* :func:`smooth_linears` - SmoothQuant-style smoothing (PTQ4VM): per input channel ``j`` of a
  Linear, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; the Linear becomes
  ``ScaledLinear(ChannelScale(1 / s), Linear(W * s))``, so its quantized input is ``X / s``.
* :func:`rotate_out_proj` - Quamba's Hadamard rotation of ``out_proj``'s input: the Linear
  becomes ``RotatedLinear(Hadamard(H), Linear(W H^T))``; ``H y`` is computed online in float, so
  ``out_proj``'s quantized input is the rotated activation, whose outliers are spread over all
  channels.

The inserted :class:`ChannelScale` and :class:`Hadamard` modules are plain ``nn.Module`` s that FX
traces through (a ``mul`` / ``matmul`` with a buffer); the wrapped ``nn.Linear`` stays a module
(``...mixer.out_proj.linear``) that torch.ao quantizes as usual. :func:`qmamba_ao.get_qconfig_mapping`
sets both helper types' qconfig to ``None`` so their ops stay float even under a global qconfig;
with a hand-made mapping do the same (``mapping.set_object_type(Hadamard, None)``).

:func:`qmamba_ao.quantize` applies a recipe's rewrite by itself (see
:meth:`qmamba_ao.Recipe.rewrite`); users of the raw torch.ao calls (``prepare_fx`` ...) rewrite the
float model first.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._utils import batch_input, set_submodule
from .ssm import is_float_scan
from .ssm.functional import exact_decay

__all__ = [
    "ChannelScale",
    "ScaledLinear",
    "Hadamard",
    "RotatedLinear",
    "hadamard_matrix",
    "mixer_linears",
    "linear_input_absmax",
    "smoothing_scales",
    "smooth_linears",
    "rotate_out_proj",
]


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class ChannelScale(nn.Module):
    """``x * scale`` with a per-channel (last axis) float buffer; stays in float."""

    scale: Tensor

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(-1).clone())

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class _InputMappedLinear(nn.Module):
    """``linear(pre(x))``: a Linear whose input first goes through a float module.

    Subclasses name that module's attribute in ``pre_name`` (``scale``, ``rotate``), which appears in
    the state-dict keys and the traced graph (``...out_proj.rotate.matrix_t``).
    """

    pre_name: str

    def __init__(self, pre: nn.Module, linear: nn.Linear) -> None:
        super().__init__()
        self.add_module(self.pre_name, pre)
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(getattr(self, self.pre_name)(x))


class ScaledLinear(_InputMappedLinear):
    """``linear(scale(x))``: a smoothed Linear (``scale`` holds ``1 / s``, ``linear`` holds ``W * s``)."""

    pre_name = "scale"
    scale: ChannelScale

    def __init__(self, scale: ChannelScale, linear: nn.Linear) -> None:
        super().__init__(scale, linear)


class Hadamard(nn.Module):
    """Online rotation ``x -> x H^T`` along the last axis (``H`` orthonormal); stays in float.

    The buffer holds ``H^T`` (``matrix_t``) so that the traced graph is one ``matmul`` with a
    buffer, which moves with ``.to(device)``; ``matrix`` gives ``H``.
    """

    matrix_t: Tensor

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Hadamard needs a square matrix; got shape {tuple(matrix.shape)}")
        self.register_buffer("matrix_t", matrix.detach().to(torch.float32).t().contiguous())

    @property
    def matrix(self) -> Tensor:
        return self.matrix_t.t()

    def extra_repr(self) -> str:
        return f"size={self.matrix_t.shape[0]}"

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.matrix_t)


class RotatedLinear(_InputMappedLinear):
    """``linear(rotate(x))`` with ``linear.weight = W H^T``: equals the original ``x W^T``."""

    pre_name = "rotate"
    rotate: Hadamard

    def __init__(self, rotate: Hadamard, linear: nn.Linear) -> None:
        super().__init__(rotate, linear)


# ----------------------------------------------------------------------------------------------
# Hadamard matrices
# ----------------------------------------------------------------------------------------------


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(m: int) -> Tensor:
    """Paley construction I: a (+-1) Hadamard matrix of order ``m = q + 1``, ``q`` prime, ``q = 3 mod 4``."""
    q = m - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i), antisymmetric
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jacobsthal
    return torch.eye(m, dtype=torch.float64) + s


def _pm1_hadamard(n: int) -> Optional[Tensor]:
    """A +-1 Hadamard matrix of order ``n = m 2^k`` with ``m = 1`` (Sylvester) or ``m - 1`` a prime
    ``= 3 mod 4`` (Paley I, e.g. 12, 20, 24, 44), as a Kronecker product; ``None`` if neither."""
    k = (n & -n).bit_length() - 1  # n = odd * 2^k
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1:
            return _sylvester(n)
        if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            return torch.kron(_paley(m), _sylvester(1 << j))
    return None


def hadamard_matrix(n: int, *, allow_block_diagonal: bool = True) -> Tensor:
    """An orthonormal Hadamard matrix of size ``n`` (float32, ``H H^T = I``, entries ``+-1/sqrt(b)``).

    * ``n`` a power of two: Sylvester's construction.
    * ``n = m 2^k`` with ``m - 1`` a prime congruent to 3 mod 4 (``m`` = 12, 20, 24, 44, ...):
      ``H_m (Paley I) kron H_{2^k}``. This covers the common Mamba widths that are not powers of
      two (Vim-T ``d_inner = 384 = 12 * 32``, Vim-S 768, Vim-B 1536), which Quamba's kernels also
      handle with their 12/20/28-point matrices.
    * otherwise, if ``allow_block_diagonal``: block-diagonal of Sylvester blocks of the largest
      power of two ``b`` dividing ``n`` (orthonormal, but it only mixes channels within a block);
      a ValueError when ``b < 2`` (odd ``n``) or ``allow_block_diagonal=False``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard size must be a positive integer; got {n!r}")
    h = _pm1_hadamard(n)
    if h is not None:
        return (h / math.sqrt(n)).to(torch.float32)
    b = n & -n
    if not allow_block_diagonal or b < 2:
        raise ValueError(
            f"no Hadamard matrix of size {n} is constructed here (sizes m*2^k with m = 1 or m - 1 a prime "
            f"= 3 mod 4 are supported)"
            + ("" if b < 2 else f"; pass allow_block_diagonal=True for {n // b} blocks of size {b}")
        )
    block = _sylvester(b) / math.sqrt(b)
    return torch.block_diag(*([block] * (n // b))).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Which Linears
# ----------------------------------------------------------------------------------------------


def _mixers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own a SelectiveScan as a direct child (Vim's BiMambaMixer and the like)."""
    return [(name, m) for name, m in model.named_modules() if any(is_float_scan(c) for c in m.children())]


def mixer_linears(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` that is a direct child of a mixer (a module owning a SelectiveScan).

    For Vim: ``in_proj``, ``x_proj``, ``x_proj_b``, ``dt_proj``, ``dt_proj_b``, ``out_proj`` of each
    block, the layers PTQ4VM's released code quantizes and smooths. The patch embedding and the
    head are not included.
    """
    names = []
    for prefix, mixer in _mixers(model):
        for child, m in mixer.named_children():
            if isinstance(m, nn.Linear):
                names.append(f"{prefix}.{child}" if prefix else child)
    return names


# ----------------------------------------------------------------------------------------------
# Smoothing (PTQ4VM / SmoothQuant)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def linear_input_absmax(model: nn.Module, calib_batches: Iterable[Any], names: Sequence[str]) -> dict[str, Tensor]:
    """Per-input-channel ``max |X_j|`` of the named Linears over ``calib_batches`` (a float pass).

    Uses forward pre-hooks, removed afterwards; the model is run in eval mode and is not changed.
    """
    stats: dict[str, Tensor] = {}
    hooks = []

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            amax = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            if not bool(torch.isfinite(amax).all()):
                raise ValueError(f"smoothing: the input of {name} has non-finite values on the calibration data")
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)

        return fn

    was_training = model.training
    model.eval()
    try:
        for name in names:
            hooks.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
        n = 0
        with exact_decay():  # statistics that set qparams see the calibration's decay values
            for batch in calib_batches:
                model(batch_input(batch))
                n += 1
        if n == 0:
            raise ValueError("calib_batches is empty: smoothing needs at least one batch of calibration images")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if n not in stats]
    if missing:
        raise ValueError(f"smoothing: {missing} never ran on the calibration data")
    return stats


def smoothing_scales(act_absmax: Tensor, weight: Tensor, alpha: float = 0.5) -> Tensor:
    """``s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)``, with PTQ4VM's clamps.

    As in PTQ4VM's released code: ``max|X|`` is clamped at 1e-3, ``max|W|`` at 1e-5 and ``s`` at 1e-5.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    act = act_absmax.float().clamp(min=1e-3)
    w = weight.detach().abs().amax(0).float().clamp(min=1e-5)
    return (act.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)


def _copy_for_rewrite(model: nn.Module, names: Sequence[str], rewrite: str) -> nn.Module:
    """A deep copy of ``model`` for ``rewrite`` to modify, once every layer in ``names`` is checked to
    be a plain ``nn.Linear`` (``ValueError`` naming the rewrite, the layer and its type otherwise)."""
    for name in names:
        mod = model.get_submodule(name)
        if type(mod) is not nn.Linear:
            raise ValueError(f"{rewrite}: {name} is a {type(mod).__name__}, not an nn.Linear")
    return copy.deepcopy(model)


def smooth_linears(
    model: nn.Module,
    calib_batches: Optional[Iterable[Any]],
    alpha: float = 0.5,
    names: Optional[Sequence[str]] = None,
) -> nn.Module:
    """SmoothQuant-style smoothing of Linear layers; returns a new model (``model`` is not modified).

    A calibration pass over ``calib_batches`` (input tensors or ``(input, target)`` pairs) records
    the per-input-channel ``max|X_j|`` of each chosen Linear; with ``s`` from
    :func:`smoothing_scales` each Linear is replaced by ``ScaledLinear(ChannelScale(1 / s),
    Linear(W * s))`` (``W * s`` scales input channel ``j`` of the weight by ``s_j``). The float
    output is unchanged; the quantizers then see the flattened activation ``X / s`` and the
    weight ``W * s``. The ``1 / s`` is applied online in float (SmoothQuant folds it into the
    preceding norm where one exists; here every Linear gets its own scale).

    ``names`` default to :func:`mixer_linears` (all Linears of the Mamba mixers, as PTQ4VM).

    ``calib_batches=None`` gives the same structure with unit scales (no calibration pass): the
    skeleton a saved state_dict of a smoothed, quantized model is loaded into.
    """
    names = mixer_linears(model) if names is None else list(names)
    if not names:
        raise ValueError(f"{type(model).__name__}: no Linear layers to smooth")
    new = _copy_for_rewrite(model, names, "smooth_linears")
    absmax = None
    if calib_batches is not None:
        from .distributed import all_reduce_max  # under a process group each process saw its own share

        absmax = all_reduce_max(linear_input_absmax(new, calib_batches, names))
    with torch.no_grad():
        for name in names:
            linear = new.get_submodule(name)
            if absmax is None:
                inverse = torch.ones(linear.in_features, device=linear.weight.device)
            else:
                s = smoothing_scales(absmax[name], linear.weight, alpha).to(linear.weight)
                linear.weight.mul_(s)
                inverse = 1.0 / s
            set_submodule(new, name, ScaledLinear(ChannelScale(inverse), linear))
    return new


# ----------------------------------------------------------------------------------------------
# Hadamard rotation of out_proj (Quamba)
# ----------------------------------------------------------------------------------------------


def rotate_out_proj(model: nn.Module, *, allow_block_diagonal: bool = True) -> nn.Module:
    """Rotate every mixer's ``out_proj`` input by a Hadamard matrix; returns a new model.

    ``out_proj(y) = y W^T = (y H^T)(W H^T)^T`` for orthonormal ``H``: each mixer's ``out_proj``
    Linear becomes ``RotatedLinear(Hadamard(H), Linear(W H^T))`` (bias unchanged). The rotation
    runs online in float; ``out_proj.linear`` is what torch.ao quantizes. ``H`` comes from
    :func:`hadamard_matrix` with the Linear's ``in_features`` (``d_inner``).
    """
    targets = [
        f"{prefix}.out_proj" if prefix else "out_proj"
        for prefix, mixer in _mixers(model)
        if isinstance(getattr(mixer, "out_proj", None), nn.Module)
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Mamba mixer with an out_proj to rotate")
    new = _copy_for_rewrite(model, targets, "rotate_out_proj")
    cache: dict[int, Tensor] = {}
    with torch.no_grad():
        for name in targets:
            linear = new.get_submodule(name)
            d = linear.in_features
            if d not in cache:
                cache[d] = hadamard_matrix(d, allow_block_diagonal=allow_block_diagonal)
            h = cache[d]
            w = linear.weight.double() @ h.double().t()
            linear.weight.copy_(w.to(linear.weight.dtype))
            set_submodule(new, name, RotatedLinear(Hadamard(h.to(linear.weight.device)), linear))
    return new
