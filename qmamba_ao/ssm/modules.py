"""The float selective-scan leaf module.

Models call :class:`SelectiveScan` instead of the functional so that FX sees one opaque module per
scan (the recurrence is never traced) and torch.ao can swap it for its observed and quantized
counterparts through the custom-module mappings. Those counterparts subclass :class:`SelectiveScan`
(same parameters, same :meth:`SelectiveScan.run`), so "a float, unprepared scan" is asked with
:func:`is_float_scan`, not ``isinstance``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .functional import ScanHooks, selective_scan
from .fused import fused_scan_fn

__all__ = ["SelectiveScan", "is_float_scan"]


class SelectiveScan(nn.Module):
    """Owns ``A_log`` ``(dim, N)``, ``D`` ``(dim,)`` and the step bias ``delta_bias`` ``(dim,)``.

    ``forward(u, delta, B, C, z=None)`` returns one tensor ``(batch, dim, L)``: the scan output,
    plus ``D*u``, gated by ``silu(z)`` when ``z`` is given. ``A = -exp(A_log)``; the step is
    ``softplus(delta + delta_bias)`` (``delta_softplus=True``, as in every released Mamba model).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        delta_softplus: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.d_state = d_state
        self.delta_softplus = delta_softplus
        # S4D-real initialisation, as in the official Mamba code.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(dim))
        dt = torch.exp(torch.rand(dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.delta_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_state={self.d_state}, delta_softplus={self.delta_softplus}"

    def run(
        self,
        u: Tensor,
        delta: Tensor,
        B: Tensor,
        C: Tensor,
        z: Optional[Tensor] = None,
        hooks: Optional[ScanHooks] = None,
    ) -> Tensor:
        """The functional call with this module's parameters and optional ``hooks``.

        The observed and quantized scans run through here with their site hooks; analysis replays it
        with recording hooks. The plain forward may take the fused kernel instead (no hooks there).
        """
        return selective_scan(
            u,
            delta,
            -torch.exp(self.A_log.float()),
            B,
            C,
            D=self.D.float(),
            z=z,
            delta_bias=self.delta_bias.float(),
            delta_softplus=self.delta_softplus,
            hooks=hooks,
        )

    def forward(self, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Optional[Tensor] = None) -> Tensor:
        if torch.compiler.is_exporting():  # torch.export: the decomposed form with marked quantization sites
            from ..pt2e.scan import exported_scan

            return exported_scan(u, delta, self.A_log, B, C, self.D, self.delta_bias, self.delta_softplus, z)
        kernel = fused_scan_fn(u)
        if kernel is not None:  # float scan on CUDA with mamba-ssm installed: same maths, fused
            A = -torch.exp(self.A_log.float())
            return kernel(u, delta, A, B, C, self.D.float(), z, self.delta_bias.float(), self.delta_softplus)
        return self.run(u, delta, B, C, z)


def is_float_scan(module: nn.Module) -> bool:
    """True for a float, unprepared :class:`SelectiveScan`; False for its observed/quantized subclasses.

    torch.ao's custom-module mappings key on the exact type as well, so this is the test that
    matches what ``prepare_fx`` will swap.
    """
    return type(module) is SelectiveScan
