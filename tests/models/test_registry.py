"""timm registration of both model families: names, entry points, official aliases, pretrained tags."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg, model_entrypoint

import qmamba_ao.models  # noqa: F401  (registers the timm names)
from qmamba_ao.models import vim, vmamba

VIM_SHORT = [
    "vim_tiny_patch16_224",
    "vim_small_patch16_224",
    "vim_base_patch16_224",
    "vim_tiny_patch16_stride8_224",
    "vim_small_patch16_stride8_224",
]
#: The Vim repository's registry names and the short names they stand for.
VIM_OFFICIAL = {
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
VMAMBA_RELEASED = [
    "vmamba_tiny_s1l8",
    "vmamba_small_s1l20",
    "vmamba_base_s1l20",
    "vmamba_tiny_s2l5",
    "vmamba_small_s2l15",
    "vmamba_base_s2l15",
    "vanilla_vmamba_tiny",
    "vanilla_vmamba_small",
    "vanilla_vmamba_base",
]
FAMILIES = {
    vim: [*VIM_SHORT, *VIM_OFFICIAL, "vim_fmnist"],
    vmamba: [*VMAMBA_RELEASED, "vmamba_fmnist"],
}


def test_registered_names_are_exactly_the_families() -> None:
    assert sorted(timm.list_models("vim*")) == sorted(FAMILIES[vim])
    assert sorted(timm.list_models("*vmamba*")) == sorted(FAMILIES[vmamba])


@pytest.mark.parametrize("module", list(FAMILIES), ids=lambda m: m.__name__)
def test_entry_points_live_in_their_module(module) -> None:
    """As ``@register_model`` on a ``def`` there: bound by name, listed in ``__all__``, documented."""
    for name in FAMILIES[module]:
        fn = getattr(module, name)
        assert model_entrypoint(name) is fn
        assert (fn.__name__, fn.__qualname__, fn.__module__) == (name, name, module.__name__)
        assert name in module.__all__ and fn.__doc__


@pytest.mark.parametrize(("official", "short"), VIM_OFFICIAL.items())
def test_official_vim_names_build_their_short_names(official: str, short: str) -> None:
    models = []
    for name in (official, short):
        torch.manual_seed(0)
        models.append(timm.create_model(name, depth=1))
    a, b = models
    assert a.pretrained_cfg == b.pretrained_cfg and a.pretrained_cfg["architecture"] == short
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_tags() -> None:
    with_weights = timm.list_models("vim*", pretrained=True) + timm.list_models("*vmamba*", pretrained=True)
    assert sorted(with_weights) == sorted(
        [f"{name}.in1k" for name in VIM_SHORT] + ["vim_tiny_patch16_224.fmnist", "vmamba_tiny_s1l8.fmnist"]
    )
    for name in VIM_SHORT:
        cfg = get_pretrained_cfg(name)
        assert cfg.tag == "in1k" and cfg.hf_hub_id.startswith("hustvl/Vim-") and cfg.num_classes == 1000
    for name in VMAMBA_RELEASED:
        cfg = get_pretrained_cfg(f"{name}.in1k")
        assert not cfg.has_weights and cfg.custom_load and cfg.num_classes == 1000
    for name in ("vim_tiny_patch16_224.fmnist", "vmamba_tiny_s1l8.fmnist"):
        cfg = get_pretrained_cfg(name)
        assert Path(cfg.file).is_file() and cfg.num_classes == 10 and cfg.input_size == (1, 28, 28)


@pytest.mark.parametrize(
    ("name", "architecture", "tag"),
    [
        ("vim_fmnist", "vim_tiny_patch16_224", "fmnist"),
        ("vmamba_fmnist", "vmamba_tiny_s1l8", "fmnist"),
        ("vim_small_patch16_224", "vim_small_patch16_224", "in1k"),
        ("vanilla_vmamba_tiny", "vanilla_vmamba_tiny", "in1k"),
    ],
)
def test_each_entry_point_builds_with_its_pretrained_config(name: str, architecture: str, tag: str) -> None:
    small = dict(depth=1) if name.startswith("vim") else dict(dims=8)
    model = timm.create_model(name, **small)
    assert (model.pretrained_cfg["architecture"], model.pretrained_cfg["tag"]) == (architecture, tag)


def test_fmnist_entry_points_use_their_architectures() -> None:
    v = timm.create_model("vim_fmnist")
    assert (v.embed_dim, v.depth, v.num_classes, v.patch_embed.img_size) == (96, 4, 10, (28, 28))
    s = timm.create_model("vmamba_fmnist")
    assert (s.dims, s.num_classes) == ([32, 64, 128], 10)
