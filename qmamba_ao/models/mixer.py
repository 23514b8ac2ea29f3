"""Unidirectional Mamba mixer written for torch.fx and torch.ao.

:class:`UniMambaMixer` is the one-direction counterpart of :class:`qmamba_ao.models.vim.BiMambaMixer`
(named apart from transformers' ``MambaMixer``, one of the classes it replaces):
the mixer of the original Mamba (``mamba_ssm.Mamba``) and of the Hugging Face language models, with
the scan as a :class:`qmamba_ao.ssm.SelectiveScan` leaf so that torch.ao can observe and quantize it.
It is what :func:`qmamba_ao.models.adapt_mamba` puts in place of foreign unidirectional mixers.

Layout differences from the foreign modules, in state-dict terms: ``A_log`` and ``D`` live in
``scan.A_log`` / ``scan.D``, and ``dt_proj.bias`` lives in ``scan.delta_bias`` (the scan adds it
before the softplus, as the fused kernels do). Every other key is the same.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.fx
from torch import Tensor, nn

from qmamba_ao.ssm import SelectiveScan

__all__ = ["UniMambaMixer"]


def _check_mixer_call(cache: Any, cache_params: Any, cache_position: Any, inference_params: Any) -> None:
    """Reject decoding state: the mixer always scans the whole sequence from a zero state.

    Registered with ``torch.fx.wrap`` so a traced graph keeps the check (a traced ``if`` on an
    argument would be decided once, at trace time).
    """
    if cache is not None or cache_params is not None or inference_params is not None:
        raise ValueError(
            "qmamba-ao's UniMambaMixer runs whole sequences only and does not support a decoding cache "
            "(cache / cache_params / inference_params). Call the model with use_cache=False (transformers) "
            "or without inference_params (mamba-ssm)."
        )
    del cache_position  # only meaningful together with a cache


def _apply_padding_mask(x: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """Zero padded positions of ``x`` ``(B, L, E)`` as transformers' Mamba does; no mask, no change."""
    if attention_mask is None:
        return x
    return (x * attention_mask[:, :, None]).to(x.dtype)


torch.fx.wrap("_check_mixer_call")
torch.fx.wrap("_apply_padding_mask")


def scan_inputs(x_dbl: Tensor, dt_proj: nn.Module, dt_rank: int, d_state: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``x_proj``'s output ``(B, L, R + 2N)`` into the scan's ``delta`` ``(B, E, L)`` (through
    ``dt_proj``; its bias is added inside the scan) and ``B``, ``C`` ``(B, 1, N, L)`` (one group
    shared by all channels). Shared with :class:`qmamba_ao.models.vim.BiMambaMixer`."""
    dt, b, c = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    delta = dt_proj(dt).transpose(1, 2)
    return delta, b.transpose(1, 2).unsqueeze(1), c.transpose(1, 2).unsqueeze(1)


class UniMambaMixer(nn.Module):
    """Mamba mixer with one scan direction, input and output ``(B, L, D)``.

    ``in_proj`` gives ``x`` and the gate ``z``; ``x`` goes through a causal depthwise conv, the
    activation, the data-dependent projections and the selective scan gated by ``silu(z)``, then
    ``out_proj``. ``bias`` (in/out projections) and ``conv_bias`` follow ``mamba_ssm.Mamba``'s
    arguments of the same names.

    ``forward`` accepts the keyword arguments foreign parents pass (``cache``, ``cache_params``,
    ``cache_position``, ``attention_mask``, ``inference_params``) so that the mixer can sit where a
    foreign one sat; a padding ``attention_mask`` is applied, any decoding cache is refused.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        d_inner: Optional[int] = None,
        bias: bool = False,
        conv_bias: bool = True,
    ) -> None:
        super().__init__()
        if d_conv < 2:
            raise ValueError(f"d_conv must be >= 2, got {d_conv}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model if d_inner is None else d_inner
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        di, r, n = self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=False)  # its bias is scan.delta_bias
        self.scan = SelectiveScan(di, n)
        self.out_proj = nn.Linear(di, d_model, bias=bias)
        with torch.no_grad():
            bound = r**-0.5
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}"

    def forward(
        self,
        hidden_states: Tensor,
        cache: Any = None,
        cache_params: Any = None,
        cache_position: Any = None,
        attention_mask: Optional[Tensor] = None,
        inference_params: Any = None,
    ) -> Tensor:
        _check_mixer_call(cache, cache_params, cache_position, inference_params)
        hidden_states = _apply_padding_mask(hidden_states, attention_mask)
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2E, L)
        x, z = xz.chunk(2, dim=1)
        # Causal conv: pad both sides, drop the last d_conv-1 outputs (a static slice).
        u = self.act(self.conv1d(x)[..., : -(self.d_conv - 1)])  # (B, E, L)
        u = _apply_padding_mask(u.transpose(1, 2), attention_mask)  # (B, L, E)
        delta, b, c = scan_inputs(self.x_proj(u), self.dt_proj, self.dt_rank, self.d_state)
        y = self.scan(u.transpose(1, 2), delta, b, c, z)
        return self.out_proj(y.transpose(1, 2))
