"""``qmamba_ao.api``: the library under the command, with errors as exceptions instead of exits."""

from __future__ import annotations

import argparse
import os
import stat

import pytest
import timm
import torch

import qmamba_ao
from qmamba_ao import api


def test_parse_bits():
    assert api.parse_bits("w8a8, W4A4,w4a8") == [(8, 8), (4, 4), (4, 8)]


@pytest.mark.parametrize("spec", ["w4x4", "w4a", "8", "", "w4a4,w8", "w9a9", "w4a1", "w0a8", "w8a8,w16a16"])
def test_parse_bits_rejects_bad_specs(spec):
    with pytest.raises(api.QMambaError, match="bad bit width"):
        api.parse_bits(spec)


def test_parse_bits_names_the_accepted_range():
    with pytest.raises(api.QMambaError, match=r"must be in 2\.\.8"):
        api.parse_bits("w8a8,w9a9")


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.json"

    def fail(path):
        path.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        api.atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []  # nor the folder it would have created
    target.parent.mkdir()

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


def _interrupt(path):
    path.write_text("half")
    raise KeyboardInterrupt


def test_atomic_write_cleans_up_after_an_interrupt(tmp_path):
    target = tmp_path / "a" / "b" / "out.pt"
    with pytest.raises(KeyboardInterrupt):
        api.atomic_write(target, _interrupt)
    assert list(tmp_path.iterdir()) == []
    target.parent.mkdir(parents=True)
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        api.atomic_write(target, _interrupt)
    assert target.read_text() == "old" and list(target.parent.iterdir()) == [target]


