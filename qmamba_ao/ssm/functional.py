"""The selective scan: one functional, one way to look inside it.

Shapes follow the convention shared by Mamba codebases:

* ``u``, ``delta``, ``z``: ``(batch, dim, L)``
* ``A``: ``(dim, N)`` (real, negative for a stable scan)
* ``B``, ``C``: ``(batch, groups, N, L)`` with ``dim % groups == 0``; channel ``d`` reads group
  ``d // (dim // groups)``. Vim uses one group, VMamba's four scan directions use four.
* ``D``, ``delta_bias``: ``(dim,)``

Recurrence, per batch, channel ``d`` and state ``n`` (``h_0 = 0``)::

    dt    = softplus(delta + delta_bias)          (softplus only if delta_softplus)
    dA_t  = exp(dt_t * A)                          site "dA"
    dBu_t = dt_t * B_t * u_t                       site "dBu"
    h_t   = dA_t * h_{t-1} + dBu_t                 site "h"
    y_t   = sum_n C_t[n] * h_t[n] + D * u_t        site "y"
    out_t = y_t * silu(z_t)                        (only if z is given)

Quantizers (or observers) reach the internal sites through :class:`ScanHooks`. That is the only
interception mechanism; the model code never sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ScanHooks",
    "selective_scan",
    "selective_scan_ref",
    "SITES",
    "INPUT_SITES",
    "INTERNAL_SITES",
    "DEFAULT_H_FEEDBACK",
    "SCAN_METHODS",
    "set_scan_method",
    "exact_decay",
]

#: Inputs of the scan, in call order (each is observed as a tensor entering the leaf module).
INPUT_SITES = ("u", "delta", "B", "C", "z")
#: Tensors computed inside the scan, reachable only through :class:`ScanHooks`.
INTERNAL_SITES = ("dA", "dBu", "h", "y")
#: Every quantization site of a selective scan, with its one name.
SITES = INPUT_SITES + INTERNAL_SITES
#: Whether a hooked (quantized) hidden state feeds the recurrence unless asked otherwise: no, it only
#: feeds the read-out, the better choice in measurement. The one default of ScanHooks, ScanQuantSpec,
#: the observed scan built from a plain QConfig and the recipes.
DEFAULT_H_FEEDBACK = False

TensorFn = Callable[[Tensor], Tensor]
StepFn = Callable[[Tensor, int], Tensor]


@dataclass
class ScanHooks:
    """Callables applied to the scan's internal tensors; ``None`` leaves a site untouched.

    Each hook returns the tensor that the scan goes on with (an observer returns its input, a
    fake-quantizer returns the quantized-dequantized value).

    * ``dA``, ``dBu``: called once with the whole ``(batch, dim, L, N)`` tensor (time on axis 2).
    * ``h``: called at every step with ``(h_t, t)``, ``h_t`` of shape ``(batch, dim, N)``; the
      step index lets temporal quantizers pick their group without stacking all states.
    * ``h_block``: optional faster form of ``h`` for read-out-only hooks (``h_feedback=False``):
      called with ``(states, t0)``, the states of consecutive steps ``t0, t0 + 1, ...`` stacked
      time-major as ``(steps, batch, dim, N)``; returns the block the read-out uses. It must act on
      each step as ``h(states[i], t0 + i)`` would; when given it replaces the per-step calls (the
      scan still calls ``h`` per step if ``h_feedback`` is on).
    * ``y``: called once with ``(batch, dim, L)``, after ``+ D*u`` and before the gate.
    * ``h_feedback``: if True the hooked ``h_t`` is what the recurrence carries on with (state kept
      in low precision); if False (:data:`DEFAULT_H_FEEDBACK`) it only feeds the read-out ``C_t . h_t``
      and the recurrence keeps the exact state.
    * ``pointwise``: the ``dA`` / ``dBu`` hooks act element by element and keep no state (fixed
      quantizers, not observers). The scan then calls them once per block of consecutive steps, on
      time-major ``(steps, batch, dim, N)`` slices, instead of once on the whole tensor: each block
      stays in the caches and no whole ``(batch, dim, L, N)`` tensor is ever formed. Same values.
    """

    dA: Optional[TensorFn] = None
    dBu: Optional[TensorFn] = None
    h: Optional[StepFn] = None
    y: Optional[TensorFn] = None
    h_feedback: bool = DEFAULT_H_FEEDBACK
    h_block: Optional[StepFn] = None
    pointwise: bool = False

    def is_empty(self) -> bool:
        return self.dA is None and self.dBu is None and self.h is None and self.y is None and self.h_block is None


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> int:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"selective_scan expects u and delta of shape (batch, dim, L); got u {tuple(u.shape)}, "
            f"delta {tuple(delta.shape)}"
        )
    b, d, length = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim, N) = ({d}, N); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != b or t.shape[2] != n or t.shape[3] != length:
            raise ValueError(f"{name} must be (batch, groups, N, L) = ({b}, g, {n}, {length}); got {tuple(t.shape)}")
    groups = B.shape[1]
    if C.shape[1] != groups or d % groups:
        raise ValueError(f"dim ({d}) must be divisible by groups (B: {B.shape[1]}, C: {C.shape[1]})")
    return groups


def _expand_groups(t: Tensor, dim: int) -> Tensor:
    """(b, g, N, L) -> (b, dim, L, N): each group's B/C shared by its dim // g channels."""
    b, g, n, length = t.shape
    t = t.permute(0, 1, 3, 2)  # b g L N
    if g == 1:
        return t.expand(b, dim, length, n)
    return t.unsqueeze(2).expand(b, g, dim // g, length, n).reshape(b, dim, length, n)


def _prepare_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor], hooks: Optional[ScanHooks]) -> Tensor:
    if D is not None:
        y = y + u * D[None, :, None]
    if hooks is not None and hooks.y is not None:
        y = hooks.y(y)
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Plain sequential reference: precompute dA and dBu, index time in a loop. Slow, obvious."""
    _check_shapes(u, delta, A, B, C)
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    d = u.shape[1]
    Bx, Cx = _expand_groups(B, d), _expand_groups(C, d)
    dA = torch.exp(delta.unsqueeze(-1) * A[None, :, None, :])
    dBu = delta.unsqueeze(-1) * Bx * u.unsqueeze(-1)
    h = u.new_zeros(u.shape[0], d, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append((h * Cx[:, :, t]).sum(-1))
    return _finish(torch.stack(ys, dim=-1), u, D, z, None)


#: Without hooks (float inference, training) the decay ``exp(delta * A)`` is computed as
#: ``exp2(delta * (A * log2(e)))``: torch's ``exp`` kernel (MKL's on x86) measured ~3x slower than its
#: ``exp2`` here, and the decay is the one transcendental per element of the scan. The two differ in
#: the last bits. With hooks (calibration, converted models) the scan keeps ``exp``: observers that
#: pick a discrete range (torch.ao's HistogramObserver) turned such last-bit differences into other
#: qparams, moving the ``histogram`` recipe's accuracy at W4A4 and W6A6, so the quantized paths keep the
#: values their qparams were calibrated on, independent of this speed choice.
LOG2E = 1.4426950408889634
_exact = False


@contextmanager
def exact_decay() -> Iterator[None]:
    """Form the decay with ``exp`` in hook-less scans too, inside this block: for float passes whose
    statistics choose qparams (a recipe's smoothing statistics), so that they see the values the
    calibration sees and do not depend on the speed choice described at :data:`LOG2E`."""
    global _exact
    before, _exact = _exact, True
    try:
        yield
    finally:
        _exact = before


#: Elements of ``(steps, batch, dim, N)`` handled per block of the scan (see :func:`_scan_blocks`):
#: ~2^18 floats (1 MiB) keep a block's dA, dBu and states in the caches and the per-block calls few.
BLOCK_ELEMS = 1 << 18
#: Scan formulations: ``"auto"`` (the measured choice), ``"loop"`` (blocked step loop) or
#: ``"parallel"`` (associative scan inside each block). Rule behind ``"auto"``: the blocked loop was
#: faster at every shape measured on CPU (1 to 32 images, L 17 to 197, blocks of 2^16 to 2^21
#: elements: the associative scan does ~log2(steps) times the arithmetic for fewer Python calls,
#: and one fused multiply-add per step over a cached block is already cheap), so ``"auto"`` is the loop.
SCAN_METHODS = ("auto", "loop", "parallel")
_method = "auto"


def set_scan_method(method: str) -> None:
    """Choose the formulation the scans use when ``h_feedback`` is off (see :data:`SCAN_METHODS`).

    Both give the same values up to float rounding; ``"auto"`` takes the one measured faster.
    """
    global _method
    if method not in SCAN_METHODS:
        raise ValueError(f"scan method must be one of {SCAN_METHODS}; got {method!r}")
    _method = method


def _block_len(per_step: int, length: int) -> int:
    return max(1, min(length, BLOCK_ELEMS // max(per_step, 1)))


def _exponent(A: Tensor, exact: bool) -> Tensor:
    """The factor of ``delta`` in the decay's exponent: ``A`` for ``exp``, ``A * log2(e)`` for ``exp2``."""
    return A if exact else A * LOG2E


def _decay(delta: Tensor, a: Tensor, exact: bool = True, out: Optional[Tensor] = None) -> Tensor:
    """``exp(delta * A)`` for time-major ``delta`` ``(..., b, d)``, with ``a = _exponent(A, exact)``
    ``(d, N)``: ``exp(delta * a)`` or, ``exact=False``, ``exp2(delta * a)`` (see :data:`LOG2E`).
    Into ``out`` when given; the exponential runs in place on the product either way."""
    x = delta.unsqueeze(-1)
    x = x * a if out is None else torch.mul(x, a, out=out)
    return x.exp_() if exact else x.exp2_()


def _parallel_block(a: Tensor, bu: Tensor, h: Optional[Tensor], out: Tensor) -> None:
    """States of one block without a loop over its steps: an associative (Hillis-Steele) scan of
    the pairs ``(dA_t, dBu_t)`` under ``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)``, then the carried
    state ``h`` enters through the cumulative decay. Only products of decays in [0, 1] and sums: safe
    for tiny or zero decays (no logarithms, no division)."""
    a, x = a.clone(), bu.clone()
    k, s = a.shape[0], 1
    while s < k:
        x[s:] = torch.addcmul(x[s:], a[s:], x[:-s])
        a[s:] = a[s:] * a[:-s]
        s *= 2
    if h is not None:
        torch.addcmul(x, a, h, out=out)
    else:
        out.copy_(x)


def _scan_blocks(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    dA: Optional[Tensor] = None,
    dBu: Optional[Tensor] = None,
    hooks: Optional[ScanHooks] = None,
    states: Optional[Tensor] = None,
    method: Optional[str] = None,
) -> Tensor:
    """Run h_t = dA_t h_{t-1} + dBu_t over time and return y_t = C_t . h_t, ``(b, d, L)``.

    Time is cut into blocks of consecutive steps. Per block, dA and dBu are formed with one call each
    (unless a hook already produced the whole tensors, passed in as ``dA``/``dBu``; pointwise hooks
    are applied here, per block), the states are computed in place in a ``(steps, b, d, N)`` buffer
    (a step loop of one fused multiply-add each, or the associative scan of :func:`_parallel_block`),
    the ``h`` hook sees them (one call per block through ``hooks.h_block``, else one per step) and the
    read-out is one contraction. With ``h_feedback`` the hooked state is what the recurrence
    carries, so the step loop calls the hook at every step. If ``states`` ``(L, b, d, N)`` is given,
    the states are written there (the backward).
    """
    b, d, length = u.shape
    g, n = B.shape[1], A.shape[1]
    dg = d // g
    h_hook = hooks.h if hooks is not None else None
    block_hook = hooks.h_block if hooks is not None else None
    feedback = hooks is not None and hooks.h_feedback and (h_hook is not None or block_hook is not None)
    if feedback and h_hook is None:
        raise ValueError("ScanHooks with h_feedback=True need the per-step hook h (h_block alone cannot feed back)")
    pointwise = hooks is not None and hooks.pointwise
    dA_hook = hooks.dA if pointwise and dA is None else None  # type: ignore[union-attr]
    dBu_hook = hooks.dBu if pointwise and dBu is None else None  # type: ignore[union-attr]
    method = method or _method
    parallel = method == "parallel" and not feedback
    exact = _exact or (hooks is not None and not hooks.is_empty())  # see LOG2E
    a_exp = _exponent(A, exact)
    # Under autograd (hooks being trained) nothing is written into preallocated buffers.
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, dA, dBu))
    # Time-major copies of the small inputs, so that every block (and step) is one contiguous slice.
    delta_t = delta.permute(2, 0, 1).contiguous()  # L b d
    du_t = (delta * u).permute(2, 0, 1).contiguous()
    Bt = B.permute(3, 0, 1, 2).unsqueeze(3).contiguous()  # L b g 1 N
    Ct = C.permute(3, 0, 1, 2).contiguous()  # L b g N
    # Whole-tensor dA / dBu are read block by block along time: keep time outermost.
    dA_t = dA.permute(2, 0, 1, 3) if dA is not None else None  # L b d N
    dBu_t = dBu.permute(2, 0, 1, 3) if dBu is not None else None
    y = u.new_empty(b, d, length)
    step = _block_len(b * d * n, length)
    h: Optional[Tensor] = None
    for t0 in range(0, length, step):
        t1 = min(t0 + step, length)
        k = t1 - t0
        if dA_t is not None:
            a = dA_t[t0:t1].contiguous()
        else:
            a = _decay(delta_t[t0:t1], a_exp, exact, None if track else u.new_empty(k, b, d, n))
        if dA_hook is not None:
            a = dA_hook(a)
        if dBu_t is not None:
            bu = dBu_t[t0:t1]
        else:
            du_k = du_t[t0:t1].view(k, b, g, dg, 1)
            buf = None if track else u.new_empty(k, b, g, dg, n)
            bu = (du_k * Bt[t0:t1] if buf is None else torch.mul(du_k, Bt[t0:t1], out=buf)).view(k, b, d, n)
            if dBu_hook is not None:
                bu = dBu_hook(bu)
        if torch.is_grad_enabled() and (a.requires_grad or bu.requires_grad or (h is not None and h.requires_grad)):
            # Autograd through the loop (hooks under training): no writes into shared buffers.
            steps = []
            for i in range(k):
                h = torch.addcmul(bu[i], a[i], h) if h is not None else bu[i]
                if feedback:
                    h = h_hook(h, t0 + i)  # type: ignore[misc]
                steps.append(h)
            hs = torch.stack(steps)
        else:
            # The states are formed in place over dBu's block (a fresh buffer, or ``states``).
            if states is not None:
                hs = states[t0:t1]
                hs.copy_(bu)
            elif dBu_t is None and dBu_hook is None:
                hs = bu  # the block's own fresh buffer
            else:
                # a hook's output: whoever saw it (forward hooks on the site) keeps its values
                hs = bu.clone(memory_format=torch.contiguous_format)
            av, hv = a.unbind(0), hs.unbind(0)
            if parallel:
                _parallel_block(a, hs, h, hs)
                h = hv[-1]
            elif feedback:
                reads = []
                for i in range(k):
                    if h is not None:
                        hv[i].addcmul_(av[i], h)
                    h = h_hook(hv[i], t0 + i)  # type: ignore[misc]
                    reads.append(h)
                hs = torch.stack(reads)
            else:
                if h is not None:
                    hv[0].addcmul_(av[0], h)
                for i in range(1, k):
                    hv[i].addcmul_(av[i], hv[i - 1])
                h = hv[-1]
        read = hs
        if not feedback:
            if block_hook is not None:
                read = block_hook(hs, t0)
            elif h_hook is not None:
                read = torch.stack([h_hook(hs[i], t0 + i) for i in range(k)])
        y_k = torch.einsum("kbgdn,kbgn->kbgd", read.reshape(k, b, g, dg, n), Ct[t0:t1])
        y[:, :, t0:t1] = y_k.reshape(k, b, d).permute(1, 2, 0)
    return y


