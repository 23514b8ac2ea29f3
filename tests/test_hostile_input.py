"""Hostile-input cases gathered in one place.

Each case feeds the toolkit something wrong (a mislabelled copy of the data, garbage or truncated files,
empty or mis-laid folders, undecodable images, out-of-range sizes, outputs onto devices or symlinks, crafted
or corrupted model files, non-finite or empty calibration data, options of the wrong type, sub-8-bit
activations on the lowered path, a quantized model run at another input size) and asserts either a clear error message
that names the culprit or a correct result: never a raw traceback from a library underneath, never a
silently wrong result.
"""

from __future__ import annotations

import copy
import gzip
import os
import struct
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import prepare_fx

import qmamba_ao
import qmamba_ao.models  # noqa: F401
from qmamba_ao import ptq
from qmamba_ao.data import IDX_IMAGES, IDX_LABELS, DataError, fashion_mnist, load_split
from qmamba_ao.recipes import MAPPING_OPTIONS, get_recipe

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")

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


# --- Quantization: calibration data, options, lowering, input size ------------------------------------------

RECIPES = qmamba_ao.list_recipes()


def _default_prepared(vim, images):
    """The model prepared with torch.ao's own x86 mapping (HistogramObserver activations)."""
    return prepare_fx(
        copy.deepcopy(vim),
        get_default_qconfig_mapping("x86"),
        (images[0],),
        prepare_custom_config=qmamba_ao.prepare_custom_config(vim),
    )


def _prepared(vim, images, recipe):
    if recipe == "torch-default":
        return _default_prepared(vim, images)
    return qmamba_ao.prepare(vim, (images[0][:1],), recipe, 4, 4)


def _poison(prepared, module, value=float("nan")):
    with torch.no_grad():
        prepared.get_submodule(module).weight.view(-1)[0] = value


# -- non-finite calibration images: rejected per batch, before the model runs ---------------------------


@pytest.mark.parametrize("value, counts", [(float("nan"), "1 NaN and 0 Inf"), (float("-inf"), "0 NaN and 1 Inf")])
@pytest.mark.parametrize("recipe", ["minmax", "histogram", "percentile", "qmamba"])
def test_non_finite_pixel_names_the_batch_and_image(vim, images, recipe, value, counts):
    bad = images[1].clone()
    bad[2, 0, 5, 7] = value
    with pytest.raises(ValueError, match=rf"calibration batch 1 has {counts} values in image\(s\) \[2\] of the batch"):
        qmamba_ao.quantize(vim, [images[0], bad], recipe, 4, 4, progress=False)


def test_non_finite_pixel_with_torch_default_mapping(vim, images):
    prepared = _default_prepared(vim, images)
    bad = images[0].clone()
    bad[:, 1] = float("nan")
    with pytest.raises(
        ValueError, match=r"calibration batch 0 has 16384 NaN and 0 Inf values in image\(s\) \[0, 1, 2, 3\]"
    ):
        qmamba_ao.calibrate(prepared, iter([bad]), progress=False)


# -- non-finite values arising inside the model: the first observer that met them, by layer ------------


@pytest.mark.parametrize("recipe", [*RECIPES, "torch-default"])
def test_nan_weight_names_the_observer_after_that_layer(vim, images, recipe):
    prepared = _prepared(vim, images, recipe)
    _poison(prepared, "layers.0.mixer.in_proj")
    with pytest.raises(ValueError) as info:
        qmamba_ao.calibrate(prepared, images[:2], progress=False)
    msg = str(info.value)
    assert msg.startswith("calibration batch 0: non-finite values (NaN or Inf) first reached the observer at: "), msg
    assert "output of layers.0.mixer.in_proj (activation_post_process_" in msg, msg
    assert "The batch itself is finite" in msg, msg


@pytest.mark.parametrize("recipe", ["histogram", "torch-default"])
def test_histogram_observer_error_is_renamed(vim, images, recipe):
    # torch's HistogramObserver fails inside torch.histc ("range of [nan, nan] is not finite")
    prepared = _prepared(vim, images, recipe)
    _poison(prepared, "patch_embed.proj")
    with pytest.raises(
        ValueError, match=r"at: output of patch_embed\.proj \(activation_post_process_1, HistogramObserver\)"
    ):
        qmamba_ao.calibrate(prepared, images[:1], progress=False)


