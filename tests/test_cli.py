"""The qmamba-ao command, run in-process through ``qmamba_ao.cli.main`` on small real Fashion-MNIST subsets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest

from qmamba_ao import __version__
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
        (["quantize", "--bits", "w4x4"], "bad bit width"),
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


def test_quantize_then_evaluate_the_saved_model(capsys, tmp_path):
    saved = tmp_path / "q.pt"
    out, _ = run(capsys, "quantize", "--recipe", "qmamba", "--bits", "w4a4", *SMALL, "--output", str(saved))
    assert f"saved {saved}" in out and saved.is_file()
    top1, top5, _agree = row(out, "qmamba W4A4")
    out, _ = run(capsys, "evaluate", "--quantized", str(saved), "--eval-size", "64")
    assert row(out, "qmamba W4A4") == [top1, top5, "64"]


def test_analyze_writes_statistics_and_figure(capsys, tmp_path):
    out, _ = run(capsys, "analyze", "--images", "8", "--output", str(tmp_path))
    result = json.loads((tmp_path / "analysis.json").read_text())
    assert result["statistics"] and result["errors"]
    assert (tmp_path / "sites.png").is_file() == (find_spec("matplotlib") is not None)
    assert f"{tmp_path / 'analysis.json'}" in out