class _SelectiveScanFn(torch.autograd.Function):
    """Core recurrence with a hand-written backward.

    Autograd through a Python loop over L steps keeps L small graphs alive and is slow; here the
    forward stores the states once and the backward is one reverse loop plus batched reductions.
    Works on the discretised inputs so the softplus and bias stay in ordinary autograd.
    """

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:  # type: ignore[override]
        hs = u.new_empty(u.shape[2], u.shape[0], u.shape[1], A.shape[1])  # (L, b, d, N)
        y = _scan_blocks(u, delta, A, B, C, states=hs)
        ctx.save_for_backward(u, delta, A, B, C, hs)
        ctx.exact = _exact  # the decay's form in this forward (see LOG2E), for the backward
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        # One reverse pass over time with (b, d, N) tensors that stay in cache:
        #   gh_t = C_t gy_t + dA_{t+1} gh_{t+1}            (gradient w.r.t. h_t)
        #   g(delta_t A) = gh_t h_{t-1} dA_t,  g(dBu_t) = gh_t
        u, delta, A, B, C, hs = ctx.saved_tensors
        a_exp = _exponent(A, ctx.exact)
        b, d, length = u.shape
        g, n = B.shape[1], A.shape[1]
        dg = d // g
        Bt = B.permute(3, 0, 1, 2).contiguous()  # L b g N
        Ct = C.permute(3, 0, 1, 2).unsqueeze(3).contiguous()  # L b g 1 N
        gy = gy.contiguous()
        du = delta * u
        g_x = torch.empty_like(u)  # sum_n g(delta A) * A
        g_hb = torch.empty_like(u)  # sum_n gh_t B_t
        g_A_b = torch.zeros_like(hs[0])  # per-batch partial sums of g(A); einsum "bdn,bd->dn" per step is slow
        g_B = u.new_empty(length, b, g, n)
        g_C = u.new_empty(length, b, g, n)
        gh = a_next = None
        for t in range(length - 1, -1, -1):
            gy_t = gy[:, :, t]
            direct = (gy_t.view(b, g, dg, 1) * Ct[t]).view(b, d, n)
            gh = direct if gh is None else torch.addcmul(direct, a_next, gh)
            a_t = _decay(delta[:, :, t], a_exp, ctx.exact)  # as the forward formed it
            gh_g = gh.view(b, g, dg, n)
            g_hb[:, :, t] = torch.einsum("bgdn,bgn->bgd", gh_g, Bt[t]).reshape(b, d)
            g_B[t] = torch.einsum("bgd,bgdn->bgn", du[:, :, t].view(b, g, dg), gh_g)
            g_C[t] = torch.einsum("bgd,bgdn->bgn", gy_t.view(b, g, dg), hs[t].view(b, g, dg, n))
            if t > 0:
                x = gh * hs[t - 1] * a_t
                g_x[:, :, t] = (x * A).sum(-1)
                g_A_b.addcmul_(x, delta[:, :, t, None])
            else:
                g_x[:, :, t] = 0
            a_next = a_t
        g_A = g_A_b.sum(0)
        g_delta = g_x + g_hb * u
        g_u = g_hb * delta
        return g_u, g_delta, g_A, g_B.permute(1, 2, 3, 0), g_C.permute(1, 2, 3, 0)


