"""Hostile-input cases gathered in one place.

Each case feeds the toolkit something wrong (a mislabelled copy of the data, garbage or truncated files,
empty or mis-laid folders, undecodable images, out-of-range sizes) and asserts either a clear error message
that names the culprit or a correct result: never a raw traceback from a library underneath, never a
silently wrong result.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

from qmamba_ao.data import IDX_IMAGES, IDX_LABELS, DataError, fashion_mnist, load_split

# --- Fashion-MNIST IDX sources -----------------------------------------------------------------------------


def _idx(magic: int, shape: tuple[int, ...], body: bytes) -> bytes:
    return struct.pack(f">{1 + len(shape)}I", magic, *shape) + body


def _write_fmnist(folder: Path, labels: int | None = None, gz: bool = True, n: int = 5, seed: int = 0) -> Path:
    """Four small IDX files; ``labels`` fixes every label to one class."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        pixels = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        ys = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        if labels is not None:
            ys.fill_(labels)
        for name, blob in (
            (f"{prefix}-images-idx3-ubyte", _idx(IDX_IMAGES, (n, 28, 28), pixels.numpy().tobytes())),
            (f"{prefix}-labels-idx1-ubyte", _idx(IDX_LABELS, (n,), ys.numpy().tobytes())),
        ):
            (folder / (f"{name}.gz" if gz else name)).write_bytes(gzip.compress(blob) if gz else blob)
    return folder


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache folder; the data code must not need one, so it has to stay empty."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("QMAMBA_CACHE", str(folder))
    monkeypatch.delenv("QMAMBA_DATA", raising=False)
    yield folder
    assert not any(folder.iterdir()), "data loading wrote into the cache folder"


def test_each_source_gives_its_own_labels(tmp_path, cache, monkeypatch):
    """A folder with all test labels set to 0 must not be evaluated with another folder's labels."""
    real = _write_fmnist(tmp_path / "real")
    zeros = _write_fmnist(tmp_path / "zeros", labels=0)
    monkeypatch.setenv("QMAMBA_DATA", str(real))
    _, y_real = load_split("fashion-mnist", "test")
    _, y_zero = load_split(zeros, "test")
    _, y_again = load_split("fashion-mnist", "test")
    assert y_zero.tolist() == [0] * 5
    assert torch.equal(y_real, y_again) and y_real.tolist() != [0] * 5


def test_source_changed_in_place_is_reread(tmp_path, cache):
    folder = _write_fmnist(tmp_path / "fm", labels=3)
    assert load_split(folder, "test")[1].tolist() == [3] * 5
    _write_fmnist(folder, labels=7)
    assert load_split(folder, "test")[1].tolist() == [7] * 5


@pytest.mark.parametrize("gz", [True, False])
def test_garbage_file_named_and_nothing_left_behind(tmp_path, cache, gz):
    folder = _write_fmnist(tmp_path / "fm", gz=gz)
    bad = folder / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    bad.write_bytes(b"this is not a dataset\n" * 10)
    before = _tree(tmp_path)
    with pytest.raises(DataError, match="gzip" if gz else "magic number") as e:
        load_split(folder, "test")
    assert str(bad) in str(e.value)
    assert _tree(tmp_path) == before
    assert load_split(_write_fmnist(tmp_path / "good"), "test")[0].shape == (5, 1, 28, 28)


def test_truncated_gzip_stream(tmp_path, cache):
    folder = _write_fmnist(tmp_path / "fm")
    bad = folder / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-12])
    with pytest.raises(DataError, match="cannot be read as a gzip file") as e:
        load_split(folder, "train", 2)
    assert str(bad) in str(e.value)


def test_corrupt_gzip_checksum(tmp_path, cache):
    folder = _write_fmnist(tmp_path / "fm")
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    blob = bytearray(bad.read_bytes())
    blob[-8] ^= 0xFF  # CRC32 of the member
    bad.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=str(bad)):
        load_split(folder, "test")


def test_valid_gzip_of_truncated_idx(tmp_path, cache):
    folder = _write_fmnist(tmp_path / "fm")
    bad = folder / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-100]))
    with pytest.raises(DataError, match="truncated") as e:
        load_split(folder, "test")
    assert str(bad) in str(e.value)


def test_image_and_label_counts_must_match(tmp_path, cache):
    folder = _write_fmnist(tmp_path / "fm", gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx(IDX_LABELS, (4,), bytes(4)))
    with pytest.raises(DataError, match="holds 5 images but .* holds 4 labels"):
        load_split(folder, "test")


def test_labels_out_of_range(tmp_path, cache):
    folder = _write_fmnist(tmp_path / "fm", gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx(IDX_LABELS, (5,), bytes([0, 1, 2, 3, 200])))
    with pytest.raises(DataError, match="label 200"):
        load_split(folder, "test")


