"""Reconstruction on one model: calibrated vs reconstructed top-1, per-unit losses, time; a learning-rate sweep.

    OMP_NUM_THREADS=1 python benchmarks/reconstruct_sweep.py --model vim_fmnist [--bits 4] [--lrs 0.015]
        [--iters 200] [--calib-size 256] [--eval-size 1000] [--checkpoint held_out.pth]

``--checkpoint``: a held-out model written by ``examples/train_fmnist.py --arch ...`` (see
``benchmarks/robustness.py``); without it, the packaged ``--model``. One thread gives the time the
README's 10-minute budget refers to.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from qmamba_ao import reconstruct
from qmamba_ao.api import build_model
from qmamba_ao.data import load_split
from qmamba_ao.ptq import convert, evaluate, prepare_calibrated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vim_fmnist")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--recipe", default="qmamba")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--lrs", default="0.015")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--data", default="fashion-mnist")
    args = ap.parse_args()
    if args.checkpoint is not None:
        from robustness import held_out_model

        model, _ = held_out_model(args.checkpoint)
    else:
        model = build_model(args.model, None)
    xc, _ = load_split(args.data, "train", args.calib_size, 0, model)
    xe, ye = load_split(args.data, "test", args.eval_size, 0, model)
    batches = list(xc.split(32))
    print(f"threads {torch.get_num_threads()}, {len(xc)} calibration images, {len(xe)} test images")
    fp = evaluate(model, xe, ye, progress=False)["top1"]
    t0 = time.perf_counter()
    prepared = prepare_calibrated(model, batches, args.recipe, args.bits, args.bits, progress=False)
    calib_s = time.perf_counter() - t0
    base = evaluate(convert(copy.deepcopy(prepared), reference=True), xe, ye, progress=False)["top1"]
    print(f"float {fp:.2f}; {args.recipe} W{args.bits}A{args.bits} calibrated {base:.2f} ({calib_s:.1f} s)")
    for lr in (float(v) for v in args.lrs.split(",")):
        p = copy.deepcopy(prepared)
        report = reconstruct(p, batches, iters=args.iters, lr=lr, progress=False)
        top1 = evaluate(convert(p, reference=True), xe, ye, progress=False)["top1"]
        print(f"\nlr {lr:g}: reconstructed {top1:.2f} (reconstruction {report.seconds:.0f} s)\n{report.table()}")


if __name__ == "__main__":
    main()
