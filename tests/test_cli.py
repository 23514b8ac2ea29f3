"""The qmamba-ao command, through a subprocess as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "qmamba_ao.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def test_lists_recipes_and_models():
    assert "qmamba-ltsq-only" in run("recipes").stdout
    out = run("models").stdout
    assert "vim_tiny_patch16_224" in out and "vim_fmnist" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--model", "nope"], "unknown model 'nope'"),
        (["compare", "--recipes", "qmamba,bogus"], "unknown recipe(s) ['bogus']"),
        (["quantize", "--bits", "w4x4"], "bad bit width"),
        (["quantize", "--data", "/no/such/folder"], "does not exist"),
        (["quantize", "--calib-size", "70000"], "has 60000"),
        (["quantize", "--checkpoint", "/no/such.pth"], "not found"),
    ],
)
def test_bad_input_gives_a_clear_error(args, message):
    proc = run(*args, ok=False)
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
