"""Measure the scan sites of the trained Fashion-MNIST Vim and each quantizer's error on them.

    python benchmarks/site_error.py [--images 64 --bits 4 --figure docs/figures/sites.png --json out.json]

Collects dA, dBu and h from the float ``vim_fmnist`` on Fashion-MNIST *training* images (seeded
choice), prints the per-layer distribution statistics, and the MSE of every quantizer calibrated
and evaluated on those tensors (relative to min/max). These are the numbers in docs/method.md.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import timm
import torch
from tabulate import tabulate

import qmamba_ao.models  # noqa: F401
from qmamba_ao.analysis import collect_sites, format_table, plot_sites, quantization_error_table, site_statistics
from qmamba_ao.data import fashion_mnist, stack_subset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None)
    ap.add_argument("--figure", default="docs/figures/sites.png")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = timm.create_model("vim_fmnist", pretrained=True).eval()
    train = fashion_mnist(train=True, path=args.data)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.images]
    x, _ = stack_subset(train, idx)
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
    if args.figure:
        print(f"figure: {plot_sites(records, args.figure)}")
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
