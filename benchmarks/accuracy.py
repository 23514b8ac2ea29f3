"""Accuracy of every recipe and bit width on the Fashion-MNIST Vim, as one table.

    python benchmarks/accuracy.py [--recipes qmamba,minmax,...] [--bits w8a8,w6a6,w4a8,w4a4]
                                  [--calib-size 256] [--eval-size 10000] [--seed 0] [--json out.json]

Calibration images come from the training split (seeded choice), evaluation from the test split
(the first ``--eval-size`` images). The float model is the first row. ``--ablation`` also runs
QMamba's h-feedback switch.
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch
from tabulate import tabulate

import qmamba_ao
import qmamba_ao.models  # noqa: F401
from qmamba_ao.data import fashion_mnist, stack_subset
from qmamba_ao.ptq import evaluate


def parse_bits(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        w, a = item.strip().lower().lstrip("w").split("a")
        out.append((int(w), int(a)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vim_fmnist")
    ap.add_argument("--recipes", default=",".join(qmamba_ao.list_recipes()))
    ap.add_argument("--bits", default="w8a8,w6a6,w4a8,w4a4")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None)
    ap.add_argument("--h-feedback", choices=["on", "off"], default="on")
    ap.add_argument("--json")
    args = ap.parse_args()

    model = timm.create_model(args.model, pretrained=True).eval()
    train, test = fashion_mnist(True, args.data), fashion_mnist(False, args.data)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.calib_size]
    xc, _ = stack_subset(train, idx)
    xe, ye = stack_subset(test, torch.arange(min(args.eval_size, len(test))))
    calib = list(xc.split(32))
    fp = evaluate(model, xe, ye, desc="fp")
    records = [{"recipe": "fp", "w_bits": 32, "a_bits": 32, "top1": fp["top1"], "top5": fp["top5"], "agree": 100.0}]
    for recipe in args.recipes.split(","):
        for w_bits, a_bits in parse_bits(args.bits):
            t0 = time.perf_counter()
            q = qmamba_ao.quantize(
                model, calib, recipe, w_bits, a_bits, progress=False, h_feedback=args.h_feedback == "on"
            )
            r = evaluate(q, xe, ye, desc=f"{recipe} w{w_bits}a{a_bits}")
            agree = 100.0 * (r["preds"] == fp["preds"]).float().mean().item()
            records.append({"recipe": recipe, "w_bits": w_bits, "a_bits": a_bits, "top1": r["top1"],
                            "top5": r["top5"], "agree": agree, "seconds": time.perf_counter() - t0})
            print(f"{recipe} w{w_bits}a{a_bits}: top1 {r['top1']:.2f}", flush=True)
    rows = [[r["recipe"], "fp32" if r["recipe"] == "fp" else f"W{r['w_bits']}A{r['a_bits']}", r["top1"], r["top5"],
             r["agree"]] for r in records]
    print(f"\n{args.model}: calibration {args.calib_size} train images (seed {args.seed}), "
          f"evaluation {len(xe)} test images, h_feedback {args.h_feedback}")
    print(tabulate(rows, headers=["recipe", "bits", "top-1 %", "top-5 %", "agree w/ fp %"], floatfmt=".2f",
                   tablefmt="github"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "records": records}, fh, indent=1)


if __name__ == "__main__":
    main()
