"""VMamba (VSSM) with the four-direction SS2D mixer, written for torch.fx and torch.ao.

The model reproduces the released VMamba classification checkpoints (the v2 family ``s1l8`` /
``s2l5`` / ``s2l15`` / ``s1l20`` with forward type ``v05_noz``, and the vanilla ``v0`` models).
It differs from the official code in layout only:

* the network is channel-last (``(B, H, W, C)``, LayerNorm on the last axis, ``nn.Linear`` for the
  projections). The official ``ln`` and ``ln2d`` layouts compute the same function from the same
  ``state_dict``; channel-last keeps every projection a real ``nn.Linear`` whose last axis is the
  channel axis, which is what torch.ao's Linear quantization and the smoothing / Hadamard
  rewrites of :mod:`qmamba_ao.rewrites` expect;
* the four directional scans of a block run as **one** :class:`qmamba_ao.ssm.SelectiveScan` leaf
  with ``dim = 4 * d_inner`` and ``B``/``C`` in four groups (one per direction), so every recipe
  and every scan site name applies as for Vim. The cross-scan lays each direction out in its own
  time order (the reversed directions are stored reversed), so step ``t`` of the scan is step
  ``t`` of every direction and temporal (per-step) quantizers group each direction correctly;
* the per-direction projections are grouped 1x1 ``nn.Conv1d`` modules (``x_proj``, ``dt_proj``),
  which is how the official v05 code computes them, so torch.ao quantizes them like any conv;
* no fused kernels and no Python control flow on tensor values in ``forward``; the odd-grid
  padding of the vanilla patch merging and the input check are ``torch.fx.wrap`` calls, so
  ``torch.fx.symbolic_trace`` sees the whole network and one traced graph serves every input size.

:func:`checkpoint_filter_fn` maps official key names (including the legacy ones the official
loader renames) and parameter shapes onto this layout. The model knows nothing about quantization.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._builder import resolve_pretrained_cfg
from torch import Tensor, nn

from qmamba_ao.ssm import SelectiveScan

from ._checkpoint import check_fit, checkpoint_tensors
from ._fmnist import FMNIST_MEAN, FMNIST_STD
from ._registry import ModelEntry, register_entrypoints

__all__ = [
    "SS2D",
    "VSSBlock",
    "PatchMerging2D",
    "VSSM",
    "checkpoint_filter_fn",
    "cross_scan",
    "cross_merge",
    "VMAMBA_FMNIST_ARCH",
]

#: Number of scan directions of SS2D (rows, columns, and both reversed).
DIRECTIONS = 4

# A spatial reduction step as (kernel, stride, total padding): out = (n + pad - kernel) // stride + 1.
Reduction = tuple[int, int, int]


# --------------------------------------------------------------------------------------------------
# Helpers that survive FX tracing
# --------------------------------------------------------------------------------------------------


def _reduce(n: int, step: Reduction) -> int:
    kernel, stride, pad = step
    return (n + pad - kernel) // stride + 1 if n + pad >= kernel else 0


def _check_input(
    x: Tensor, in_chans: int, steps: tuple[Reduction, ...], stem_steps: int, pos_grid: Optional[tuple[int, int]]
) -> Tensor:
    """Raise a ValueError for an input the official model cannot process either; returns ``x``.

    ``steps`` are the spatial reductions (the first ``stem_steps`` in the patch embedding, then one
    per downsample); ``pos_grid`` is the position embedding's grid, if any. Wrapped with
    ``torch.fx.wrap`` so the check runs on every call of a traced graph, with the real sizes.
    """
    if x.dim() != 4:
        raise ValueError(f"VSSM expects images of shape (batch, channels, H, W); got {tuple(x.shape)}")
    _, c, h, w = x.shape
    if c != in_chans:
        raise ValueError(
            f"Input has {c} channels but the model was built for {in_chans}; pass in_chans={c} to timm.create_model."
        )
    sizes = [(h, w)]
    for step in steps:
        sizes.append((_reduce(sizes[-1][0], step), _reduce(sizes[-1][1], step)))
        if min(sizes[-1]) < 1:
            grids = " -> ".join(f"{a}x{b}" for a, b in sizes[:-1])
            raise ValueError(
                f"Input image {h}x{w} is too small for this model: its feature grids shrink as {grids} and the "
                f"next reduction (kernel {step[0]}, stride {step[1]}) has no output. Use a larger input."
            )
    if pos_grid is not None and sizes[stem_steps] != tuple(pos_grid):
        gh, gw = sizes[stem_steps]
        raise ValueError(
            f"Input image {h}x{w} gives a {gh}x{gw} patch grid, but the position embedding was built for "
            f"{pos_grid[0]}x{pos_grid[1]}; resize the input or build the model with imgsize=."
        )
    return x


def _merge_patches(x: Tensor) -> Tensor:
    """``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C)``; odd grids are zero-padded at the end first.

    Sub-grid order (even row, even col), (odd, even), (even, odd), (odd, odd), as the released
    vanilla checkpoints expect. Wrapped for FX: the padding depends on the input size.
    """
    h, w = x.shape[1], x.shape[2]
    if h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)


torch.fx.wrap("_check_input")
torch.fx.wrap("_merge_patches")


def cross_scan(x: Tensor) -> Tensor:
    """``(B, D, H, W) -> (B, 4*D, H*W)``: the four scan sequences, direction-major.

    k=0 row-major, k=1 column-major, k=2 / k=3 the same reversed. Each is stored in its own time
    order, so index ``t`` along the last axis is step ``t`` of every direction.
    """
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    fwd = torch.stack([rows, cols], dim=1)  # (B, 2, D, L)
    return torch.cat([fwd, fwd.flip(-1)], dim=1).flatten(1, 2)


def cross_merge(y: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`cross_scan` summed over directions: ``(B, 4*D, H*W) -> (B, D, H*W)`` row-major."""
    y = y.unflatten(1, (DIRECTIONS, -1))
    y = y[:, :2] + y[:, 2:].flip(-1)  # undo the reversal: (B, 2, D, L)
    cols = y[:, 1].unflatten(-1, (w, h)).transpose(-1, -2).flatten(-2)
    return y[:, 0] + cols


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module, so channel-first convs sit inside ``nn.Sequential`` stems."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def extra_repr(self) -> str:
        return f"dims={self.dims}"

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` on the last axis.

    The Linears see ``(B, H*W, C)`` token rows, like the mixer's projections, so per-token
    activation quantizers (token axis 1) get one entry per token rather than per image row.
    """

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        y = self.drop(self.fc2(self.drop(self.act(self.fc1(x.flatten(1, 2))))))
        return y.reshape_as(x)


class SS2D(nn.Module):
    """2D selective scan, input and output ``(B, H, W, C)``.

    ``in_proj`` maps to ``d_inner`` (plus a gate ``z`` when ``gate``, the vanilla ``v0`` form);
    a depthwise 3x3 conv and SiLU give the map that is cross-scanned in four directions. Each
    direction has its own ``(dt, B, C)`` projection, step projection and scan parameters; the four
    scans are one grouped :class:`SelectiveScan` call (no gate inside the scan). The four outputs
    are merged back to row-major, summed, normalised by ``out_norm``, optionally gated by
    ``silu(z)``, and projected back to ``C`` by ``out_proj``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: Union[int, str] = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        gate: bool = False,
        act_layer: type[nn.Module] = nn.SiLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_inner = di = int(ssm_ratio * d_model)
        self.d_state = n = d_state
        self.dt_rank = r = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.gate = gate
        k = DIRECTIONS

        self.in_proj = nn.Linear(d_model, 2 * di if gate else di, bias=False)
        self.act_z = act_layer() if gate else nn.Identity()
        if d_conv > 1:
            self.conv2d = nn.Conv2d(di, di, d_conv, padding=(d_conv - 1) // 2, groups=di, bias=conv_bias)
        else:
            self.conv2d = nn.Identity()
        self.act = act_layer()
        # One 1x1 projection per direction, as grouped convs over the direction-major channels.
        self.x_proj = nn.Conv1d(k * di, k * (r + 2 * n), 1, groups=k, bias=False)
        self.dt_proj = nn.Conv1d(k * r, k * di, 1, groups=k, bias=False)  # its bias is scan.delta_bias
        self.scan = SelectiveScan(k * di, n)
        self.out_norm = nn.LayerNorm(di)
        self.out_proj = nn.Linear(di, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Official step-projection init; ``x_proj`` keeps the default 1/sqrt(d_inner) bound."""
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, gate={self.gate}"

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1], x.shape[2]
        xz = self.in_proj(x.flatten(1, 2))  # (B, L, E) or (B, L, 2E)
        if self.gate:
            xs, z = xz.chunk(2, dim=-1)
            z = self.act_z(z)
        else:
            xs, z = xz, None
        u_map = self.act(self.conv2d(xs.transpose(1, 2).unflatten(-1, (h, w))))  # (B, E, H, W)
        u = cross_scan(u_map)  # (B, 4E, L)
        dbc = self.x_proj(u).unflatten(1, (DIRECTIONS, -1))  # (B, 4, R + 2N, L)
        dt, b, c = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=2)
        delta = self.dt_proj(dt.flatten(1, 2))  # (B, 4E, L), bias added inside the scan
        y = self.scan(u, delta, b.contiguous(), c.contiguous())
        y = self.out_norm(cross_merge(y, h, w).transpose(1, 2))  # (B, L, E)
        if self.gate:
            y = y * z
        return self.dropout(self.out_proj(y)).unflatten(1, (h, w))


class VSSBlock(nn.Module):
    """Pre-norm block: ``x + drop_path(SS2D(norm(x)))``, then ``x + drop_path(MLP(norm2(x)))`` if any."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        mlp_ratio: float = 4.0,
        mlp_act_layer: type[nn.Module] = nn.GELU,
        mlp_drop_rate: float = 0.0,
        **ssm_kwargs: Any,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, **ssm_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.has_mlp = mlp_ratio > 0
        if self.has_mlp:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp_act_layer, mlp_drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.has_mlp:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchMerging2D(nn.Module):
    """Vanilla downsample: 2x2 neighbours concatenated on channels, LayerNorm(4C), Linear 4C -> 2C."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(self.norm(_merge_patches(x)))


class ClassifierHead(nn.Module):
    """LayerNorm, global average pool over the grid, dropout, Linear (keys ``classifier.norm/head``)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.norm(x).mean(dim=(1, 2)))
        return x if pre_logits else self.head(x)


def _activation(name: Union[str, type[nn.Module]], what: str) -> type[nn.Module]:
    if not isinstance(name, str):
        return name
    table: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
    if name.lower() not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}")
    return table[name.lower()]


# Forward types whose maths is supported: kernel-backend variants of one computation.
_FORWARD_BASES = ("v0", "v01", "v02", "v03", "v04", "v05", "v2", "v3")


def _parse_forward_type(forward_type: str) -> bool:
    """Return whether the SS2D has a gate branch; reject forward types that change the maths."""
    base, _, suffix = forward_type.partition("_")
    if base in _FORWARD_BASES and suffix in ("", "noz") and not (base == "v0" and suffix):
        return suffix != "noz"
    raise ValueError(
        f"forward_type {forward_type!r} is not supported; supported: 'v0' and 'vXX' / 'vXX_noz' with vXX in "
        f"{list(_FORWARD_BASES[1:])} (the released checkpoints use 'v05_noz' and 'v0')"
    )


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class VSSM(nn.Module):
    """VMamba classifier: patch embedding, four stages of VSS blocks with downsampling, pooled head.

    Constructor arguments use the official names (``dims``, ``depths``, ``ssm_*``, ``mlp_*``,
    ``forward_type``, ``downsample_version``, ``patchembed_version``, ``posembed``, ``imgsize``),
    so a released yaml config maps one to one. ``norm_layer`` accepts ``'ln'`` and ``'ln2d'``: both
    give this (channel-last) network, which computes the same function.

    ``forward_features`` returns the last stage's map ``(B, H', W', C)``; ``forward_head`` applies
    the final LayerNorm, the average pool and the linear head.
    """

    def __init__(
        self,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 9, 2),
        dims: Union[int, Sequence[int]] = 96,
        ssm_d_state: int = 16,
        ssm_ratio: float = 2.0,
        ssm_dt_rank: Union[int, str] = "auto",
        ssm_act_layer: Union[str, type[nn.Module]] = "silu",
        ssm_conv: int = 3,
        ssm_conv_bias: bool = True,
        ssm_drop_rate: float = 0.0,
        ssm_init: str = "v0",
        forward_type: str = "v2",
        mlp_ratio: float = 4.0,
        mlp_act_layer: Union[str, type[nn.Module]] = "gelu",
        mlp_drop_rate: float = 0.0,
        gmlp: bool = False,
        drop_path_rate: float = 0.1,
        drop_rate: float = 0.0,
        patch_norm: bool = True,
        norm_layer: str = "ln",
        downsample_version: str = "v2",
        patchembed_version: str = "v1",
        posembed: bool = False,
        imgsize: int = 224,
        global_pool: str = "avg",
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if norm_layer not in ("ln", "ln2d"):
            raise ValueError(f"norm_layer must be 'ln' or 'ln2d' (same network); got {norm_layer!r}")
        if ssm_init != "v0" or gmlp:
            raise ValueError("only ssm_init='v0' and gmlp=False (every released VMamba model) are supported")
        if global_pool != "avg":
            raise ValueError(f"global_pool must be 'avg'; got {global_pool!r}")
        gate = _parse_forward_type(forward_type)
        depths = list(depths)
        dims = [int(dims * 2**i) for i in range(len(depths))] if isinstance(dims, int) else list(dims)
        if len(dims) != len(depths) or not depths:
            raise ValueError(f"dims ({dims}) and depths ({depths}) must have the same non-zero length")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.dims = dims
        self.depths = depths
        self.forward_type = forward_type
        self.num_features = self.head_hidden_size = dims[-1]
        ssm_act = _activation(ssm_act_layer, "ssm_act_layer")
        mlp_act = _activation(mlp_act_layer, "mlp_act_layer")

        self.patch_embed, stem_steps = self._make_patch_embed(
            patchembed_version, in_chans, dims[0], patch_size, patch_norm
        )
        self.pos_grid: Optional[tuple[int, int]] = None
        if posembed:
            side = imgsize // patch_size
            self.pos_grid = (side, side)
            self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], side, side))
        else:
            self.pos_embed = None

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        steps = list(stem_steps)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            blocks = nn.Sequential(
                *(
                    VSSBlock(
                        dims[i],
                        drop_path=dpr[sum(depths[:i]) + j],
                        mlp_ratio=mlp_ratio,
                        mlp_act_layer=mlp_act,
                        mlp_drop_rate=mlp_drop_rate,
                        d_state=ssm_d_state,
                        ssm_ratio=ssm_ratio,
                        dt_rank=ssm_dt_rank,
                        d_conv=ssm_conv,
                        conv_bias=ssm_conv_bias,
                        gate=gate,
                        act_layer=ssm_act,
                        dropout=ssm_drop_rate,
                    )
                    for j in range(depth)
                )
            )
            if i < len(depths) - 1:
                downsample, step = self._make_downsample(downsample_version, dims[i], dims[i + 1])
                steps.append(step)
            else:
                downsample = nn.Identity()
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=downsample)))
        self.reductions: tuple[Reduction, ...] = tuple(steps)
        self.stem_steps = len(stem_steps)
        self.classifier = ClassifierHead(dims[-1], num_classes, drop_rate)
        self._init_weights()

    @staticmethod
    def _make_patch_embed(
        version: str, in_chans: int, dim: int, patch_size: int, patch_norm: bool
    ) -> tuple[nn.Sequential, list[Reduction]]:
        """v1: one patch_size conv; v2: two overlapping stride-(patch_size/2) convs (keys 0, 2, 5, 7)."""
        norm = (lambda d: nn.LayerNorm(d)) if patch_norm else (lambda d: nn.Identity())
        if version == "v1":
            stem = nn.Sequential(
                nn.Conv2d(in_chans, dim, patch_size, stride=patch_size), Permute(0, 2, 3, 1), norm(dim)
            )
            return stem, [(patch_size, patch_size, 0)]
        if version == "v2":
            stride = patch_size // 2
            kernel = stride + 1
            stem = nn.Sequential(
                nn.Conv2d(in_chans, dim // 2, kernel, stride=stride, padding=1),
                Permute(0, 2, 3, 1),
                norm(dim // 2),
                Permute(0, 3, 1, 2),
                nn.GELU(),
                nn.Conv2d(dim // 2, dim, kernel, stride=stride, padding=1),
                Permute(0, 2, 3, 1),
                norm(dim),
            )
            return stem, [(kernel, stride, 2)] * 2
        raise ValueError(f"patchembed_version must be 'v1' or 'v2'; got {version!r}")

    @staticmethod
    def _make_downsample(version: str, dim: int, out_dim: int) -> tuple[nn.Module, Reduction]:
        """v1: patch merging (pads odd grids); v2: 2x2 stride-2 conv; v3: 3x3 stride-2 conv, pad 1."""
        if version == "v1":
            return PatchMerging2D(dim, out_dim), (2, 2, 1)
        if version in ("v2", "v3"):
            kernel, pad = (2, 0) if version == "v2" else (3, 1)
            conv = nn.Conv2d(dim, out_dim, kernel, stride=2, padding=pad)
            return nn.Sequential(Permute(0, 3, 1, 2), conv, Permute(0, 2, 3, 1), nn.LayerNorm(out_dim)), (
                kernel,
                2,
                2 * pad,
            )
        raise ValueError(f"downsample_version must be 'v1', 'v2' or 'v3'; got {version!r}")

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Official init: every Linear trunc-normal(0.02) with zero bias, LayerNorms 1 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)

    # timm model interface ----------------------------------------------------------------------

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: Union[str, Path]) -> None:
        """timm's ``custom_load`` hook: read a checkpoint file through :func:`checkpoint_filter_fn`.

        timm's generic loader would take ``"model_ema"`` over ``"model"``; the official evaluation
        reads ``"model"``, and so does the filter. Only tensors are unpickled (``weights_only``).
        """
        try:
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{checkpoint_path} stores more than tensors (e.g. a training config object), which "
                "torch.load(weights_only=True) refuses. If you trust the file, save its weights alone: "
                "torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth')."
            ) from e
        # The filter raises on anything but a classifier dropped on purpose (num_classes changed).
        self.load_state_dict(checkpoint_filter_fn(checkpoint, self), strict=False)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if self.pos_embed is not None else set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool != "avg":
            raise ValueError(f"global_pool must be 'avg'; got {global_pool!r}")
        self.num_classes = num_classes
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # forward -----------------------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(_check_input(x, self.in_chans, self.reductions, self.stem_steps, self.pos_grid))
        if self.pos_embed is not None:
            x = x + self.pos_embed.permute(0, 2, 3, 1)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.classifier(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------------
# Checkpoint conversion
# --------------------------------------------------------------------------------------------------

# Legacy prefixes the official loader renames (matched on whole dotted components).
_LEGACY_PREFIXES = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+)\.ln_1\."), r"\1.norm."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+)\.self_attention\."), r"\1.op."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
)

# Official SS2D parameters -> (name here, how the official tensor is reshaped).
_SS2D_PARAMS: dict[str, tuple[str, Any]] = {
    "x_proj_weight": ("x_proj.weight", lambda t: t.reshape(-1, t.shape[-1], 1)),  # (K, R+2N, E) -> (K(R+2N), E, 1)
    "dt_projs_weight": ("dt_proj.weight", lambda t: t.reshape(-1, t.shape[-1], 1)),  # (K, E, R) -> (KE, R, 1)
    "dt_projs_bias": ("scan.delta_bias", lambda t: t.reshape(-1)),  # (K, E) -> (KE,)
    "A_logs": ("scan.A_log", lambda t: t),
    "Ds": ("scan.D", lambda t: t),
}
_SS2D_KEY = re.compile(r"^(layers\.\d+\.blocks\.\d+\.op)\.(" + "|".join(_SS2D_PARAMS) + r")$")


def _convert_key(key: str, value: Tensor) -> tuple[str, Tensor]:
    for pattern, repl in _LEGACY_PREFIXES:
        key, count = pattern.subn(repl, key)
        if count:
            break
    m = _SS2D_KEY.match(key)
    if m:
        name, reshape = _SS2D_PARAMS[m.group(2)]
        return f"{m.group(1)}.{name}", reshape(value)
    return key, value


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: VSSM) -> dict[str, Tensor]:
    """Convert an official VMamba checkpoint (or a state dict of this model) for ``model``.

    Accepts a training checkpoint (``"model"``, else ``"model_ema"``) or a bare state dict, strips a
    DDP ``module.`` prefix, applies the official loader's legacy renames (``patch_embed.proj/norm``,
    ``ln_1``, ``self_attention``, top-level ``norm`` / ``head``), moves the SS2D parameters into
    the grouped projections and the ``SelectiveScan`` leaf, and resamples a stored ``pos_embed`` to
    the model's grid. Raises ValueError listing missing / unexpected / mis-shaped keys: a partial or
    reshaped load would give a model that runs but is wrong.
    """
    out, origin = checkpoint_tensors(state_dict, _convert_key)

    target = model.state_dict()
    pos = out.get("pos_embed")
    if pos is not None and "pos_embed" in target and pos.dim() == 4 and pos.shape[1] == target["pos_embed"].shape[1]:
        if pos.shape != target["pos_embed"].shape:
            warnings.warn(
                f"Resampling pos_embed from {tuple(pos.shape[2:])} to {tuple(target['pos_embed'].shape[2:])} "
                "(bicubic) to fit the model's imgsize.",
                stacklevel=2,
            )
            out["pos_embed"] = F.interpolate(
                pos, size=tuple(target["pos_embed"].shape[2:]), mode="bicubic", align_corners=False
            )

    # A deliberately replaced classifier (num_classes differing from the pretrained config) is
    # dropped, as timm's load_pretrained would do, instead of being reported as a mismatch.
    title = "Checkpoint does not match the VSSM model:"
    check_fit(
        out, target, model, title, "classifier.head", lambda bad: _mismatch_hints(model, out, target, bad), origin
    )
    return out


def _mismatch_hints(model: VSSM, out: dict[str, Tensor], target: dict[str, Tensor], bad: list[str]) -> list[str]:
    lines = []
    conv_like = [k for k in bad if out[k].dim() == 4 and out[k].shape[2:] == (1, 1) and target[k].dim() == 2]
    if conv_like:
        lines.append(
            f"  {len(conv_like)} weight(s) are stored as 1x1 convolutions (out, in, 1, 1), a channel-first "
            "layout's export; this model stores Linear weights as (out, in): reshape them with "
            "w.flatten(1) before loading."
        )
    lines.append(
        f"  model: dims={model.dims}, depths={model.depths}, forward_type={model.forward_type!r}, "
        f"num_classes={model.num_classes}. Choose the model name matching the checkpoint "
        "(vmamba_{tiny,small,base}_{s1l8,s1l20,s2l5,s2l15}, vanilla_vmamba_*) or pass matching "
        "dims=/depths=/num_classes= to timm.create_model."
    )
    return lines


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
#: Where the shipped Fashion-MNIST weights of ``vmamba_fmnist`` live.
FMNIST_WEIGHTS = WEIGHTS_DIR / "vmamba_fmnist.pth"

# Released configurations (classification/configs/vssm/*.yaml); everything not listed is the default.
_V2 = dict(
    ssm_d_state=1,
    ssm_dt_rank="auto",
    ssm_conv=3,
    ssm_conv_bias=False,
    forward_type="v05_noz",
    mlp_ratio=4.0,
    downsample_version="v3",
    patchembed_version="v2",
    norm_layer="ln2d",
)
_V0 = dict(
    ssm_d_state=16,
    ssm_ratio=2.0,
    ssm_conv=3,
    ssm_conv_bias=True,
    forward_type="v0",
    mlp_ratio=0.0,
    downsample_version="v1",
    patchembed_version="v1",
    norm_layer="ln",
)

#: Architecture of ``vmamba_fmnist``: the VMamba-T s1l8 block (v05_noz, d_state 1, ssm_ratio 1) at
#: Fashion-MNIST scale; 28x28 -> 7x7 -> 4x4 -> 2x2 grids over three stages.
VMAMBA_FMNIST_ARCH: dict[str, Any] = dict(
    _V2, ssm_ratio=1.0, in_chans=1, num_classes=10, dims=32, depths=(1, 2, 1), drop_path_rate=0.0
)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.0",
        "classifier": "classifier.head",
        "license": "mit",
        "custom_load": True,  # VSSM.load_pretrained: prefers "model" over "model_ema", as the official code
        **kwargs,
    }


#: The released architectures; none registers a download location for its ``.in1k`` weights.
_RELEASED = {
    "vmamba_tiny_s1l8": ModelEntry(
        dict(_V2, ssm_ratio=1.0, dims=96, depths=(2, 2, 8, 2)),
        "VMamba-T s1l8 (30.2M params, the tiny of the VMamba README).",
    ),
    "vmamba_small_s1l20": ModelEntry(
        dict(_V2, ssm_ratio=1.0, dims=96, depths=(2, 2, 20, 2)), "VMamba-S s1l20 (49.0M params)."
    ),
    "vmamba_base_s1l20": ModelEntry(
        dict(_V2, ssm_ratio=1.0, dims=128, depths=(2, 2, 20, 2)), "VMamba-B s1l20 (86.6M params)."
    ),
    "vmamba_tiny_s2l5": ModelEntry(
        dict(_V2, ssm_ratio=2.0, dims=96, depths=(2, 2, 5, 2)), "VMamba-T s2l5 (30.7M params)."
    ),
    "vmamba_small_s2l15": ModelEntry(
        dict(_V2, ssm_ratio=2.0, dims=96, depths=(2, 2, 15, 2)), "VMamba-S s2l15 (50.2M params)."
    ),
    "vmamba_base_s2l15": ModelEntry(
        dict(_V2, ssm_ratio=2.0, dims=128, depths=(2, 2, 15, 2)), "VMamba-B s2l15 (88.6M params)."
    ),
    "vanilla_vmamba_tiny": ModelEntry(
        dict(_V0, dims=96, depths=(2, 2, 9, 2)),
        "Vanilla-VMamba-T (22.9M params, forward type v0, patch merging, no MLP).",
    ),
    "vanilla_vmamba_small": ModelEntry(dict(_V0, dims=96, depths=(2, 2, 27, 2)), "Vanilla-VMamba-S (44.4M params)."),
    "vanilla_vmamba_base": ModelEntry(dict(_V0, dims=128, depths=(2, 2, 27, 2)), "Vanilla-VMamba-B (76.3M params)."),
}

default_cfgs = generate_default_cfgs(
    {
        # No download location is registered for the ImageNet weights: load an official checkpoint
        # with pretrained_cfg_overlay=dict(file=...) (or checkpoint_filter_fn + load_state_dict).
        **{f"{name}.in1k": _cfg() for name in _RELEASED},
        # Trained on Fashion-MNIST; shipped inside the package.
        "vmamba_tiny_s1l8.fmnist": _cfg(
            file=str(FMNIST_WEIGHTS),
            num_classes=10,
            input_size=(1, 28, 28),
            pool_size=(2, 2),
            crop_pct=1.0,
            mean=FMNIST_MEAN,
            std=FMNIST_STD,
            license="apache-2.0",
        ),
    }
)


def _check_pretrained_source(variant: str, kwargs: dict[str, Any]) -> None:
    """Fail clearly where timm would fall back to random weights or a bare FileNotFoundError."""
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    ).to_dict()
    if cfg.get("state_dict") is not None:
        return
    file = cfg.get("file")
    if file:
        if not Path(file).is_file():
            raise FileNotFoundError(
                f"Pretrained weights for {variant!r} are not installed: {file} does not exist. Use "
                "pretrained=False, or point pretrained_cfg_overlay=dict(file=...) at a checkpoint."
            )
        return
    if not (cfg.get("url") or cfg.get("hf_hub_id")):
        raise ValueError(
            f"No download location is registered for {variant!r}. Download the official checkpoint and pass "
            "pretrained_cfg_overlay=dict(file='<path>.pth'), or load it with checkpoint_filter_fn."
        )


def _build(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> VSSM:
    if "." not in variant and not kwargs.get("pretrained_cfg"):
        # timm makes the first tag with weights the default, which would be the Fashion-MNIST one
        # (1 channel, 10 classes); the architectures' own default is the ImageNet configuration.
        kwargs = dict(kwargs, pretrained_cfg="in1k")
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    source = overlay.get("file") or overlay.get("url")
    if source and "custom_load" not in overlay and not str(source).endswith(".safetensors"):
        # timm resets custom_load when an overlay names a weight source; keep VSSM.load_pretrained.
        kwargs = dict(kwargs, pretrained_cfg_overlay=dict(overlay, custom_load=True))
    if pretrained:
        _check_pretrained_source(variant, kwargs)
    return build_model_with_cfg(
        VSSM, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **dict(defaults, **kwargs)
    )


register_entrypoints(
    globals(),
    _build,
    {
        **_RELEASED,
        "vmamba_fmnist": ModelEntry(
            VMAMBA_FMNIST_ARCH,
            "Small VMamba (s1l8 block) trained on Fashion-MNIST; its weights ship with the package.",
            "vmamba_tiny_s1l8.fmnist",
        ),
    },
)