def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    target.chmod(0o640)
    api.atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    fresh = tmp_path / "fresh.json"
    umask = os.umask(0o022)
    try:
        api.atomic_write(fresh, lambda p: p.write_text("x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # what open() gives a new file under that umask


def test_atomic_write_turns_os_errors_into_a_message_naming_the_file(tmp_path):
    def full(path):
        raise OSError(28, "No space left on device")

    with pytest.raises(api.QMambaError, match="out.pt: writing failed .No space left on device"):
        api.atomic_write(tmp_path / "out.pt", full)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_check_output_refuses_devices(device):
    with pytest.raises(api.QMambaError, match=f"{device} is a character device; outputs are written only to regular"):
        api.check_output(device)
    before = os.stat(device)
    with pytest.raises(api.QMambaError):
        api.atomic_write(device, lambda p: p.write_text("x"))
    assert stat.S_ISCHR(os.stat(device).st_mode) and os.stat(device).st_rdev == before.st_rdev


def test_check_output_refuses_fifos(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(api.QMambaError, match="is a FIFO"):
        api.atomic_write(fifo, lambda p: p.write_text("x"))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_check_output_refuses_symlinks_and_leaves_their_target(tmp_path):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("precious")
    link = tmp_path / "out" / "link.json"
    link.parent.mkdir()
    link.symlink_to(outside)
    with pytest.raises(api.QMambaError, match="symbolic link.*could replace a file outside the output path"):
        api.atomic_write(link, lambda p: p.write_text("x"))
    assert link.is_symlink() and outside.read_text() == "precious"
    assert sorted(p.name for p in link.parent.iterdir()) == ["link.json"]
    folder_link = tmp_path / "dirlink"
    folder_link.symlink_to(tmp_path / "out")
    with pytest.raises(api.QMambaError, match="symbolic link"):
        api.check_output(folder_link, "folder")


def test_check_output_wants_a_file_or_a_folder(tmp_path):
    with pytest.raises(api.QMambaError, match="is a folder; give a file name"):
        api.check_output(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(api.QMambaError, match="is not a regular file|not a folder"):
        api.check_output(tmp_path / "f", "folder")
    with pytest.raises(api.QMambaError, match="not a folder|Not a directory"):
        api.check_output(tmp_path / "f" / "sub" / "out.pt")
    assert api.check_output(tmp_path / "new" / "deeper" / "out.pt").name == "out.pt"
    assert api.check_output(tmp_path / "new" / "folder", "folder").name == "folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # checking writes nothing


def test_check_output_refuses_folders_that_take_no_files(tmp_path):
    with pytest.raises(api.QMambaError, match="cannot create files in /proc"):
        api.check_output("/proc/out.pt")
    with pytest.raises(api.QMambaError, match="cannot create files in /proc"):
        api.check_output("/proc/analysis", "folder")


def test_check_output_refuses_a_read_only_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the /proc test covers an unwritable folder for root")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(api.QMambaError, match="cannot create files in"):
            api.check_output(folder / "out.pt")
    finally:
        folder.chmod(0o700)


# -- quantized files: safe loading, checksum, older files --------------------------------------------------


@pytest.fixture(scope="module")
def quantized():
    """A seeded random vim_fmnist quantized with minmax W4A4, and images to compare outputs on."""
    torch.manual_seed(0)
    model = timm.create_model("vim_fmnist", pretrained=False).eval()
    q = qmamba_ao.quantize(model, [torch.randn(8, 1, 28, 28)], "minmax", 4, 4, progress=False)
    return q, torch.randn(4, 1, 28, 28)


def _old_record(q) -> dict:
    """A record as files saved before checksums hold it."""
    return {
        "model": "vim_fmnist",
        "checkpoint": "relative/ck.pth",
        "recipe": "minmax",
        "w_bits": 4,
        "a_bits": 4,
        "options": {"h_feedback": False},
        "reference": True,
        # older versions kept the LtSQ kinds out of the state dict
        "state_dict": {k: v for k, v in q.state_dict().items() if not k.endswith(".kind_id")},
    }


def test_saved_file_has_a_verified_checksum_and_needs_no_checkpoint(tmp_path, quantized):
    q, images = quantized
    path = tmp_path / "q.pt"
    api.save_quantized(path, q, "vim_fmnist", "minmax", 4, 4, {"h_feedback": False}, checkpoint="gone/ck.pth")
    loaded, record = api.load_quantized(path)
    assert record["format"] == api.QUANTIZED_FORMAT and len(record["sha256"]) == 64
    assert record["integrity"] == "sha256 verified" and record["checkpoint"] == "gone/ck.pth"
    with torch.inference_mode():
        assert torch.equal(loaded(images), q(images))


def test_corrupted_bytes_are_detected(tmp_path, quantized):
    q, _ = quantized
    path = tmp_path / "q.pt"
    api.save_quantized(path, q, "vim_fmnist", "minmax", 4, 4)
    blob = bytearray(path.read_bytes())
    middle = len(blob) // 2
    blob[middle : middle + 16] = b"\x7f" * 16  # inside some tensor's storage
    path.write_bytes(bytes(blob))
    with pytest.raises(api.QMambaError, match="damaged: its contents do not match the SHA-256"):
        api.load_quantized(path)


def test_checksum_covers_the_fields(tmp_path, quantized):
    q, _ = quantized
    path = tmp_path / "q.pt"
    api.save_quantized(path, q, "vim_fmnist", "minmax", 4, 4)
    record = torch.load(path, weights_only=True)
    record["a_bits"] = 8
    torch.save(record, path)
    with pytest.raises(api.QMambaError, match="SHA-256"):
        api.load_quantized(path)


def test_files_saved_before_checksums_still_load(tmp_path, quantized):
    q, images = quantized
    path = tmp_path / "old.pt"
    torch.save(_old_record(q), path)
    loaded, record = api.load_quantized(path)
    assert record["integrity"].startswith("no checksum")
    with torch.inference_mode():
        assert torch.equal(loaded(images), q(images))


def test_files_saved_before_checksums_are_checked_for_non_finite_values(tmp_path, quantized):
    q, _ = quantized
    record = _old_record(q)
    key = next(k for k, v in record["state_dict"].items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    record["state_dict"][key] = torch.full_like(record["state_dict"][key], float("nan"))
    torch.save(record, tmp_path / "old.pt")
    with pytest.raises(api.QMambaError, match=f"damaged: non-finite or unexpected values in {key}"):
        api.load_quantized(tmp_path / "old.pt")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("recipe"), "lacks recipe"),
        (lambda r: r.update(w_bits="4"), "its w_bits is a str"),
        (lambda r: r.update(w_bits=12), "w_bits=12 is outside 2..8"),
        (lambda r: r.update(model="resnet50"), "which this qmamba-ao does not register"),
        (lambda r: r.update(format=9), "format 9, newer than this qmamba-ao reads"),
        (lambda r: r.update(format=2), "has no checksum"),
    ],
)
def test_records_with_wrong_fields_are_refused(tmp_path, quantized, change, message):
    record = _old_record(quantized[0])
    change(record)
    torch.save(record, tmp_path / "q.pt")
    with pytest.raises(api.QMambaError, match=message):
        api.load_quantized(tmp_path / "q.pt")


class _RunsCode:
    """Unpickling this creates a folder: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("loader", ["quantized", "checkpoint"])
def test_crafted_pickles_run_no_code(tmp_path, loader):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "state_dict": {}, "recipe": _RunsCode(marker)}, path)
    with pytest.raises(api.QMambaError, match=r"evil.pt is not .*: it holds posix.mkdir; only tensors and plain"):
        if loader == "quantized":
            api.load_quantized(path)
        else:
            api.build_model("vim_fmnist", path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"hello, not a checkpoint\n", "is damaged"),
        ("half", "is damaged .truncated or overwritten.: PytorchStreamReader failed"),
    ],
)
@pytest.mark.parametrize("loader", ["quantized", "checkpoint"])
def test_broken_files_give_one_clear_error(tmp_path, quantized, content, message, loader):
    path = tmp_path / "broken.pt"
    if content == "half":
        torch.save(_old_record(quantized[0]), path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(api.QMambaError, match=message) as e:
        api.load_quantized(path) if loader == "quantized" else api.build_model("vim_fmnist", path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_checkpoints_may_carry_training_arguments(tmp_path):
    """Official Vim checkpoints keep the training script's argparse.Namespace next to the weights."""
    torch.manual_seed(0)
    random = timm.create_model("vim_fmnist", pretrained=False)
    path = tmp_path / "official.pth"
    torch.save({"model": random.state_dict(), "args": argparse.Namespace(lr=5e-4, epochs=300)}, path)
    model = api.build_model("vim_fmnist", path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in random.state_dict().items())


def test_checkpoint_that_is_not_a_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(api.QMambaError, match="holds a Tensor, not a dict of tensors"):
        api.build_model("vim_fmnist", tmp_path / "t.pt")


def test_analyze_checks_its_folder_before_recording(tmp_path, monkeypatch):
    import qmamba_ao.analysis as analysis

    def never(*args, **kwargs):
        raise AssertionError("recorded although the output cannot be written")

    monkeypatch.setattr(analysis, "collect_sites", never)
    (tmp_path / "file").write_text("x")
    with pytest.raises(api.QMambaError, match="not a folder"):
        api.analyze(torch.nn.Identity(), torch.zeros(1), 4, tmp_path / "file")
    with pytest.raises(api.QMambaError, match=r"must be an integer in 2\.\.8; got 9"):
        api.analyze(torch.nn.Identity(), torch.zeros(1), 9, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_ltsq_transform_kinds_are_saved(tmp_path):
    """The kind each LtSQ quantizer calibrated to travels in its state (``kind_id``): the rebuilt model
    (built without weights, so its own calibration would pick other kinds) takes it over."""
    from qmamba_ao.observers import FrozenLtSQ
    from qmamba_ao.observers.ltsq import TRANSFORMS

    torch.manual_seed(0)
    model = timm.create_model("vim_fmnist", pretrained=False).eval()
    q = qmamba_ao.quantize(model, [torch.randn(8, 1, 28, 28)], "qmamba-ltsq-only", 4, 4, progress=False)
    sites = [m for m in q.modules() if isinstance(m, FrozenLtSQ)]
    for m in sites:
        m.kind_id.fill_(TRANSFORMS["signed_power" if m.kind != "signed_power" else "signed_log"])
    api.save_quantized(tmp_path / "q.pt", q, "vim_fmnist", "qmamba-ltsq-only", 4, 4)
    loaded, record = api.load_quantized(tmp_path / "q.pt")
    assert [m.kind for m in loaded.modules() if isinstance(m, FrozenLtSQ)] == [m.kind for m in sites]
    images = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(loaded(images), q(images))


def test_older_ltsq_files_need_their_checkpoint(tmp_path, monkeypatch):
    """Files saved before the kinds were stored derive them from the original weights, as their version did."""
    torch.manual_seed(0)
    model = timm.create_model("vim_fmnist", pretrained=False).eval()
    q = qmamba_ao.quantize(model, [torch.randn(8, 1, 28, 28)], "qmamba-ltsq-only", 4, 4, progress=False)
    record = {**_old_record(q), "recipe": "qmamba-ltsq-only", "checkpoint": "ck.pth"}
    torch.save(record, tmp_path / "old.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(api.QMambaError, match="needs the checkpoint it was quantized from, ck.pth, which is not found"):
        api.load_quantized("old.pt")
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pth")
    loaded, _ = api.load_quantized("old.pt")
    assert loaded.state_dict().keys() == q.state_dict().keys()
