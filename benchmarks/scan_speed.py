"""Forward time of the selective scan at Vim-T shapes: qmamba-ao's scan against simpler loops.

    python benchmarks/scan_speed.py [--batch 8 --dim 384 --state 16 --length 197 --repeats 10]

All implementations run in the same process, interleaved, so the ratios are robust to a noisy
machine. Rows: the plain loop (materialises dA and dBu for all steps and indexes time in a Python
loop, the textbook formulation, ``qmamba_ao.ssm.selective_scan_ref``), a step loop that forms dA and
dBu one step at a time (qmamba-ao's earlier formulation), and ``qmamba_ao.ssm.selective_scan`` with
each of its formulations (blocked step loop, the default; associative scan inside each block), and
the default with a hook attached, the path calibration and converted models take (its decay is
``exp`` instead of ``exp2``, see ``qmamba_ao.ssm.functional.LOG2E``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from qmamba_ao.ssm import ScanHooks, functional, selective_scan, selective_scan_ref


def step_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """One time step per iteration, dA_t and dBu_t formed inside the loop (one group)."""
    delta = F.softplus(delta + delta_bias[None, :, None]) if delta_softplus else delta + delta_bias[None, :, None]
    b, d, length = u.shape
    Bt, Ct = B[:, 0].permute(2, 0, 1).contiguous(), C[:, 0].permute(2, 0, 1).contiguous()  # L b N
    du = delta * u
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.addcmul(du[:, :, t, None] * Bt[t, :, None], torch.exp(delta[:, :, t, None] * A), h)
        ys.append(torch.einsum("bdn,bn->bd", h, Ct[t]))
    return (torch.stack(ys, -1) + u * D[None, :, None]) * F.silu(z)


def with_method(method):
    def run(**kw):
        functional.set_scan_method(method)
        return selective_scan(**kw)

    return run


def hooked(**kw):
    """The path quantized models take: any hook (here an identity on ``y``) keeps the exp decay."""
    return selective_scan(**kw, hooks=ScanHooks(y=lambda y: y))


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
    impls = {
        "plain loop (reference)": selective_scan_ref,
        "step loop (dA per step)": step_loop,
        "selective_scan, blocked loop": with_method("loop"),
        "selective_scan, parallel": with_method("parallel"),
        "selective_scan, hooked (exp decay)": hooked,
    }
    times: dict[str, list[float]] = {k: [] for k in impls}
    with torch.inference_mode():
        out = {k: f(**inputs, delta_softplus=True) for k, f in impls.items()}  # warm-up
        for _ in range(args.repeats):
            for k, f in impls.items():
                t0 = time.perf_counter()
                f(**inputs, delta_softplus=True)
                times[k].append(time.perf_counter() - t0)
    functional.set_scan_method("auto")
    ref = out["plain loop (reference)"]
    errs = {k: (v - ref).abs().max().item() for k, v in out.items()}
    base = statistics.median(times["plain loop (reference)"])
    step = statistics.median(times["step loop (dA per step)"])
    rows = [
        [k, statistics.median(v) * 1e3, min(v) * 1e3, base / statistics.median(v), step / statistics.median(v), errs[k]]
        for k, v in times.items()
    ]
    print(f"shape: batch {b}, dim {d}, N {n}, L {length}; threads {torch.get_num_threads()}; fp32 forward")
    headers = ["implementation", "median ms", "min ms", "x plain loop", "x step loop", "max |diff|"]
    print(tabulate(rows, headers=headers, floatfmt=("", ".1f", ".1f", ".2f", ".2f", ".1e")))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": [b, d, n, length], "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
