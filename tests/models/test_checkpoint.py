"""The checkpoint pieces both model families share: reading the tensors, the fit check, its messages."""

from __future__ import annotations

import inspect
import warnings

import pytest
import timm
import torch
from torch import Tensor, nn

import qmamba_ao.models  # noqa: F401  (registers the timm names)
from qmamba_ao.models import vim, vmamba
from qmamba_ao.models._checkpoint import check_fit, checkpoint_tensors


def test_checkpoint_tensors_unwraps_strips_and_records_renames() -> None:
    w, b = torch.zeros(2, 3), torch.ones(2)
    ckpt = {"model": {"module.old.weight": w, "module.keep.bias": b}, "epoch": 3}
    out, origin = checkpoint_tensors(ckpt, lambda k, v: (k.replace("old.", "new."), v))
    assert list(out) == ["new.weight", "keep.bias"] and out["new.weight"] is w and out["keep.bias"] is b
    assert origin == {"new.weight": "old.weight (2, 3)"}
    out, origin = checkpoint_tensors({"a": w, "note": "text"}, lambda k, v: (k, v))
    assert list(out) == ["a"] and origin == {}


class _Net(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, classes)
        self.num_classes = classes
        self.pretrained_cfg = {"num_classes": 5}


def _fit(out: dict[str, Tensor], model: nn.Module, origin=None) -> None:
    seen = []
    check_fit(out, model.state_dict(), model, "Title:", "head", lambda bad: seen.append(bad) or ["  hint"], origin)
    assert not seen, "hints are only asked for when the check fails"


def test_check_fit_passes_a_fitting_state_dict_untouched() -> None:
    model = _Net(5)
    out = dict(model.state_dict())
    _fit(out, model)
    assert list(out) == list(model.state_dict())


def test_check_fit_lists_every_problem_then_the_hints() -> None:
    model = _Net(5)
    out = dict(model.state_dict())
    del out["body.bias"]
    out["extra"] = torch.zeros(1)
    out["body.weight"] = torch.zeros(4, 2)
    asked = []
    with pytest.raises(ValueError) as err:
        check_fit(
            out,
            model.state_dict(),
            model,
            "Title:",
            "head",
            lambda bad: asked.append(bad) or ["  hint"],
            {"body.weight": "old.w (4, 2)"},
        )
    assert asked == [["body.weight"]]
    assert str(err.value).splitlines() == [
        "Title:",
        "  missing keys: 1 (body.bias)",
        "  unexpected keys: 1 (extra)",
        "  shape mismatches: 1 (body.weight: checkpoint (4, 2) (from old.w (4, 2)) vs model (4, 3))",
        "  hint",
    ]


def test_check_fit_drops_a_replaced_head_and_warns_at_the_filters_caller() -> None:
    model = _Net(7)  # the pretrained config says 5 classes
    out = dict(_Net(5).state_dict())

    def checkpoint_filter(out: dict[str, Tensor]) -> None:  # stands for a family's checkpoint_filter_fn
        check_fit(out, model.state_dict(), model, "Title:", "head", lambda bad: [])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        checkpoint_filter(out)
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)] and "num_classes=7" in str(caught[0].message)
    assert "head.weight" not in out and "head.bias" not in out and "body.weight" in out


@pytest.mark.parametrize(
    ("module", "name", "small", "renamed", "new_key"),
    [
        (
            vim,
            "vim_tiny_patch16_224",
            dict(img_size=32, patch_size=8, depth=1, embed_dim=32),
            "layers.0.mixer.A_log",
            "layers.0.mixer.scan.A_log",
        ),
        (
            vmamba,
            "vmamba_tiny_s1l8",
            dict(dims=8, depths=[1, 1, 1, 1]),
            "layers.0.blocks.0.op.Ds",
            "layers.0.blocks.0.op.scan.D",
        ),
    ],
    ids=["vim", "vmamba"],
)
def test_family_filters_report_mismatches(module, name, small, renamed, new_key) -> None:
    """VMamba names where a mis-shaped converted key came from; Vim lists the key alone."""
    model = timm.create_model(name, **small, num_classes=3)
    sd = {k: v for k, v in model.state_dict().items() if k != new_key}
    sd[renamed] = torch.zeros(1, 1)
    with pytest.raises(ValueError) as err:
        module.checkpoint_filter_fn({"model": sd}, model)
    text = str(err.value)
    assert text.startswith(f"Checkpoint does not match the {type(model).__name__} model:")
    assert f"shape mismatches: 1 ({new_key}: checkpoint (1" in text and "Choose the model name" in text
    assert ("(from " in text) == (module is vmamba)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.pretrained_cfg = dict(model.pretrained_cfg, num_classes=4)
        out = module.checkpoint_filter_fn(timm.create_model(name, **small, num_classes=4).state_dict(), model)
    assert [w.filename for w in caught] == [__file__]
    assert not any(k.startswith(("head.", "classifier.head.")) for k in out)