def test_non_finite_values_in_a_later_batch_name_that_batch(vim, images):
    # batch 0 calibrates cleanly; then a weight turns to Inf: torch.ao's MinMaxObserver records it silently
    prepared = qmamba_ao.prepare(vim, (images[0][:1],), "minmax", 8, 8)

    def batches():
        yield images[0]
        _poison(prepared, "layers.1.mixer.x_proj", float("inf"))
        yield images[1]

    with pytest.raises(
        ValueError, match=r"^calibration batch 1: non-finite .* at: output of layers\.1\.mixer\.x_proj \("
    ):
        qmamba_ao.calibrate(prepared, batches(), progress=False)


def test_every_observer_is_named_after_its_layer(vim, images):
    prepared = qmamba_ao.prepare(vim, (images[0][:1],), "minmax", 4, 4)
    names = ptq.observer_names(prepared)
    assert names["activation_post_process_0"] == "input of patch_embed.proj"
    assert names["activation_post_process_1"] == "output of patch_embed.proj"
    assert "input of layers.0.mixer.in_proj" in names.values()
    assert "output of layers.0.mixer.in_proj" in names.values()
    assert {"input 'delta' of layers.0.mixer.scan", "output of layers.0.mixer.scan"} <= set(names.values())
    assert names["layers.1.mixer.scan_b.site_modules.h"] == "layers.1.mixer.scan_b.h"
    observers = [n for n, m in prepared.named_modules() if n.rpartition(".")[2].startswith("activation_post_process")]
    assert set(observers) <= set(names)
    assert not any(v.startswith(("graph node", "activation_post_process")) for v in names.values()), names


# -- empty calibration batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["minmax", "qmamba"])
def test_empty_batch_is_named(vim, images, recipe):
    with pytest.raises(ValueError, match=r"calibration batch 1 holds no images \(shape \(0, 3, 64, 64\)\)"):
        qmamba_ao.quantize(vim, [images[0], images[1][:0]], recipe, 4, 4, progress=False)
    with pytest.raises(ValueError, match=r"calibration batch 0 holds no images"):
        qmamba_ao.quantize(vim, [images[0][:0]], recipe, 4, 4, example_inputs=(images[0][:1],), progress=False)


def test_empty_batch_from_a_generator(vim, images):
    prepared = qmamba_ao.prepare(vim, (images[0][:1],), "minmax", 4, 4)
    with pytest.raises(ValueError, match=r"calibration batch 0 holds no images"):
        qmamba_ao.calibrate(prepared, (x[:0] for x in images), progress=False)
    with pytest.raises(ValueError, match="calib_data is empty"):
        qmamba_ao.calibrate(prepared, iter([]), progress=False)


# -- mapping options taken strictly ----------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(h_feedback="off"), r"h_feedback='off' \(str\): use True or False"),
    (dict(h_feedback=1), r"h_feedback=1 \(int\): use True or False"),
    (dict(percentile=150), r"percentile=150 \(int\): use a number in \(50, 100\]"),
    (dict(percentile="99.9"), r"percentile='99.9' \(str\): use a number in \(50, 100\]"),
    (dict(percentile=float("nan")), r"percentile=nan \(float\): use a number in \(50, 100\]"),
    (dict(tgq_grouping="bogus"), r"tgq_grouping='bogus' \(str\): use one of 'uniform', 'range'"),
    (dict(tgq_clip="max"), r"tgq_clip='max' \(str\): use one of 'auto', 'percentile', 'mse', 'minmax'"),
    (dict(tgq_groups=2.5), r"tgq_groups=2.5 \(float\): use an integer >= 1"),
    (dict(tgq_groups="8"), r"tgq_groups='8' \(str\): use an integer >= 1"),
    (dict(tgq_groups=0), r"tgq_groups=0 \(int\): use an integer >= 1"),
    (dict(tgq_groups=True), r"tgq_groups=True \(bool\): use an integer >= 1"),
    (dict(first_last_bits=9), r"first_last_bits=9 \(int\): use an integer in 2\.\.8 or None"),
    (dict(first_last_bits=8.0), r"first_last_bits=8\.0 \(float\): use an integer in 2\.\.8 or None"),
    (dict(w_bits=True), r"w_bits=True \(bool\): use an integer in 2\.\.8"),
    (dict(w_bits=4.0), r"w_bits=4\.0 \(float\): use an integer in 2\.\.8"),
    (dict(a_bits="4"), r"a_bits='4' \(str\): use an integer in 2\.\.8"),
    (
        dict(tgq_group=4),
        r"unknown quantization option\(s\) 'tgq_group' \(did you mean 'tgq_groups'\?\); the options are",
    ),
    (dict(bogus=1), r"unknown quantization option\(s\) 'bogus'; the options are first_last_bits, h_feedback"),
]


