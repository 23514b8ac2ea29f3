"""Vision Mamba (Vim) with the bidirectional "bimamba v2" mixer, written for torch.fx and torch.ao.

The model reproduces the released Vim checkpoints (middle class token, absolute position embedding,
RMSNorm, two scan directions averaged by ``/ 2``). It differs from the official code in layout only:

* every selective scan is a :class:`qmamba_ao.ssm.SelectiveScan` leaf module that owns ``A_log``,
  ``D`` and the step bias, so FX treats the recurrence as one opaque call and torch.ao can swap it;
  ``dt_proj`` therefore has no bias (its bias lives in the scan as ``delta_bias``);
* no fused kernels, no control flow on tensor values or shapes in ``forward`` (all sizes are fixed
  at construction), so ``torch.fx.symbolic_trace`` sees the whole network.

:func:`checkpoint_filter_fn` maps the official key names onto this layout. The model itself knows
nothing about quantization.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, lecun_normal_, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from qmamba_ao.ssm import SelectiveScan

from ._checkpoint import check_fit, checkpoint_tensors
from ._fmnist import FMNIST_MEAN, FMNIST_STD
from ._registry import ModelEntry, register_entrypoints
from .mixer import scan_inputs

__all__ = ["BiMambaMixer", "Block", "PatchEmbed", "VisionMamba", "checkpoint_filter_fn"]


# --------------------------------------------------------------------------------------------------
# Input check that survives FX tracing
# --------------------------------------------------------------------------------------------------


def _check_input_image(x: Tensor, in_chans: int, img_size: tuple[int, int]) -> Tensor:
    """Raise a ValueError for an image the position embedding was not built for; returns ``x``.

    Registered with ``torch.fx.wrap`` so traced graphs keep it as a call that runs at runtime
    (plain shape comparisons would be evaluated once, on proxies, during tracing).
    """
    if x.dim() != 4:
        raise ValueError(f"VisionMamba expects images of shape (batch, channels, H, W); got {tuple(x.shape)}")
    _, c, h, w = x.shape
    if (h, w) != tuple(img_size):
        raise ValueError(
            f"Input image size ({h}x{w}) does not match the model's position embedding, which was built "
            f"for {img_size[0]}x{img_size[1]}. Resize the input to {img_size[0]}x{img_size[1]} or build "
            f"the model for this size with timm.create_model(..., img_size=({h}, {w}))."
        )
    if c != in_chans:
        raise ValueError(
            f"Input has {c} channels but the model was built for {in_chans}; pass in_chans={c} to timm.create_model."
        )
    return x


torch.fx.wrap("_check_input_image")


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv patchifier whose stride may be smaller than the kernel (Vim "+" models use stride 8).

    The grid is ``(img - patch) // stride + 1`` per side, fixed at construction, so the token
    count (and the middle-token index derived from it) is a static int.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        stride: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.in_chans = in_chans
        if any(i < p for i, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        self.grid_size = tuple((i - p) // s + 1 for i, p, s in zip(self.img_size, self.patch_size, self.stride))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def forward(self, x: Tensor) -> Tensor:
        x = _check_input_image(x, self.in_chans, self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, M, D), row-major over the grid


class BiMambaMixer(nn.Module):
    """Mamba mixer with two scan directions ("bimamba v2"), input and output ``(B, L, D)``.

    ``in_proj`` gives ``x`` and the gate ``z``. The forward branch scans ``x`` as given; the backward
    branch has its own conv / projections / scan and runs on the time-reversed ``x`` *and* ``z``.
    The two outputs (the backward one flipped back) are averaged before ``out_proj``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        depth: int = 1,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        di, r, n = self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        # Forward direction.
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=False)  # its bias is scan.delta_bias
        self.scan = SelectiveScan(di, n)
        # Backward direction.
        self.conv1d_b = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
        self.act_b = nn.SiLU()
        self.x_proj_b = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj_b = nn.Linear(r, di, bias=False)
        self.scan_b = SelectiveScan(di, n)

        self.out_proj = nn.Linear(di, d_model, bias=False)
        self._init_weights(depth)

    @torch.no_grad()
    def _init_weights(self, depth: int) -> None:
        """Official initialisation of the parts that differ from PyTorch/SelectiveScan defaults."""
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        nn.init.uniform_(self.dt_proj_b.weight, -bound, bound)
        # The official model-level init zeroes every Linear bias it may touch; dt_proj_b's bias lacks
        # the "no re-init" flag, so the backward branch starts at softplus(0) = ln 2.
        self.scan_b.delta_bias.zero_()
        # GPT-2 style rescaling of the projection that feeds the residual stream.
        self.out_proj.weight.div_(math.sqrt(depth))

    def _branch(
        self,
        x: Tensor,
        z: Tensor,
        conv: nn.Conv1d,
        act: nn.Module,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        scan: SelectiveScan,
    ) -> Tensor:
        """One direction: causal depthwise conv, SiLU, data-dependent (dt, B, C), selective scan."""
        # Padding d_conv-1 on both sides then dropping the last d_conv-1 outputs keeps it causal;
        # a static slice avoids reading the sequence length from the tensor.
        u = act(conv(x)[..., : -(self.d_conv - 1)])  # (B, E, L)
        delta, b, c = scan_inputs(x_proj(u.transpose(1, 2)), dt_proj, self.dt_rank, self.d_state)
        return scan(u, delta, b, c, z)

    def forward(self, hidden: Tensor) -> Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2E, L)
        x, z = xz.chunk(2, dim=1)
        y_f = self._branch(x, z, self.conv1d, self.act, self.x_proj, self.dt_proj, self.scan)
        y_b = self._branch(
            x.flip(-1), z.flip(-1), self.conv1d_b, self.act_b, self.x_proj_b, self.dt_proj_b, self.scan_b
        )
        y = (y_f + y_b.flip(-1)) / 2
        return self.out_proj(y.transpose(1, 2))