def test_wrong_image_size(tmp_path, cache):
    folder = _write_fmnist(tmp_path / "fm", gz=False)
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx(IDX_IMAGES, (5, 32, 32), bytes(5 * 32 * 32)))
    with pytest.raises(DataError, match="32x32 images"):
        load_split(folder, "test")


def test_folder_with_some_files_lists_the_missing(tmp_path, cache):
    folder = _write_fmnist(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks Fashion-MNIST files t10k-labels-idx1-ubyte"):
        load_split(folder, "train", 2)


def test_interrupt_while_reading_leaves_nothing(tmp_path, cache, monkeypatch):
    import qmamba_ao.data as data

    folder = _write_fmnist(tmp_path / "fm")
    before = _tree(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_read_upto", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fashion_mnist(train=True, path=folder)
    monkeypatch.undo()
    assert _tree(tmp_path) == before
    assert not list(tmp_path.rglob("*.partial"))
    assert len(fashion_mnist(train=True, path=folder)) == 5


@pytest.mark.parametrize("size", [0, -3, 6])
def test_split_size_out_of_range(tmp_path, cache, size):
    with pytest.raises(ValueError, match="test split .* has 5"):
        load_split(_write_fmnist(tmp_path / "fm"), "test", size)


# --- ImageNet-style folders --------------------------------------------------------------------------------


@pytest.fixture
def model() -> torch.nn.Module:
    """Only its data config is read (input size 32)."""
    m = torch.nn.Linear(2, 2)
    m.pretrained_cfg = {"input_size": (3, 32, 32)}
    return m


def _image(path: Path, color=(10, 20, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (36, 36), color).save(path)


def test_missing_data_path(tmp_path, model):
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nowhere", "test", model=model)


def test_data_path_is_a_file(tmp_path, model):
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(DataError, match="is not a folder"):
        load_split(tmp_path / "x.tar", "test", model=model)


def test_missing_split_folder(tmp_path, model):
    _image(tmp_path / "train" / "cat" / "0.png")
    with pytest.raises(DataError, match=r"no val or validation folder .*/val/<class>/\*\.JPEG"):
        load_split(tmp_path, "test", model=model)


@pytest.mark.parametrize("layout", ["empty", "empty class folders", "no image files"])
def test_split_folder_without_images(tmp_path, model, layout):
    val = tmp_path / "val"
    val.mkdir()
    if layout == "empty class folders":
        (val / "cat").mkdir()
    elif layout == "no image files":
        (val / "cat").mkdir()
        (val / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"holds no images .*<class>/\*\.JPEG") as e:
        load_split(tmp_path, "test", model=model)
    assert str(val) in str(e.value)


def test_images_outside_class_folders(tmp_path, model):
    """Loose images would form an extra class '' and shift every label by one."""
    _image(tmp_path / "val" / "cat" / "0.png")
    _image(tmp_path / "val" / "stray.png")
    with pytest.raises(DataError, match="outside class folders.*stray.png"):
        load_split(tmp_path, "test", model=model)


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 not really a jpeg"])
def test_unreadable_image_is_named(tmp_path, model, content):
    """timm's dataset would log a warning and return the next image instead; here it is an error."""
    _image(tmp_path / "val" / "cat" / "0.png")
    bad = tmp_path / "val" / "dog" / "broken.JPEG"
    bad.parent.mkdir()
    bad.write_bytes(content)
    with pytest.raises(DataError, match="cannot read image") as e:
        load_split(tmp_path, "test", model=model)
    assert str(bad) in str(e.value)


def test_unreadable_permissions(tmp_path, model):
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of permissions")
    bad = tmp_path / "val" / "cat" / "0.png"
    _image(bad)
    bad.chmod(0)
    try:
        with pytest.raises(DataError, match=str(bad)):
            load_split(tmp_path, "test", model=model)
    finally:
        bad.chmod(0o644)


# --- command outputs and input files -----------------------------------------------------------------------

import stat  # noqa: E402

from qmamba_ao import api  # noqa: E402
from qmamba_ao.cli import main  # noqa: E402


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the command must refuse its arguments before any work."""

    def never(*args, **kwargs):
        raise AssertionError("the model loaded although an argument was bad")

    monkeypatch.setattr(api, "build_model", never)
    monkeypatch.setattr(api, "load_quantized", never)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
@pytest.mark.parametrize(
    "command",
    [["quantize", "--output"], ["compare", "--json"], ["analyze", "--output"]],
)
def test_outputs_onto_devices_are_refused_before_any_work(capsys, no_model, device, command):
    before = os.stat(device)
    code, err = _cli(capsys, *command, device)
    assert code == 1 and err.count("error: ") == 1 and device in err
    assert ("is a character device" if command[0] != "analyze" else "not a folder") in err
    after = os.stat(device)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino


@pytest.mark.parametrize("command", [["quantize", "--output"], ["compare", "--json"], ["analyze", "--output"]])
def test_outputs_onto_symlinks_are_refused(capsys, no_model, tmp_path, command):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(outside if command[0] == "analyze" else outside / "precious")
    code, err = _cli(capsys, *command, str(link))
    assert code == 1 and "symbolic links are refused" in err and "outside the output path" in err
    assert link.is_symlink() and (outside / "precious").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["link", "outside", "precious"]


@pytest.mark.parametrize(
    "command, message",
    [
        (["quantize", "--output", "{tmp}"], "is a folder; give a file name"),
        (["compare", "--json", "{tmp}"], "is a folder; give a file name"),
        (["quantize", "--output", "/proc/q.pt"], "cannot create files in /proc"),
        (["compare", "--json", "{tmp}/file/r.json"], "is not a folder"),
        (["analyze", "--output", "/proc/analysis"], "cannot create files in /proc"),
        (["analyze", "--output", "{tmp}/file"], "not a folder"),
    ],
)
def test_unwritable_outputs_fail_before_any_work(capsys, no_model, tmp_path, command, message):
    (tmp_path / "file").write_text("x")
    code, err = _cli(capsys, *[c.format(tmp=tmp_path) for c in command])
    assert code == 1 and err.count("error: ") == 1 and message in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_analysis_files_inside_the_folder_are_checked(capsys, no_model, tmp_path):
    (tmp_path / "sites.png").symlink_to(tmp_path / "elsewhere.png")
    code, err = _cli(capsys, "analyze", "--output", str(tmp_path))
    assert code == 1 and "sites.png is a symbolic link" in err


def test_compare_json_keeps_the_mode_of_an_existing_file(capsys, tmp_path, monkeypatch):
    records = [{"recipe": "fp", "w_bits": 32, "a_bits": 32, "top1": 50.0, "top5": 90.0, "agree": 100.0}]
    monkeypatch.setattr(api, "build_model", lambda name, checkpoint=None: torch.nn.Identity())
    monkeypatch.setattr(api, "load_images", lambda *args, **kwargs: (torch.zeros(2, 1), torch.zeros(2)))
    monkeypatch.setattr(api, "compare", lambda *args, **kwargs: records)
    target = tmp_path / "r.json"
    target.write_text("old")
    target.chmod(0o600)
    code, _ = _cli(capsys, "compare", "--json", str(target))
    assert code == 0 and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text().startswith("[") and [p.name for p in tmp_path.iterdir()] == ["r.json"]


class _MakesFolder:
    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def __reduce__(self):
        return os.mkdir, (self.folder,)


@pytest.mark.parametrize("option", ["--quantized", "--checkpoint"])
def test_crafted_pickle_runs_no_code(capsys, tmp_path, option):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "state_dict": {}, "recipe": _MakesFolder(marker)}, evil)
    code, err = _cli(capsys, "evaluate", option, str(evil))
    assert code == 1 and not marker.exists()
    assert f"{evil} is not" in err and "it holds posix.mkdir; only tensors and plain containers are loaded" in err


def _checksummed(tmp_path: Path) -> Path:
    """A small record with a valid checksum (enough for the integrity check, which runs first)."""
    record = {
        "model": "vim_fmnist",
        "checkpoint": None,
        "recipe": "minmax",
        "w_bits": 4,
        "a_bits": 4,
        "options": {},
        "reference": True,
        "state_dict": {"weight": torch.linspace(-1, 1, 4096)},
        "attributes": {},
        "format": api.QUANTIZED_FORMAT,
    }
    record["sha256"] = api._digest(record)
    path = tmp_path / "q.pt"
    torch.save(record, path)
    return path


def test_overwritten_bytes_in_a_quantized_file(capsys, tmp_path):
    path = _checksummed(tmp_path)
    blob = bytearray(path.read_bytes())
    start = blob.find(torch.linspace(-1, 1, 4096)[1000:1004].numpy().tobytes())
    assert start > 0
    blob[start : start + 8] = b"\xff\x00\x00\xf0" * 2  # a weight of about -1.6e29
    path.write_bytes(bytes(blob))
    code, err = _cli(capsys, "evaluate", "--quantized", str(path))
    assert code == 1 and err.count("\n") == 1
    assert f"{path} is damaged: its contents do not match the SHA-256 stored in it" in err


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
@pytest.mark.parametrize("option", ["--quantized", "--checkpoint"])
def test_broken_model_files_give_one_line_naming_the_file(capsys, tmp_path, damage, option):
    path = _checksummed(tmp_path)
    blob = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": blob[: len(blob) // 3], "text": b"weights: none\n"}[damage])
    code, err = _cli(capsys, "evaluate", option, str(path))
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"error: {path} is not")