def _discrete_A(delta: Tensor, A: Tensor) -> Tensor:
    """``exp(delta * A)`` as ``(b, d, L, N)``, stored time-major so the step loop reads contiguous
    slices (element-wise hooks keep that layout)."""
    return _decay(delta.permute(2, 0, 1).contiguous(), A).permute(1, 2, 0, 3)  # exact


def _discrete_Bu(delta: Tensor, B: Tensor, u: Tensor) -> Tensor:
    """``delta * B * u`` as ``(b, d, L, N)``, stored time-major like :func:`_discrete_A`."""
    b, d, length = u.shape
    g, n = B.shape[1], B.shape[2]
    du = (delta * u).permute(2, 0, 1).contiguous().view(length, b, g, d // g, 1)
    bt = B.permute(3, 0, 1, 2).unsqueeze(3).contiguous()  # L b g 1 N
    return (du * bt).reshape(length, b, d, n).permute(1, 2, 0, 3)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    hooks: Optional[ScanHooks] = None,
) -> Tensor:
    """Selective scan with optional hooks on the internal sites; returns ``(batch, dim, L)``.

    Without hooks and with gradients enabled it uses a hand-written backward (cheap training on
    long sequences). Otherwise it runs the blocked scan of :func:`_scan_blocks`, which calls the hooks.
    """
    _check_shapes(u, delta, A, B, C)
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    no_hooks = hooks is None or hooks.is_empty()
    if no_hooks and torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C)):
        y = _SelectiveScanFn.apply(u, delta, A, B, C)
    else:
        dA = dBu = None
        whole = hooks is not None and not hooks.pointwise  # pointwise hooks are applied per block
        if whole and hooks.dA is not None:  # type: ignore[union-attr]
            dA = hooks.dA(_discrete_A(delta, A))  # type: ignore[union-attr]
        if whole and hooks.dBu is not None:  # type: ignore[union-attr]
            dBu = hooks.dBu(_discrete_Bu(delta, B, u))  # type: ignore[union-attr]
        y = _scan_blocks(u, delta, A, B, C, dA, dBu, hooks)
    return _finish(y, u, D, z, hooks)
