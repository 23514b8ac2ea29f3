"""The qmamba-ao command, run in-process through ``qmamba_ao.cli.main`` on small real Fashion-MNIST subsets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

import qmamba_ao
from qmamba_ao import __version__, api
from qmamba_ao.cli import main

SMALL = ["--calib-size", "16", "--eval-size", "64"]


def run(capsys, *args: str, ok: bool = True) -> tuple[str, str]:
    """``main(args)``; returns (stdout, stderr) and checks the exit code."""
    code = main(list(args))
    out, err = capsys.readouterr()
    assert (code == 0) == ok, out + err
    return out, err


def row(table: str, label: str) -> list[str]:
    """The cells of the table line that starts with ``label``."""
    line = next(line for line in table.splitlines() if line.startswith(label))
    return line[len(label) :].split()


def test_console_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "qmamba_ao.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"qmamba-ao {__version__}"


def test_lists_recipes_and_models(capsys):
    assert "qmamba-ltsq-only" in run(capsys, "recipes")[0]
    out = run(capsys, "models")[0]
    assert "vim_tiny_patch16_224" in out and "vim_fmnist" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--model", "nope"], "unknown model 'nope'"),
        (["compare", "--recipes", "qmamba,bogus"], "bogus"),
        # recipe names and bit widths are checked before the model (here an unknown one) loads
        (["compare", "--model", "nope", "--recipes", "bogus"], "bogus"),
        (["compare", "--model", "nope", "--bits", "w4x4"], "bad bit width"),
        (["compare", "--model", "nope", "--bits", "w8a8,w9a9"], "must be in 2..8"),
        (["quantize", "--bits", "w4x4"], "bad bit width"),
        (["quantize", "--model", "nope", "--bits", "w8a8,w4a4"], "quantize takes one bit width"),
        (["quantize", "--model", "nope", "--bits", "w1a8"], "must be in 2..8"),
        (["quantize", "--model", "nope", "--recipe", "bogus"], "bogus"),
        (["quantize", "--data", "/no/such/folder"], "does not exist"),
        (["quantize", "--calib-size", "70000"], "has 60000"),
        (["quantize", "--checkpoint", "/no/such.pth"], "not found"),
        (["evaluate", "--quantized", "/no/such.pt"], "not found"),
    ],
)
def test_bad_input_gives_one_error_line(capsys, args, message):
    err = run(capsys, *args, ok=False)[1]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_argparse_errors_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--calib-size", "many"])
    assert exc.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "--calib-size", "0"], "--calib-size: must be an integer >= 1; got 0"),
        (["quantize", "--eval-size", "-5"], "--eval-size: must be an integer >= 1; got -5"),
        (["compare", "--calib-size", "-1"], "--calib-size: must be an integer >= 1; got -1"),
        (["evaluate", "--eval-size", "0"], "--eval-size: must be an integer >= 1; got 0"),
        (["export", "--calib-size", "0", "--output", "m.onnx"], "--calib-size: must be an integer >= 1"),
        (["analyze", "--images", "0", "--output", "out"], "--images: must be an integer >= 1; got 0"),
        (["analyze", "--bits", "9", "--output", "out"], "--bits: must be an integer in 2..8; got 9"),
        (["analyze", "--bits", "1", "--output", "out"], "--bits: must be an integer in 2..8; got 1"),
    ],
)
def test_bad_sizes_and_bits_are_refused_before_any_work(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err


def _forbid_model(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(api, "build_model", never)


@pytest.mark.parametrize("command", ["quantize", "compare", "analyze", "export", "evaluate"])
def test_ctrl_c_prints_one_line_and_exits_130(capsys, monkeypatch, tmp_path, command):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "build_model", interrupted)
    monkeypatch.setattr(api, "load_quantized", interrupted)
    out = tmp_path / "out"
    extra = {
        "quantize": ["--output", str(out / "q.pt")],
        "compare": ["--json", str(out / "r.json")],
        "analyze": ["--output", str(out)],
        "export": ["--output", str(out / "m.onnx")],
        "evaluate": ["--quantized", str(tmp_path / "q.pt")],
    }[command]
    assert main([command, *extra]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_known_errors_from_below_give_one_line(capsys, monkeypatch):
    from qmamba_ao.data import DataError
    from qmamba_ao.export import ExportError

    for error in (DataError("data folder x is broken"), ExportError("cannot export y")):

        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(api, "build_model", fail)
        err = run(capsys, "quantize", ok=False)[1]
        assert err == f"error: {error}\n"


def test_evaluate_refuses_model_and_checkpoint_next_to_a_quantized_file(capsys, monkeypatch, tmp_path):
    _forbid_model(monkeypatch)
    err = run(capsys, "evaluate", "--quantized", "q.pt", "--checkpoint", "c.pth", ok=False)[1]
    assert "error: --checkpoint cannot be combined with --quantized" in err


def test_compare_prints_every_recipe_and_bit_width(capsys, tmp_path):
    args = ["--recipes", "qmamba,minmax", "--bits", "w8a8,w4a4", *SMALL, "--json", str(tmp_path / "r.json")]
    out, _ = run(capsys, "compare", *args)
    assert "vim_fmnist: calibration 16 train images (seed 0), evaluation 64 test images" in out
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("|")]
    rows = {(c[0], c[1]) for c in cells[2:]}  # after the header and its rule
    assert rows == {("fp", "fp32"), ("qmamba", "W8A8"), ("qmamba", "W4A4"), ("minmax", "W8A8"), ("minmax", "W4A4")}
    assert cells[2][:2] == ["fp", "fp32"] and cells[2][4] == "100.00"
    records = json.loads((tmp_path / "r.json").read_text())
    assert [(r["recipe"], r["w_bits"], r["a_bits"]) for r in records] == [
        ("fp", 32, 32),
        ("qmamba", 8, 8),
        ("qmamba", 4, 4),
        ("minmax", 8, 8),
        ("minmax", 4, 4),
    ]
    assert all(0.0 <= r["top1"] <= r["top5"] <= 100.0 for r in records)
    assert records[0]["agree"] == 100.0
    assert not list(tmp_path.glob("*.partial"))


def test_quantize_then_evaluate_the_saved_model(capsys, tmp_path, monkeypatch):
    """Saved with a relative --checkpoint, evaluated from another folder after the checkpoint is gone:
    the file holds every weight."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copy(Path(qmamba_ao.__file__).parent / "weights" / "vim_fmnist.pth", work / "ck.pth")
    monkeypatch.chdir(work)
    out, _ = run(capsys, "quantize", "--checkpoint", "ck.pth", "--recipe", "qmamba", *SMALL, "--output", "q.pt")
    assert "saved q.pt" in out and (work / "q.pt").is_file()
    top1, top5, _agree = row(out, "qmamba W4A4")
    (work / "ck.pth").unlink()
    monkeypatch.chdir(elsewhere)
    saved = str(work / "q.pt")
    out, err = run(capsys, "evaluate", "--quantized", saved, "--eval-size", "64")
    assert row(out, "qmamba W4A4") == [top1, top5, "64"] and "note" not in err
    out, _ = run(capsys, "evaluate", "--quantized", saved, "--model", "vim_fmnist", "--eval-size", "64")
    assert row(out, "qmamba W4A4") == [top1, top5, "64"]
    err = run(capsys, "evaluate", "--quantized", saved, "--model", "vmamba_fmnist", ok=False)[1]
    assert f"error: --model vmamba_fmnist does not match {saved}, which holds a quantized vim_fmnist" in err


