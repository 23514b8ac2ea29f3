"""``qmamba-ao export`` in-process: bad input fails early with a message naming the fix; a small export works."""

from __future__ import annotations

import os
import stat
from importlib.util import find_spec

import pytest
import timm
import torch

import qmamba_ao.models  # noqa: F401  (registers vim_fmnist)
from qmamba_ao import api
from qmamba_ao.cli import main


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output", "m.onnx", "--opset", "11"], "opset 11 is not supported"),
        (["--output", "model.pt"], "must name an .onnx file"),
        (["--output", "m.onnx", "--bits", "w8a8,w4a4"], "export takes one bit width"),
        (["--output", "m.onnx", "--recipe", "bogus"], "bogus"),
        (["--output", "m.onnx", "--bits", "w9a9"], "must be in 2..8"),
        (["--output", "m.onnx", "--calib-size", "1"], "export needs --calib-size >= 2; got 1"),
        (["--output", "/proc/m.onnx"], "cannot create files in /proc"),
    ],
)
def test_bad_input_gives_a_clear_error(capsys, args, message, tmp_path):
    def local(a):
        return str(tmp_path / a) if a.endswith((".onnx", ".pt")) and not a.startswith("/") else a

    code = main(["export", *[local(a) for a in args]])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and err.count("error: ") == 1, err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_calib_size_one_is_explained(capsys, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model loaded before --calib-size was checked")

    monkeypatch.setattr(api, "build_model", never)
    assert main(["export", "--calib-size", "1", "--output", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "batch of 2 calibration images so that the exported batch dimension stays dynamic" in err


@pytest.mark.parametrize("kind", ["folder", "symlink", "fifo"])
def test_output_must_be_a_regular_file(capsys, tmp_path, monkeypatch, kind):
    def never(*args, **kwargs):
        raise AssertionError("the model loaded before --output was checked")

    monkeypatch.setattr(api, "build_model", never)
    path = tmp_path / "m.onnx"
    target = tmp_path / "elsewhere.onnx"
    target.write_text("keep")
    if kind == "folder":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        os.mkfifo(path)
    assert main(["export", "--output", str(path)]) == 1
    err = capsys.readouterr().err
    assert {"folder": "is a folder; give a file name", "symlink": "symbolic links are refused", "fifo": "a FIFO"}[
        kind
    ] in err
    assert err.count("error: ") == 1 and target.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.onnx", "m.onnx"]


def test_exports_an_onnx_file(capsys, tmp_path, monkeypatch):
    missing = [m for m in ("onnx", "onnxscript") if find_spec(m) is None]
    if missing:
        pytest.skip(f"ONNX export needs {', '.join(missing)} (pip install 'qmamba-ao[export]')")

    def one_block(name, checkpoint=None):
        """vim_fmnist with one of its four blocks: the same command path, a quarter of the export time."""
        assert (name, checkpoint) == ("vim_fmnist", None)
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, depth=1).eval()

    monkeypatch.setattr(api, "build_model", one_block)
    path = tmp_path / "model.onnx"
    path.write_text("an older export")
    path.chmod(0o640)
    code = main(["export", "--bits", "w8a8", "--calib-size", "16", "--output", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert path.is_file() and path.stat().st_size > 100
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # replaced, with the mode it had
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert str(path) in out and "QuantizeLinear 0," not in out
