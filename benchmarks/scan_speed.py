"""Forward time of the selective scan at Vim-T shapes: qmamba-ao's scan against a plain loop.

    python benchmarks/scan_speed.py [--batch 8 --dim 384 --state 16 --length 197 --repeats 10]

Both implementations run in the same process, interleaved, so the ratio is robust to a noisy
machine. The plain loop materialises dA and dBu for all steps and indexes time in a Python loop
(the textbook reference formulation, ``qmamba_ao.ssm.selective_scan_ref``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tabulate import tabulate

from qmamba_ao.ssm import selective_scan, selective_scan_ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--length", type=int, default=197)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    b, d, n, length = args.batch, args.dim, args.state, args.length
    inputs = dict(
        u=torch.randn(b, d, length, generator=g),
        delta=torch.randn(b, d, length, generator=g),
        A=-torch.exp(torch.log(torch.arange(1, n + 1.0)).repeat(d, 1)),
        B=torch.randn(b, 1, n, length, generator=g),
        C=torch.randn(b, 1, n, length, generator=g),
        D=torch.ones(d),
        z=torch.randn(b, d, length, generator=g),
        delta_bias=torch.full((d,), -4.0),
    )
    impls = {"plain loop (reference)": selective_scan_ref, "qmamba_ao.ssm.selective_scan": selective_scan}
    times: dict[str, list[float]] = {k: [] for k in impls}
    with torch.inference_mode():
        out = {k: f(**inputs, delta_softplus=True) for k, f in impls.items()}  # warm-up
        for _ in range(args.repeats):
            for k, f in impls.items():
                t0 = time.perf_counter()
                f(**inputs, delta_softplus=True)
                times[k].append(time.perf_counter() - t0)
    err = (out["qmamba_ao.ssm.selective_scan"] - out["plain loop (reference)"]).abs().max().item()
    base = statistics.median(times["plain loop (reference)"])
    rows = [[k, statistics.median(v) * 1e3, min(v) * 1e3, base / statistics.median(v)] for k, v in times.items()]
    print(f"shape: batch {b}, dim {d}, N {n}, L {length}; threads {torch.get_num_threads()}; fp32 forward")
    print(tabulate(rows, headers=["implementation", "median ms", "min ms", "speed-up"], floatfmt=".1f"))
    print(f"max |difference| between the two: {err:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": [b, d, n, length], "rows": rows, "max_abs_diff": err}, fh, indent=1)


if __name__ == "__main__":
    main()
