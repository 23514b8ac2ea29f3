"""Speed of the quantization simulation relative to the float model, measured in one run.

    python benchmarks/sim_speed.py [--recipe qmamba --bits w4a4 --batch 32 --repeats 5]

For the same model and batch it times: the float forward, the calibration forward (prepared model
with observers) and the converted model's forward; it prints each relative to float. Uses the
packaged Fashion-MNIST Vim when its weights are present (random weights otherwise: speed does not
depend on them) and random input of its shape.

``--sites`` also prints where the quantized forwards spend their time: one more forward of the
calibration and of the converted model with timing hooks on the scans' site quantizers and the
activation observers, summed by site and quantizer type (the converted model quantizes its
activations with graph ops, not modules: they are not in its table).
"""

from __future__ import annotations

import argparse
import collections
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


def site_times(model: torch.nn.Module, x: torch.Tensor) -> list[list]:
    """Milliseconds per quantizer type and site in one forward (hooks around each quantizer module)."""
    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    started: dict[int, float] = {}
    handles = []
    for name, mod in model.named_modules():
        scan_site = ".site_modules." in name
        if not scan_site and not name.rpartition(".")[2].startswith("activation_post_process"):
            continue
        key = f"{type(mod).__name__} ({'scan site ' + name.rpartition('.')[2] if scan_site else 'activations'})"

        def pre(m, inp):
            started[id(m)] = time.perf_counter()

        def post(m, inp, out, key=key):
            spent[key] += time.perf_counter() - started[id(m)]
            calls[key] += 1

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x)
        total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    rows = [[k, v * 1e3, calls[k]] for k, v in sorted(spent.items(), key=lambda kv: -kv[1])]
    return rows + [["whole forward", total * 1e3, 1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vim_fmnist")
    ap.add_argument("--recipe", default="qmamba")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sites", action="store_true", help="also time the quantizers per site")
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
    if args.sites:
        for label, m in (("calibration", prepared), ("converted", converted)):
            print(f"\n{label} forward, time inside the quantizers")
            print(tabulate(site_times(m, x), headers=["quantizer (site)", "ms", "calls"], floatfmt=".1f"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