def test_analyze_without_matplotlib_still_writes_the_statistics(capsys, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    folder = tmp_path / "new" / "analysis"
    out, err = run(capsys, "analyze", "--images", "4", "--output", str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["analysis.json"]
    assert json.loads((folder / "analysis.json").read_text())["statistics"]
    assert "note: no sites.png: the figure needs matplotlib (pip install matplotlib" in err and "plot" in err
    assert f"wrote {folder / 'analysis.json'}" in out


def test_failed_analyze_leaves_no_folder(capsys, tmp_path, monkeypatch):
    import qmamba_ao.analysis as analysis

    def broken(*args, **kwargs):
        raise api.QMambaError("no scan sites")

    monkeypatch.setattr(analysis, "collect_sites", broken)
    folder = tmp_path / "new" / "analysis"
    err = run(capsys, "analyze", "--images", "4", "--output", str(folder), ok=False)[1]
    assert "error: no scan sites" in err and list(tmp_path.iterdir()) == []


def test_analyze_writes_statistics_and_figure(capsys, tmp_path):
    out, _ = run(capsys, "analyze", "--images", "8", "--output", str(tmp_path))
    result = json.loads((tmp_path / "analysis.json").read_text())
    assert result["statistics"] and result["errors"]
    assert (tmp_path / "sites.png").is_file() == (find_spec("matplotlib") is not None)
    assert f"{tmp_path / 'analysis.json'}" in out
