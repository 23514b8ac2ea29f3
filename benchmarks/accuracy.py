"""The README results tables: every recipe x bit width, the LtSQ/TGQ ablation, the h-feedback switch.

    python benchmarks/accuracy.py [--model vim_fmnist] [--bits w8a8,w6a6,w4a8,w4a4]
                                  [--calib-size 256] [--eval-size 10000] [--seed 0] [--json out.json]

Calibration images: a seeded subset of the training split; evaluation: the first ``--eval-size``
images of the test split. Uses the same code as ``qmamba-ao compare``.
"""

from __future__ import annotations

import argparse
import json

from qmamba_ao.cli import build_model, format_compare, parse_bits, run_compare
from qmamba_ao.data import load_split
from qmamba_ao.qconfig import list_recipes

ABLATION = {  # (LtSQ, TGQ) -> recipe
    (False, False): "percentile",
    (True, False): "qmamba-ltsq-only",
    (False, True): "qmamba-tgq-only",
    (True, True): "qmamba",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vim_fmnist")
    ap.add_argument("--recipes", default=",".join(list_recipes()))
    ap.add_argument("--bits", default="w8a8,w6a6,w4a8,w4a4")
    ap.add_argument("--ablation-bits", default="w4a4")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--json")
    args = ap.parse_args()

    model = build_model(args.model, None)
    xc, _ = load_split(args.data, "train", args.calib_size, args.seed, model)
    xe, ye = load_split(args.data, "test", args.eval_size, args.seed, model)
    head = f"{args.model}: calibration {len(xc)} train images (seed {args.seed}), evaluation {len(xe)} test images"

    main_rows = run_compare(model, xc, xe, ye, args.recipes.split(","), parse_bits(args.bits), {"h_feedback": True})
    print(f"\n## Recipes\n{head}\n{format_compare(main_rows)}")

    ab_bits = parse_bits(args.ablation_bits)
    by_key = {(r["recipe"], r["w_bits"], r["a_bits"]): r for r in main_rows}
    print(f"\n## Ablation ({args.ablation_bits})")
    print("| LtSQ | TGQ | recipe | top-1 % | agree w/ fp % |\n|---|---|---|---|---|")
    for (ltsq, tgq), recipe in ABLATION.items():
        for w, a in ab_bits:
            r = (
                by_key.get((recipe, w, a))
                or run_compare(model, xc, xe, ye, [recipe], [(w, a)], {"h_feedback": True})[1]
            )
            on = {True: "on", False: "off"}
            print(f"| {on[ltsq]} | {on[tgq]} | {recipe} | {r['top1']:.2f} | {r['agree']:.2f} |")

    feedback_rows = run_compare(model, xc, xe, ye, ["qmamba"], parse_bits(args.bits), {"h_feedback": False})[1:]
    print("\n## QMamba with h_feedback off (quantized state feeds only the read-out)")
    print(format_compare(main_rows[:1] + feedback_rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "recipes": main_rows, "h_feedback_off": feedback_rows}, fh, indent=1)


if __name__ == "__main__":
    main()
