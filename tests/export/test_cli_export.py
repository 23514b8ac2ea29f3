"""``qmamba-ao export``: bad input fails early with a message naming the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qmamba_ao.cli", "export", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output", "m.onnx", "--opset", "11"], "opset 11 is not supported"),
        (["--output", "model.pt"], "must name an .onnx file"),
    ],
)
def test_bad_input_gives_a_clear_error(args, message, tmp_path):
    proc = run(*[str(tmp_path / a) if a.endswith((".onnx", ".pt")) else a for a in args])
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