@pytest.mark.parametrize(
    "options, message", BAD_OPTIONS, ids=[next(iter(o)) + "=" + repr(next(iter(o.values()))) for o, _ in BAD_OPTIONS]
)
def test_bad_mapping_options_are_named(options, message):
    options = dict(options)
    bits = {k: options.pop(k) for k in ("w_bits", "a_bits") if k in options}
    with pytest.raises(ValueError, match=message):
        qmamba_ao.get_qconfig_mapping("qmamba", **bits, **options)
    with pytest.raises(ValueError, match=message):
        get_recipe("minmax").x86_qconfig_mapping(**{"w_bits": 8, "a_bits": 8, **bits}, **options)


def test_bad_option_fails_before_the_model_rewrite(vim, images, monkeypatch):
    def no_rewrite(*args, **kwargs):
        raise AssertionError("the rewrite ran before the options were checked")

    monkeypatch.setattr(type(get_recipe("qmamba")), "rewrite", no_rewrite)
    with pytest.raises(ValueError, match="h_feedback='off'"):
        qmamba_ao.quantize(vim, images[:1], "qmamba", 4, 4, progress=False, h_feedback="off")


def test_valid_options_still_accepted_and_defaults_listed():
    assert MAPPING_OPTIONS == dict(
        first_last_bits=8,
        h_feedback=False,
        tgq_groups=8,
        tgq_grouping="uniform",
        tgq_clip="auto",
        percentile=99.99,
        site_bits=None,
        ltsq_form="searched",
    )
    a = qmamba_ao.get_qconfig_mapping("qmamba", 4, 4).to_dict()
    b = qmamba_ao.get_qconfig_mapping("qmamba", 4, 4, **MAPPING_OPTIONS).to_dict()
    assert repr(a) == repr(b)
    spec = qmamba_ao.get_qconfig_mapping("qmamba", 4, 4, h_feedback=True, tgq_groups=4, tgq_grouping="range")
    from qmamba_ao.ssm import SelectiveScan

    scan_spec = spec.object_type_qconfigs[SelectiveScan].activation
    h = scan_spec.sites["h"]()
    assert scan_spec.h_feedback is True and (h.num_groups, h.grouping) == (4, "range")
    assert qmamba_ao.get_qconfig_mapping("minmax", 4, 4, first_last_bits=None, percentile=100) is not None


def test_options_next_to_an_explicit_mapping_are_refused(vim, images):
    mapping = qmamba_ao.get_qconfig_mapping("minmax", 8, 8)
    with pytest.raises(
        ValueError, match=r"mapping option\(s\) h_feedback have no effect next to an explicit qconfig_mapping"
    ):
        qmamba_ao.prepare(vim, (images[0][:1],), qconfig_mapping=mapping, h_feedback=True)


# -- sub-8-bit activations on torch.ao's x86 lowering -------------------------------------------------------


