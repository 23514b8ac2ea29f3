"""``qmamba-ao export`` in-process: bad input fails early with a message naming the fix; a small export works."""

from __future__ import annotations

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
    ],
)
def test_bad_input_gives_a_clear_error(capsys, args, message, tmp_path):
    code = main(["export", *[str(tmp_path / a) if a.endswith((".onnx", ".pt")) else a for a in args]])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and err.count("error: ") == 1, err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())


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
    code = main(["export", "--bits", "w8a8", "--calib-size", "16", "--output", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert path.is_file() and path.stat().st_size > 0
    assert str(path) in out and "QuantizeLinear 0," not in out
