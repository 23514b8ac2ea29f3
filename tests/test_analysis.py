"""qmamba_ao.analysis on a tiny Vim: recording through ScanHooks, statistics, error table, plot."""

from __future__ import annotations

import builtins
import math
from pathlib import Path

import pytest
import timm
import torch

import qmamba_ao.models  # noqa: F401  (registers the timm names)
from qmamba_ao.analysis import (
    collect_sites,
    format_table,
    plot_sites,
    quantization_error_table,
    site_statistics,
)

torch.set_num_threads(1)

SCANS = ["layers.0.mixer.scan", "layers.0.mixer.scan_b"]
SEQ_LEN = (32 // 8) ** 2 + 1  # patches + class token


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model(
        "vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=1, embed_dim=32, num_classes=10
    )
    return m.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def records(model, images):
    return collect_sites(model, images)


def test_collect_sites_records_every_scan(model, records) -> None:
    assert list(records) == SCANS
    dim = model.layers[0].mixer.d_inner
    n = model.layers[0].mixer.d_state
    for rec in records.values():
        assert rec.num_batches == 1
        assert rec.dA.count == rec.dBu.count == 2 * dim * SEQ_LEN * n
        assert rec.dA.sample.numel() == rec.dA.count  # below the cap: the exact data
        assert 0.0 < rec.dA.min <= rec.dA.max <= 1.0
        assert bool(((rec.dA.sample > 0) & (rec.dA.sample <= 1)).all())
        assert rec.dBu.min < 0 < rec.dBu.max
        assert rec.seq_len == SEQ_LEN
        assert bool((rec.h_max >= rec.h_min).all()) and bool((rec.h_abs_mean >= 0).all())
        assert rec.h is not None and rec.h.shape == (2, dim, SEQ_LEN, n)
        # the stacked states agree with the per-step reductions
        assert torch.equal(rec.h.amax(dim=(0, 1, 3)), rec.h_max)
        assert torch.allclose(rec.h.abs().mean(dim=(0, 1, 3)), rec.h_abs_mean)


def test_collect_sites_removes_hooks_and_keeps_output(model, images) -> None:
    before = model(images)
    model.train()
    recs = collect_sites(model, [(images, torch.zeros(2)), images[:1]], max_h_layers=1)
    assert model.training  # mode restored
    model.eval()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert torch.equal(model(images), before)
    first, second = recs.values()
    assert first.num_batches == second.num_batches == 2
    assert first.h is not None and first.h.shape[0] == 2  # first batch only
    assert second.h is None


def test_subsample_is_bounded_and_deterministic(model, images) -> None:
    a = collect_sites(model, images, max_h_layers=0, sample_size=1000)
    b = collect_sites(model, images, max_h_layers=0, sample_size=1000)
    for name in SCANS:
        assert a[name].dA.sample.numel() == 1000
        assert torch.equal(a[name].dA.sample, b[name].dA.sample)
        assert torch.equal(a[name].dBu.sample, b[name].dBu.sample)


def test_site_statistics(records) -> None:
    rows = site_statistics(records)
    assert [r["layer"] for r in rows] == SCANS
    keys = {
        "dA_mean", "dA_skew", "dA_frac_ge_0.9", "dA_tail_le_0.5", "dA_p1", "dA_p50", "dA_p99",
        "dBu_skew", "dBu_kurtosis", "dBu_tail_ratio",
        "h_range_min", "h_range_max", "h_range_ratio", "h_range_cv",
    }  # fmt: skip
    for row in rows:
        assert keys <= row.keys()
        assert all(math.isfinite(row[k]) for k in keys), row
        assert row["dA_p1"] <= row["dA_p50"] <= row["dA_p99"] <= 1.0
        assert 0.0 <= row["dA_tail_le_0.5"] <= 1.0 and 0.0 <= row["dA_frac_ge_0.9"] <= 1.0
        assert row["dBu_tail_ratio"] >= 1.0 and row["h_range_ratio"] >= 1.0


def test_quantization_error_table(records) -> None:
    rows = quantization_error_table(records, bits=4, num_groups=4)
    methods = {(r["layer"], r["site"]): set() for r in rows}
    for r in rows:
        methods[(r["layer"], r["site"])].add(r["method"])
        assert math.isfinite(r["mse"]) and r["mse"] >= 0.0, r
    for name in SCANS:
        assert {"minmax", "ltsq", "log2_complement"} <= methods[(name, "dA")]
        assert {"minmax", "percentile", "mse_clip", "log2", "ltsq"} <= methods[(name, "dBu")]
        assert methods[(name, "h")] == {
            "minmax",
            "percentile",
            "per_step",
            "tgq_uniform_minmax",
            "tgq_uniform",
            "tgq_range",
        }
    by = {(r["layer"], r["site"], r["method"]): r for r in rows}
    for name in SCANS:
        # For signed dBu, LtSQ's candidates include the min-max grid itself; per-step grids refine
        # the per-tensor one.
        assert by[(name, "dBu", "ltsq")]["rel_to_minmax"] <= 1.0 + 1e-9
        assert by[(name, "h", "per_step")]["mse"] <= by[(name, "h", "minmax")]["mse"]
    # dA of the forward scan sits near 1 (what LtSQ is for). Not asserted for scan_b: its
    # delta_bias starts at 0, so its dA piles near 0 and LtSQ's grid, anchored at 1, can lose.
    assert by[(SCANS[0], "dA", "ltsq")]["rel_to_minmax"] < 1.0
    text = format_table(rows)
    assert "tgq_range" in text and "rel_to_minmax" in text


def test_plot_sites_writes_png(records, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = plot_sites(records, tmp_path / "sites.png")
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="no record"):
        plot_sites(records, tmp_path / "x.png", layers=["nope"])


def test_plot_sites_without_matplotlib(records, tmp_path: Path, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"qmamba-ao\[plot\]"):
        plot_sites(records, tmp_path / "sites.png")
