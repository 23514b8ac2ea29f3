"""Speed of the quantization simulation relative to the float model, measured in one run.

    python benchmarks/sim_speed.py [--recipe qmamba --bits w4a4 --batch 32 --repeats 5]

For the same model and batch it times: the float forward, the calibration forward (prepared model
with observers) and the converted model's forward; it prints each relative to float. Uses the
packaged Fashion-MNIST Vim when its weights are present (random weights otherwise: speed does not
depend on them) and random input of its shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
from tabulate import tabulate

import qmamba_ao
import qmamba_ao.models  # noqa: F401


def _time(fn, x, repeats: int) -> list[float]:
    ts = []
    with torch.inference_mode():
        fn(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    return ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vim_fmnist")
    ap.add_argument("--recipe", default="qmamba")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    w_bits, a_bits = (int(v) for v in args.bits.lstrip("w").split("a"))
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(args.batch, *cfg.get("input_size", (1, 28, 28)))
    prepared = qmamba_ao.prepare(model, (x[:1],), args.recipe, w_bits, a_bits)
    calibrated = qmamba_ao.prepare(model, (x[:1],), args.recipe, w_bits, a_bits)
    qmamba_ao.calibrate(calibrated, [x], progress=False)
    converted = qmamba_ao.convert(calibrated, reference=True)  # what quantize() returns by default
    runs = {"float": model, "calibration (observers)": prepared, "converted": converted}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so machine noise hits all three alike
        for k, m in runs.items():
            times[k] += _time(m, x, 1)
    base = statistics.median(times["float"])
    rows = [[k, statistics.median(v) * 1e3, statistics.median(v) / base] for k, v in times.items()]
    print(
        f"model {args.model}, recipe {args.recipe} {args.bits}, batch {args.batch}, threads {torch.get_num_threads()}"
    )
    print(tabulate(rows, headers=["forward", "median ms", "x float"], floatfmt=".2f"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
