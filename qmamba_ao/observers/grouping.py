"""Temporal groups for TGQ: which consecutive steps of the scan share one quantization grid.

:func:`uniform_groups` cuts the steps into groups of near-equal length; :func:`range_groups`
places the cuts where they minimise TGQ's proxy quantization error (see
:mod:`qmamba_ao.observers.tgq`), by dynamic programming over contiguous segments. Both return a
step -> group index; they only look at per-step statistics, never at the states themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["uniform_groups", "range_groups"]


def uniform_groups(length: int, num_groups: int) -> Tensor:
    """Step -> group index for ``min(num_groups, length)`` groups of near-equal length."""
    g = max(1, min(num_groups, length))
    return torch.div(torch.arange(length) * g, max(length, 1), rounding_mode="floor").to(torch.int64)


def _segment_reduce(values: Tensor, seg: Tensor, k: int, reduce: str, fill: float) -> Tensor:
    out = torch.full((k,), fill, dtype=values.dtype)
    return out.scatter_reduce(0, seg, values, reduce=reduce, include_self=False)


def range_groups(
    min_step: Tensor,
    max_step: Tensor,
    sumsq_step: Tensor,
    count_step: Tensor,
    num_groups: int,
    quant_min: int,
    quant_max: int,
    symmetric: bool = False,
    max_blocks: int = 256,
) -> Tensor:
    """Step -> group index minimising the TGQ proxy error (see module docstring) by DP."""
    length = min_step.numel()
    if length == 0:
        return torch.zeros(0, dtype=torch.int64)
    mins, maxs = min_step.double().cpu(), max_step.double().cpu()
    sq, cnt = sumsq_step.double().cpu(), count_step.double().cpu()
    k = min(length, max_blocks)
    block = uniform_groups(length, k)  # step -> block
    bmin = _segment_reduce(mins, block, k, "amin", float("inf"))
    bmax = _segment_reduce(maxs, block, k, "amax", float("-inf"))
    bsq = _segment_reduce(sq, block, k, "sum", 0.0)
    bcnt = _segment_reduce(cnt, block, k, "sum", 0.0)
    levels = float(quant_max - quant_min)
    # cost[i, j]: proxy error of one group spanning blocks i..j (inf for j < i)
    cost = torch.full((k, k), float("inf"), dtype=torch.float64)
    for i in range(k):
        lo = torch.cummin(bmin[i:], 0).values.clamp(max=0.0)
        hi = torch.cummax(bmax[i:], 0).values.clamp(min=0.0)
        width = 2.0 * torch.maximum(-lo, hi) if symmetric else hi - lo
        d2 = (width / levels) ** 2 / 12.0  # noise power per value for a group ending at block j
        per = torch.minimum(bcnt[i:, None] * d2[None, :], bsq[i:, None])  # [block b, end j]
        cost[i, i:] = per.triu().sum(0)
    g = max(1, min(num_groups, k))
    dp = cost[0].clone()  # dp[j]: best cost of blocks 0..j in (level + 1) groups
    back = []
    for _ in range(1, g):
        cand = dp[:-1, None] + cost[1:, :]  # previous groups end at i-1, new group i..j
        best, arg = cand.min(0)
        dp = torch.cat([torch.full((1,), float("inf"), dtype=torch.float64), best[1:]])
        back.append(torch.cat([torch.zeros(1, dtype=torch.int64), arg[1:] + 1]))
    # backtrack group starts
    starts, j = [], k - 1
    for level in range(g - 1, 0, -1):
        i = int(back[level - 1][j])
        starts.append(i)
        j = i - 1
    starts = sorted(starts)
    block_group = torch.zeros(k, dtype=torch.int64)
    for s in starts:
        block_group[s:] += 1
    return block_group[block]
