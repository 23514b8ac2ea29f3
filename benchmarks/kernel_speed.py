"""The torch kernel timings behind three choices of the scan and of LtSQ, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/kernel_speed.py [--repeats 20]

1. ``exp`` against ``exp2`` on one block of decays at Vim-T shape (5 steps x batch 8 x dim 384 x
   N 16): why scans without hooks form the decay with ``exp2`` (``qmamba_ao.ssm.functional.LOG2E``).
2. ``log1p`` / ``expm1`` / ``softplus`` in a fresh interpreter that has not imported qmamba_ao,
   before and after one 64-element ``pow``: why the package runs that ``pow`` at import
   (``qmamba_ao._utils.warm_vector_math``); also whether the results are bit for bit the same.
3. LtSQ's fixed quantizer on that block: the in-place eager path against ``torch.compile`` of the
   same chain of operations as one graph (first-call compile time reported apart; "same values"
   compares with the eager path): why no compile option exists.
4. The power kind's two ``pow`` calls written as ``exp2(p * log2(.))`` instead: faster, but not the
   same values (share of elements whose quantized value differs), which is why LtSQ keeps ``pow``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from tabulate import tabulate

# Runs in a child interpreter: torch only, so nothing has run a vectorised pow before the "cold" row.
_FRESH = r"""
import statistics, sys, time, torch
import torch.nn.functional as F
torch.set_num_threads(1)
repeats = int(sys.argv[1])
x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 4
ops = {"log1p": lambda v: torch.log1p(v.abs()), "expm1": torch.expm1, "softplus": F.softplus}
def ms(f):
    f(x); ts = []
    for _ in range(repeats):
        t = time.perf_counter(); f(x); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
cold = {k: (ms(f), f(x)) for k, f in ops.items()}
torch.pow(torch.linspace(0.5, 1.5, 64), 0.37)
for k, f in ops.items():
    print(k, cold[k][0], ms(f), int(torch.equal(cold[k][1], f(x))))
"""


def _ms(fn, *args, repeats: int) -> float:
    fn(*args)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    r = args.repeats

    out = subprocess.run([sys.executable, "-c", _FRESH, str(r)], capture_output=True, text=True, check=True).stdout
    rows = [
        [k, float(c), float(w), float(c) / float(w), bool(int(e))]
        for k, c, w, e in (ln.split() for ln in out.split("\n") if ln)
    ]
    print("fresh interpreter, 2^20 float32 elements, one thread")
    print(tabulate(rows, headers=["op", "before pow ms", "after pow ms", "x", "same values"], floatfmt=".2f"))

    import qmamba_ao  # noqa: F401  (the warm-up runs here)
    from qmamba_ao.observers.ltsq import FrozenLtSQ, ltsq_inverse, ltsq_transform
    from qmamba_ao.ssm.functional import LOG2E

    g = torch.Generator().manual_seed(0)
    delta = torch.nn.functional.softplus(torch.randn(5, 8, 384, 1, generator=g) - 2.0)
    A = -torch.arange(1, 17.0).repeat(384, 1)
    A2 = A * LOG2E
    with torch.inference_mode():
        t_exp = _ms(lambda: torch.exp(delta * A), repeats=r)
        t_exp2 = _ms(lambda: torch.exp2(delta * A2), repeats=r)
    print("\ndecay of one block (5, 8, 384, 16), multiply included")
    print(
        tabulate(
            [["exp", t_exp, 1.0], ["exp2", t_exp2, t_exp / t_exp2]], headers=["kernel", "ms", "x exp"], floatfmt=".3f"
        )
    )

    x = torch.exp(delta * A)  # a block of decays in (0, 1)
    s, inv = 0.07, 1.0 / 0.07
    scale, zero = torch.tensor(s), torch.tensor(0)
    rows = []
    for kind, p in (("unit_power", 0.37), ("unit_log", 0.05)):
        frozen = FrozenLtSQ(kind, p, scale, zero, 0, 15)
        pt = torch.tensor(p)

        def chain(v, kind=kind, pt=pt):
            # the affine step written out with Python scalars: one graph, no break at .item()
            q = torch.clamp(torch.round(ltsq_transform(v, kind, pt) * inv), 0, 15) * s
            return ltsq_inverse(q, kind, pt)

        compiled = torch.compile(chain, dynamic=True)
        with torch.inference_mode():
            t0 = time.perf_counter()
            same = torch.equal(compiled(x), frozen(x))
            compile_s = time.perf_counter() - t0
            rows.append([kind, _ms(frozen, x, repeats=r), _ms(compiled, x, repeats=r), compile_s, same])
    print("\nLtSQ fixed quantizer (4 bits) on that block")
    print(
        tabulate(
            rows, headers=["kind", "eager in-place ms", "compiled ms", "first call s", "same values"], floatfmt=".3f"
        )
    )

    p = 0.37
    frozen = FrozenLtSQ("unit_power", p, scale, zero, 0, 15)

    def exp2_form(v):
        t = torch.rsub(v, 1.0).clamp_(min=0.0).log2_().mul_(p).exp2_()
        t.mul_(inv).round_().clamp_(0, 15).mul_(s)
        return t.log2_().mul_(1.0 / p).exp2_().neg_().add_(1.0)

    with torch.inference_mode():
        t_pow, t_exp2 = _ms(frozen, x, repeats=r), _ms(exp2_form, x, repeats=r)
        differ = (exp2_form(x) != frozen(x)).float().mean().item() * 100
    print("\nLtSQ unit_power (4 bits) on that block: pow against exp2(p * log2(.))")
    print(
        tabulate(
            [["pow (used)", t_pow, 1.0, 0.0], ["exp2 / log2", t_exp2, t_pow / t_exp2, differ]],
            headers=["form", "ms", "x pow", "% values differing"],
            floatfmt=".3f",
        )
    )


if __name__ == "__main__":
    main()
