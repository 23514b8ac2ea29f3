"""Calibration + evaluation of vim_fmnist in one process and in several (gloo, this machine).

Each run builds the shipped vim_fmnist, calibrates a recipe on the seeded calibration subset and
evaluates the quantized model on the first test images; with several processes each one calibrates
and evaluates its share (qmamba_ao.distributed). Every process uses one thread, so the comparison
is one core against N cores (run it on an otherwise idle machine with at least N cores). Prints
both wall times, the speed-up, and checks that the top-1 values agree: identical for every recipe
whose statistics merge exactly, qmamba's sampled LtSQ statistics included (api.quantize_model tells
each process where its share starts); close for ``histogram`` (torch.ao's interpolating histogram).

    python benchmarks/distributed_speed.py                       # qmamba W4A4, 256 / 2000 images, 2 processes
    python benchmarks/distributed_speed.py --recipe minmax --processes 4
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=1800),
        )
    try:
        from qmamba_ao import api, distributed, ptq

        model = api.build_model("vim_fmnist")
        xc, _ = api.load_images(args.data, "train", args.calib_size, 0, model)
        xe, ye = api.load_images(args.data, "test", args.eval_size, 0, model)
        distributed.check_all_succeeded()  # start the clock together
        t0 = time.perf_counter()
        q = api.quantize_model(model, xc, args.recipe, args.bits[0], args.bits[1])
        t1 = time.perf_counter()
        r = ptq.evaluate(q, xe, ye, progress=False)
        distributed.check_all_succeeded()
        t2 = time.perf_counter()
        if rank == 0:
            torch.save({"calibrate": t1 - t0, "evaluate": t2 - t1, "top1": r["top1"], "preds": r["preds"]}, out)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        wall = time.perf_counter()
        mp.start_processes(_worker, args=(world, _free_port(), args, out), nprocs=world, start_method="spawn")
        result = torch.load(out, weights_only=False)
        result["wall"] = time.perf_counter() - wall
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="qmamba")
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--data", default="fashion-mnist")
    args = parser.parse_args()
    from qmamba_ao import api

    ((w, a),) = api.parse_bits(args.bits)
    args.bits = (w, a)
    one, many = run(1, args), run(args.processes, args)
    print(
        f"vim_fmnist {args.recipe} W{w}A{a}: {args.calib_size} calibration, {args.eval_size} test images, "
        "one thread per process"
    )
    print(f"{'processes':>9} {'calibrate s':>12} {'evaluate s':>11} {'total s':>8} {'top-1 %':>8}")
    for n, r in ((1, one), (args.processes, many)):
        total = r["calibrate"] + r["evaluate"]
        print(f"{n:>9} {r['calibrate']:>12.1f} {r['evaluate']:>11.1f} {total:>8.1f} {r['top1']:>8.2f}")
    speedup = (one["calibrate"] + one["evaluate"]) / (many["calibrate"] + many["evaluate"])
    agree = 100.0 * (one["preds"] == many["preds"]).float().mean().item()
    print(
        f"speed-up {speedup:.2f}x (calibrate {one['calibrate'] / many['calibrate']:.2f}x, "
        f"evaluate {one['evaluate'] / many['evaluate']:.2f}x); predictions agree on {agree:.2f} % of the images; "
        f"top-1 {'identical' if one['top1'] == many['top1'] else 'differs'} "
        f"({one['top1']:.2f} vs {many['top1']:.2f})"
    )


if __name__ == "__main__":
    main()
