"""Measure the scan sites of a trained Fashion-MNIST model and each quantizer's error on them.

    python benchmarks/site_error.py [--model vim_fmnist --images 64 --bits 4 --figure docs/figures/sites.png
                                     --json out.json]
    python benchmarks/site_error.py --ltsq-forms [--model vmamba_fmnist --form-bits 4,6,8]

Collects dA, dBu and h from the float model (``vim_fmnist`` by default, or ``vmamba_fmnist``) on
Fashion-MNIST *training* images (seeded choice, the same subset ``qmamba-ao`` calibrates on),
prints the per-layer distribution statistics, and the MSE of every quantizer calibrated and
evaluated on those tensors (relative to min/max). These are the numbers in docs/method.md.

``--ltsq-forms`` prints instead the dA and dBu error of LtSQ's two forms, ``searched`` (the
default) and ``log2`` (the paper's log2 grids, see :mod:`qmamba_ao.observers.ltsq`), at each of
``--form-bits``, with how many layers the log2 form gave its log2 grid.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

import timm
import torch
from tabulate import tabulate

import qmamba_ao.models  # noqa: F401
from qmamba_ao.analysis import (
    SiteRecord,
    collect_sites,
    format_table,
    plot_sites,
    quantization_error_table,
    site_statistics,
)
from qmamba_ao.data import load_split
from qmamba_ao.observers import FrozenAffineQuant, LtSQObserver, int_range, qparams_from_minmax

MODELS = ("vim_fmnist", "vmamba_fmnist")
#: the figure docs/method.md shows is of the default model
DEFAULT_FIGURE = "docs/figures/sites.png"


def _bit_list(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit widths such as 4,6,8; got {text!r}") from None
    if not bits or any(not 2 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must lie in 2..8; got {text!r}")
    return bits


def _mse(quant: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((quant(x).double() - x.double()).pow(2).mean())


def _minmax(x: torch.Tensor, bits: int) -> FrozenAffineQuant:
    qmin, qmax = int_range(bits, signed=False)
    lo, hi = torch.aminmax(x)
    scale, zero_point = qparams_from_minmax(lo.reshape(1), hi.reshape(1), qmin, qmax)
    return FrozenAffineQuant(scale, zero_point, qmin, qmax)


def ltsq_form_rows(records: dict[str, SiteRecord], bits_list: list[int]) -> list[dict[str, Any]]:
    """Per layer, site and bit width: the MSE of min/max and of both LtSQ forms, calibrated and
    measured on the recorded values (the bounded sample plus the exact extremes, as the error table
    of :func:`qmamba_ao.analysis.quantization_error_table` does), and the log2 form's choice."""
    rows = []
    for name, rec in records.items():
        for site, vs in (("dA", rec.dA), ("dBu", rec.dBu)):
            if vs.count == 0:
                continue
            x = torch.cat([vs.sample, torch.tensor([vs.min, vs.max])])
            size = max(x.numel(), 4096)  # the observers keep every value: their errors are exact
            for bits in bits_list:
                base = _mse(_minmax(x, bits), x)
                row: dict[str, Any] = {"layer": name, "site": site, "bits": bits, "minmax": base}
                for form in ("searched", "log2"):
                    obs = LtSQObserver(bits=bits, sample_size=size, form=form)
                    obs(x)
                    row[form] = _mse(obs.to_frozen(), x)
                    if form == "log2":
                        p = obs.transform_params()
                        row.update(log2_grid_alone=p["mse_log2"], log2_grid=p["grid"], median=p["median"])
                rows.append(row)
    return rows


def summarise_forms(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """``[site, bits, searched mean / worst ratio, log2 form mean / worst ratio, the log2 grid alone
    (on every layer) mean ratio, layers on which the log2 form kept its log2 grid]``."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["site"], r["bits"])].append(r)
    out = []
    for (site, bits), rs in groups.items():
        ratio = {f: [r[f] / r["minmax"] for r in rs] for f in ("searched", "log2", "log2_grid_alone")}
        log2_layers = sum(r["log2_grid"] == "log2" for r in rs)
        out.append(
            [
                site,
                bits,
                sum(ratio["searched"]) / len(rs),
                max(ratio["searched"]),
                sum(ratio["log2"]) / len(rs),
                max(ratio["log2"]),
                sum(ratio["log2_grid_alone"]) / len(rs),
                f"{log2_layers}/{len(rs)}",
            ]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="vim_fmnist", help="the shipped model to measure")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="a Fashion-MNIST folder (default: the installed one)")
    ap.add_argument(
        "--figure",
        default=None,
        help=f"where to draw the sites (default: {DEFAULT_FIGURE} for vim_fmnist, none for other models; '' for none)",
    )
    ap.add_argument("--json")
    ap.add_argument(
        "--ltsq-forms",
        action="store_true",
        help="compare LtSQ's searched and log2 forms on dA and dBu (instead of the error tables)",
    )
    ap.add_argument("--form-bits", type=_bit_list, default=[4, 6, 8], help="bit widths of --ltsq-forms (4,6,8)")
    args = ap.parse_args()
    model = timm.create_model(args.model, pretrained=True).eval()
    x, _ = load_split(args.data or "fashion-mnist", "train", args.images, args.seed, model)
    if args.ltsq_forms:
        records = collect_sites(model, x, max_h_layers=0)
        rows = ltsq_form_rows(records, args.form_bits)
        print(f"{args.model}, {args.images} training images (seed {args.seed}), {len(records)} scans")
        print(
            "LtSQ forms per layer (MSE; log2_grid_alone: the log2 grid on every layer; log2_grid: the grid the "
            "log2 form kept; median: of the calibration values):"
        )
        print(format_table(rows))
        summary = summarise_forms(rows)
        print("\nMean (and worst) over the scans of MSE / min-max MSE, lower is better:")
        headers = ["site", "bits", "searched", "worst", "log2 form", "worst", "log2 grid alone", "log2 grid kept"]
        print(tabulate(summary, headers=headers, floatfmt=".3f"))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "ltsq_forms": rows, "summary": summary}, fh, indent=1, default=float)
        return
    records = collect_sites(model, x)
    stats = site_statistics(records)
    print("Distribution statistics per scan (float model):")
    print(format_table(stats))
    rows = quantization_error_table(records, bits=args.bits, num_groups=args.groups)
    print(f"\nQuantization MSE at {args.bits} bits, relative to min/max (lower is better), per layer:")
    print(format_table(rows))
    agg: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        agg[(r["site"], r["method"])].append(r["rel_to_minmax"])
    summary = [[s, m, sum(v) / len(v), max(v)] for (s, m), v in agg.items()]
    print(f"\nMean over the {len(records)} scans (MSE / min-max MSE):")
    print(tabulate(summary, headers=["site", "method", "mean ratio", "worst ratio"], floatfmt=".3f"))
    figure = args.figure if args.figure is not None else (DEFAULT_FIGURE if args.model == "vim_fmnist" else "")
    if figure:
        print(f"figure: {plot_sites(records, figure)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"args": vars(args), "statistics": stats, "errors": rows, "summary": summary},
                fh,
                indent=1,
                default=float,
            )


if __name__ == "__main__":
    main()