def test_lowering_refuses_4_bit_activations_before_calibrating(vim, images, monkeypatch):
    monkeypatch.setattr(ptq, "calibrate", lambda *a, **k: pytest.fail("calibrated before refusing"))
    with pytest.raises(ValueError) as info:
        qmamba_ao.quantize(vim, images[:1], "minmax", 4, 4, progress=False, reference=False)
    msg = str(info.value)
    assert msg.startswith("torch.ao's x86 int8 kernels (reference=False) take 7- or 8-bit activations"), msg
    assert "4-bit activations would leave their 16 levels" in msg and "input of layers.0.mixer.in_proj (0..15)" in msg
    assert msg.endswith("use reference=True (quantize's default)"), msg


def test_lowering_refuses_narrow_first_last_layers_and_convert_checks_too(vim, images):
    with pytest.raises(ValueError, match=r"6-bit activations .* input of patch_embed\.proj \(0\.\.63\)"):
        qmamba_ao.quantize(vim, images[:1], "minmax", 8, 8, progress=False, reference=False, first_last_bits=6)
    prepared = ptq.prepare_calibrated(vim, images[:1], "percentile", 8, 6, progress=False)
    with pytest.raises(ValueError, match="6-bit activations would leave their 64 levels"):
        qmamba_ao.convert(copy.deepcopy(prepared), reference=False)
    qmamba_ao.convert(prepared, reference=True)  # the simulated model is fine


def test_lowering_keeps_7_and_8_bit_activations(vim, images):
    for mapping in (None, get_recipe("minmax").x86_qconfig_mapping(8, 8)):
        prepared = ptq.prepare_calibrated(vim, images[:1], "minmax", 8, 8, progress=False, qconfig_mapping=mapping)
        assert ptq.lowering_problem(prepared) is None
        lowered = qmamba_ao.convert(prepared, reference=False)
        assert any(type(m).__module__.startswith("torch.ao.nn.quantized.modules") for m in lowered.modules())


# -- a quantized model run at another input size -----------------------------------------------------------


@pytest.fixture(scope="module")
def vmamba_fmnist():
    return timm.create_model("vmamba_fmnist", pretrained=True).eval()


def test_per_token_model_at_another_input_size_names_the_layer_and_sizes(vmamba_fmnist):
    g = torch.Generator().manual_seed(0)
    q = qmamba_ao.quantize(vmamba_fmnist, [torch.randn(2, 1, 28, 28, generator=g)], "qmamba", 8, 8, progress=False)
    with torch.inference_mode():
        assert q(torch.randn(1, 1, 28, 28, generator=g)).shape == (1, 10)
        with pytest.raises(ValueError) as info:
            q(torch.randn(1, 1, 32, 32, generator=g))
    msg = str(info.value)
    assert msg.startswith("layers.0.blocks.0.op.in_proj") and "static per-token scales calibrated for 49 tokens" in msg
    assert "(calibration input 1x28x28 per image), but got 64 tokens" in msg and "quantize again" in msg, msg


def test_temporal_groups_at_another_input_size_name_the_scan(vmamba_fmnist):
    recipe = replace(get_recipe("minmax"), name="minmax-tgq", h="tgq")  # per-tensor Linear inputs, TGQ on h
    q = qmamba_ao.quantize(vmamba_fmnist, [torch.randn(2, 1, 28, 28)], recipe, 8, 8, progress=False)
    with torch.inference_mode(), pytest.raises(ValueError) as info:
        q(torch.randn(1, 1, 32, 32))
    msg = str(info.value)
    assert msg.startswith("layers.0.blocks.0.op.scan (its h site): TGQ was calibrated on sequences of length 49"), msg
    assert "64" in msg and "calibrated on 1x28x28 inputs per image" in msg, msg


def test_calibration_batches_of_two_sizes_name_the_batch_and_layer(vmamba_fmnist):
    data = [torch.randn(2, 1, 28, 28), torch.randn(2, 1, 32, 32)]
    with pytest.raises(ValueError, match=r"^calibration batch 1: PerTokenObserver \(site 'input of layers\.0\.blocks"):
        qmamba_ao.quantize(vmamba_fmnist, data, "ptq4vm", 8, 8, progress=False)
