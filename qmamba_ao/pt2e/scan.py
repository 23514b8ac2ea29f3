"""The selective scan as torch.export sees it: a decomposed form whose quantization sites are graph edges.

Under ``torch.export`` a :class:`~qmamba_ao.ssm.SelectiveScan` computes through
:func:`exported_scan` instead of its step loop (which would unroll into thousands of nodes):

* ``dA = exp(dt * A)`` and ``dBu = dt * B * u`` as ordinary ops (the same functions the FX route's
  scan uses, so the values are the same),
* the recurrence ``h_t = dA_t * h_{t-1} + dBu_t`` as one custom op, ``qmamba::scan_states``,
  returning every state stacked, ``(batch, dim, L, N)`` (a reference kernel, plus a fake kernel for
  tracing),
* the read-out ``y = sum_N(C * h) + D * u`` and the gate ``y * silu(z)`` as ops.

Each quantization site (``u``, ``delta``, ``B``, ``C``, ``z``, ``dA``, ``dBu``, ``h``, ``y`` and the
output ``out``) passes through a marker: an ``aten.alias`` node carrying ``{"qmamba_site": name}``
in its ``meta["custom"]``. A quantizer observes the value entering the marker; everything after the
marker uses the (fake-)quantized value. The quantized ``h`` only feeds the read-out and the
recurrence keeps the exact state: the library's default ``h_feedback=False``. ``h_feedback=True``
would need the quantizer inside the recurrence, where no graph edge exists.

This module only needs torch; the quantizer that reads the markers is in
:mod:`qmamba_ao.pt2e.quantizer`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import traceback as fx_traceback

from ..ssm.functional import _check_shapes, _discrete_A, _discrete_Bu, _prepare_delta

__all__ = ["SITE_KEY", "OUTPUT_SITE", "mark_site", "scan_states", "exported_scan"]

#: key of the marker nodes' ``meta["custom"]`` entry naming the site
SITE_KEY = "qmamba_site"
#: the scan's output (after the gate), observed like its inputs
OUTPUT_SITE = "out"


def mark_site(x: Tensor, site: str) -> Tensor:
    """``x`` through an ``aten.alias`` node that names its quantization site in the exported graph."""
    with fx_traceback.preserve_node_meta(), fx_traceback.annotate({SITE_KEY: site}):
        return torch.ops.aten.alias(x)


@torch.library.custom_op("qmamba::scan_states", mutates_args=())
def scan_states(dA: Tensor, dBu: Tensor) -> Tensor:
    """Every state of ``h_t = dA_t * h_{t-1} + dBu_t`` (``h_{-1} = 0``), inputs and output ``(batch, dim, L, N)``.

    The same step loop (``addcmul`` over time-major contiguous slices) as the FX route's scan, so the
    states are bit-identical to the ones its hooks see.
    """
    if dA.shape != dBu.shape or dA.dim() != 4:
        raise ValueError(
            f"scan_states expects dA and dBu of one shape (batch, dim, L, N); got {tuple(dA.shape)}, {tuple(dBu.shape)}"
        )
    b, d, length, n = dBu.shape
    a_t = dA.permute(2, 0, 1, 3).contiguous()
    bu_t = dBu.permute(2, 0, 1, 3).contiguous()
    states = bu_t.new_empty(length, b, d, n)
    h = bu_t.new_zeros(b, d, n)
    for t in range(length):
        h = torch.addcmul(bu_t[t], a_t[t], h)
        states[t] = h
    return states.permute(1, 2, 0, 3)


@scan_states.register_fake
def _scan_states_fake(dA: Tensor, dBu: Tensor) -> Tensor:
    b, d, length, n = dBu.shape
    return dBu.new_empty(length, b, d, n).permute(1, 2, 0, 3)


def _read_out(h: Tensor, C: Tensor) -> Tensor:
    """``y[b, d, t] = sum_n C[b, g(d), n, t] * h[b, d, t, n]``, ``(batch, dim, L)``.

    Contracted time-major, as the FX route's scan does (a contraction per time step gives the same
    values whatever the number of steps per call), so both routes read out the same numbers.
    """
    b, d, length, n = h.shape
    g = C.shape[1]
    h_t = h.permute(2, 0, 1, 3).reshape(length, b, g, d // g, n)
    c_t = C.permute(3, 0, 1, 2)  # L b g N
    y = torch.einsum("kbgdn,kbgn->kbgd", h_t, c_t).reshape(length, b, d)
    return y.permute(1, 2, 0).contiguous()


def exported_scan(
    u: Tensor,
    delta: Tensor,
    A_log: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    delta_bias: Tensor,
    delta_softplus: bool,
    z: Optional[Tensor] = None,
) -> Tensor:
    """The selective scan with marked sites (see the module docstring); same maths as
    :func:`qmamba_ao.ssm.selective_scan`, output ``(batch, dim, L)``."""
    u, delta, B, C = (mark_site(t, s) for t, s in ((u, "u"), (delta, "delta"), (B, "B"), (C, "C")))
    if z is not None:
        z = mark_site(z, "z")
    A = -torch.exp(A_log.float())
    _check_shapes(u, delta, A, B, C)
    dt = _prepare_delta(delta, delta_bias.float(), delta_softplus)
    dA = mark_site(_discrete_A(dt, A), "dA")
    dBu = mark_site(_discrete_Bu(dt, B, u), "dBu")
    h = mark_site(scan_states(dA, dBu), "h")
    y = _read_out(h, C) + u * D.float()[None, :, None]
    y = mark_site(y, "y")
    if z is not None:
        y = y * F.silu(z)
    return mark_site(y, OUTPUT_SITE)
