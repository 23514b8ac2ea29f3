"""``qmamba_ao.api``: the library under the command, with errors as exceptions instead of exits."""

from __future__ import annotations

import pytest
import timm
import torch

import qmamba_ao
from qmamba_ao import api


def test_parse_bits():
    assert api.parse_bits("w8a8, W4A4,w4a8") == [(8, 8), (4, 4), (4, 8)]


@pytest.mark.parametrize("spec", ["w4x4", "w4a", "8", "", "w4a4,w8"])
def test_parse_bits_rejects_bad_specs(spec):
    with pytest.raises(api.QMambaError, match="bad bit width"):
        api.parse_bits(spec)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.json"

    def fail(path):
        path.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        api.atomic_write(target, fail)
    assert list(target.parent.iterdir()) == []

    target.write_text("old")
    with pytest.raises(RuntimeError):
        api.atomic_write(target, fail)
    assert target.read_text() == "old" and list(target.parent.iterdir()) == [target]

    api.atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new" and list(target.parent.iterdir()) == [target]


def test_build_model_names_the_registered_models():
    with pytest.raises(api.QMambaError, match="unknown model 'nope'.*vim_fmnist"):
        api.build_model("nope")
    assert "vim_fmnist" in api.model_names() and "vmamba_fmnist" in api.model_names()


def test_build_model_checkpoint_errors(tmp_path):
    with pytest.raises(api.QMambaError, match="not found"):
        api.build_model("vim_fmnist", tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {"no_such.weight": torch.zeros(1)}}, wrong)
    with pytest.raises(api.QMambaError, match="does not fit vim_fmnist"):
        api.build_model("vim_fmnist", wrong)


def test_build_model_loads_its_own_checkpoint(tmp_path):
    torch.manual_seed(0)
    random = timm.create_model("vim_fmnist", pretrained=False)
    path = tmp_path / "random.pth"
    torch.save({"model": random.state_dict()}, path)
    model = api.build_model("vim_fmnist", path)
    assert not model.training
    for key, value in random.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_resolve_recipes_fails_on_the_first_unknown_name():
    recipes = api.resolve_recipes("qmamba, minmax")
    assert [r.name for r in recipes] == ["qmamba", "minmax"]
    with pytest.raises(api.QMambaError, match="bogus"):
        api.resolve_recipes(["qmamba", "bogus"])


@pytest.mark.parametrize("recipe", ["qmamba", "quamba", "minmax"])
def test_save_and_load_quantized_is_exact(tmp_path, recipe):
    """A seeded random Vim: the rebuilt model starts from other (packaged) weights, so every value
    that matters must come from the saved state."""
    torch.manual_seed(0)
    model = timm.create_model("vim_fmnist", pretrained=False).eval()
    calib, images = torch.randn(8, 1, 28, 28), torch.randn(4, 1, 28, 28)
    q = qmamba_ao.quantize(model, [calib], recipe, 4, 4, progress=False)
    path = tmp_path / "q.pt"
    api.save_quantized(path, q, "vim_fmnist", recipe, 4, 4, {"h_feedback": False})
    loaded, record = api.load_quantized(path)
    assert (record["recipe"], record["w_bits"], record["a_bits"]) == (recipe, 4, 4)
    with torch.inference_mode():
        assert torch.equal(loaded(images), q(images))
    assert q.state_dict().keys() == loaded.state_dict().keys()


def test_load_quantized_errors(tmp_path):
    with pytest.raises(api.QMambaError, match="not found"):
        api.load_quantized(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(api.QMambaError, match="not a file written by"):
        api.load_quantized(other)