class Block(nn.Module):
    """Pre-norm block on the two-stream state ``(hidden, residual)``.

    ``residual = residual + drop_path(hidden)`` (just ``hidden`` for the first block, signalled by
    ``residual=None`` at trace time), then ``hidden = mixer(norm(residual))``. Returning both keeps
    the official add-then-norm order, which puts the last add after the final block.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        depth: int = 1,
        norm_eps: float = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mixer = BiMambaMixer(dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, depth=depth)
        # Applies to the *incoming* hidden state (the previous block's mixer output), as upstream.
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden: Tensor, residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        return self.mixer(self.norm(residual)), residual


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class VisionMamba(nn.Module):
    """Vim: patch tokens with a class token in the middle, bidirectional Mamba blocks, RMSNorm.

    ``forward_features`` returns the normalised token sequence ``(B, M + 1, D)``; ``forward_head``
    takes the middle class token (``global_pool='token'``, what the released models use) or the
    token mean (``'avg'``) and applies the linear head.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        stride: Optional[int | tuple[int, int]] = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        norm_eps: float = 1e-5,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if d_conv < 2:
            raise ValueError(f"d_conv must be >= 2, got {d_conv}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.depth = depth
        self.num_prefix_tokens = 1

        self.patch_embed = PatchEmbed(
            img_size, patch_size, patch_size if stride is None else stride, in_chans, embed_dim
        )
        self.num_patches = self.patch_embed.num_patches
        self.num_tokens = self.num_patches + 1
        #: Index of the class token: inserted in the middle of the patch sequence.
        self.cls_index = self.num_patches // 2

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        # Hidden state produced by block j is dropped with rate dpr[j]; block i applies dpr[i - 1]
        # to its incoming hidden and the final add applies dpr[-1].
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)] if depth > 0 else []
        inter_dpr = [0.0] + dpr
        self.layers = nn.ModuleList(
            Block(embed_dim, d_state, d_conv, expand, dt_rank, depth, norm_eps, inter_dpr[i]) for i in range(depth)
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.norm_f = nn.RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # timm model interface ----------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # forward -----------------------------------------------------------------------------------

    def embed(self, x: Tensor) -> Tensor:
        """Patch tokens with the class token inserted at ``cls_index`` and ``pos_embed`` added."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, : self.cls_index], cls, x[:, self.cls_index :]], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        hidden = self.embed(x)
        residual: Optional[Tensor] = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        return self.norm_f(residual)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, self.cls_index] if self.global_pool == "token" else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------------
# Checkpoint conversion
# --------------------------------------------------------------------------------------------------

# Official per-block parameter names -> this layout (scan parameters live in the SelectiveScan leaf).
_KEY_RENAMES = (
    (re.compile(r"\.mixer\.A_log$"), ".mixer.scan.A_log"),
    (re.compile(r"\.mixer\.D$"), ".mixer.scan.D"),
    (re.compile(r"\.mixer\.dt_proj\.bias$"), ".mixer.scan.delta_bias"),
    (re.compile(r"\.mixer\.A_b_log$"), ".mixer.scan_b.A_log"),
    (re.compile(r"\.mixer\.D_b$"), ".mixer.scan_b.D"),
    (re.compile(r"\.mixer\.dt_proj_b\.bias$"), ".mixer.scan_b.delta_bias"),
)


def _rename_key(key: str) -> str:
    for pattern, repl in _KEY_RENAMES:
        new, count = pattern.subn(repl, key)
        if count:
            return new
    return key


def _resize_pos_embed(pos_embed: Tensor, model: VisionMamba) -> Tensor:
    """Resample a square patch grid to the model's grid, keeping the middle class token's entry."""
    n_old = pos_embed.shape[1] - 1
    side = math.isqrt(n_old)
    if side * side != n_old:
        raise ValueError(
            f"Cannot resize pos_embed with {pos_embed.shape[1]} tokens (not a square grid plus one class "
            f"token) to the model's {model.num_tokens}; build the model with the checkpoint's img_size."
        )
    mid_old = n_old // 2
    # Move the class token to the front, let timm resample the grid, then put it back in the middle.
    reordered = torch.cat([pos_embed[:, mid_old : mid_old + 1], pos_embed[:, :mid_old], pos_embed[:, mid_old + 1 :]], 1)
    resized = resample_abs_pos_embed(
        reordered, new_size=list(model.patch_embed.grid_size), old_size=[side, side], num_prefix_tokens=1
    )
    cls, grid = resized[:, :1], resized[:, 1:]
    return torch.cat([grid[:, : model.cls_index], cls, grid[:, model.cls_index :]], dim=1)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: VisionMamba) -> dict[str, Tensor]:
    """Convert an official Vim checkpoint (or a state dict of this model) for ``model``.

    Accepts a training checkpoint (``"model"``, else ``"model_ema"``) or a bare state dict, strips a
    DDP ``module.`` prefix, moves the scan parameters into the ``SelectiveScan`` leaves and, when the
    token count differs, resamples ``pos_embed`` around the middle class token. Raises ValueError
    listing missing / unexpected / mis-shaped keys, since a silent partial load would give a model
    that runs but is wrong.
    """
    out, _ = checkpoint_tensors(state_dict, lambda key, value: (_rename_key(key), value))

    target = model.state_dict()
    pos = out.get("pos_embed")
    if (
        pos is not None
        and "pos_embed" in target
        and pos.dim() == 3
        and pos.shape[1] != target["pos_embed"].shape[1]
        and pos.shape[2] == target["pos_embed"].shape[2]
    ):
        warnings.warn(
            f"Resampling pos_embed from {pos.shape[1]} to {target['pos_embed'].shape[1]} tokens to fit the model "
            f"(img_size={model.patch_embed.img_size}); results differ from the checkpoint's native resolution.",
            stacklevel=2,
        )
        out["pos_embed"] = _resize_pos_embed(pos, model)

    # A deliberately replaced classifier (num_classes differing from the pretrained config) is
    # dropped, as timm's load_pretrained would do, instead of being reported as a mismatch.
    check_fit(
        out,
        target,
        model,
        "Checkpoint does not match the VisionMamba model:",
        "head",
        lambda bad: _mismatch_hints(model),
    )
    return out


def _mismatch_hints(model: VisionMamba) -> list[str]:
    return [
        f"  model: embed_dim={model.embed_dim}, depth={model.depth}, num_classes={model.num_classes}, "
        f"img_size={model.patch_embed.img_size}, patch_size={model.patch_embed.patch_size}, "
        f"stride={model.patch_embed.stride}. Choose the model name matching the checkpoint "
        "(vim_tiny/small/base, *_stride8_* for the fine-tuned '+' weights) or pass matching "
        "depth=/embed_dim=/num_classes=/img_size= to timm.create_model."
    ]


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

#: Architecture of ``vim_fmnist``: the Vim-T block (bimamba v2, middle class token) at Fashion-MNIST
#: scale; 4x4 patches of 7x7 pixels plus the class token = 17 tokens, d_state 8. Both are set by the
#: one-CPU-hour training budget: 50 tokens (4x4-pixel patches) trained 3x slower per image and
#: reached 83.4 % in that hour, and d_state 16 costs 1.7x more per step than 8 on this CPU.
FMNIST_ARCH = dict(img_size=28, in_chans=1, patch_size=7, stride=7, embed_dim=96, depth=4, d_state=8, num_classes=10)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vim_tiny_patch16_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-tiny-midclstok", hf_hub_filename="vim_t_midclstok_76p1acc.pth"
        ),
        "vim_small_patch16_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-small-midclstok", hf_hub_filename="vim_s_midclstok_80p5acc.pth"
        ),
        "vim_base_patch16_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-base-midclstok", hf_hub_filename="vim_b_midclstok_81p9acc.pth"
        ),
        "vim_tiny_patch16_stride8_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-tiny-midclstok", hf_hub_filename="vim_t_midclstok_ft_78p3acc.pth"
        ),
        "vim_small_patch16_stride8_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-small-midclstok", hf_hub_filename="vim_s_midclstok_ft_81p6acc.pth"
        ),
        # Trained here on Fashion-MNIST by examples/train_fmnist.py; shipped inside the package.
        "vim_tiny_patch16_224.fmnist": _cfg(
            file=str(WEIGHTS_DIR / "vim_fmnist.pth"),
            num_classes=10,
            input_size=(1, 28, 28),
            crop_pct=1.0,
            mean=FMNIST_MEAN,
            std=FMNIST_STD,
            license="apache-2.0",
        ),
    }
)


def _build(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> VisionMamba:
    return build_model_with_cfg(
        VisionMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **dict(defaults, **kwargs)
    )


_TINY = dict(patch_size=16, embed_dim=192, depth=24)
_SMALL = dict(patch_size=16, embed_dim=384, depth=24)
_BASE = dict(patch_size=16, embed_dim=768, depth=24)

#: The released architectures, each built with its ``.in1k`` weights when pretrained.
_RELEASED = {
    "vim_tiny_patch16_224": ModelEntry(_TINY, "Vim-T (7.15M params), 14x14 patches."),
    "vim_small_patch16_224": ModelEntry(_SMALL, "Vim-S (25.8M params), 14x14 patches."),
    "vim_base_patch16_224": ModelEntry(_BASE, "Vim-B (97.6M params), 14x14 patches."),
    "vim_tiny_patch16_stride8_224": ModelEntry(
        dict(_TINY, stride=8), "Vim-T+ : 16x16 patches at stride 8, 27x27 grid (730 tokens)."
    ),
    "vim_small_patch16_stride8_224": ModelEntry(
        dict(_SMALL, stride=8), "Vim-S+ : 16x16 patches at stride 8, 27x27 grid (730 tokens)."
    ),
}

#: Official registry names (as in the Vim repository) -> the short name above they alias.
_OFFICIAL_NAMES = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_patch16_224",
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_patch16_224",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base_patch16_224",
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": (
        "vim_tiny_patch16_stride8_224"
    ),
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": (
        "vim_small_patch16_stride8_224"
    ),
}

register_entrypoints(
    globals(),
    _build,
    {
        **_RELEASED,
        **{
            name: ModelEntry(_RELEASED[short].arch, f"``{short}`` under the Vim repository's registry name.", short)
            for name, short in _OFFICIAL_NAMES.items()
        },
        "vim_fmnist": ModelEntry(
            FMNIST_ARCH,
            "Small Vim trained on Fashion-MNIST (the package's default model; weights ship with it).",
            "vim_tiny_patch16_224.fmnist",
        ),
    },
)
