"""The README results tables: every recipe x bit width, the LtSQ/TGQ ablation, the h-feedback switch,
and the accuracy targets checked against them.

    python benchmarks/accuracy.py [--models vim_fmnist,vmamba_fmnist] [--bits w8a8,w6a6,w4a8,w4a4]
                                  [--calib-size 256] [--eval-size 10000] [--seed 0] [--json out.json]
    python benchmarks/accuracy.py --report out.json      # the tables again, from a saved run

Calibration images: a seeded subset of the training split; evaluation: the first ``--eval-size``
images of the test split (all 10,000 by default). Uses ``qmamba_ao.api.compare``, as ``qmamba-ao compare`` does, with
the library's default options (hidden-state feedback off); QMamba with feedback on is an extra table.
Calibration only: every recipe runs with ``reconstruct=False``, so ``ptq4vm`` / ``ptq4vm-naive-ssm`` run
without their JLSS here (``ptq4vm`` then equals ``ptq4vm-closed-form``) and the ablation compares like with
like; the reconstructed rows are ``benchmarks/low_bit.py``'s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qmamba_ao import list_recipes
from qmamba_ao.api import atomic_write, build_model, compare, format_compare, parse_bits
from qmamba_ao.data import load_split

ABLATION = {  # (LtSQ, TGQ) -> recipe; ptq4vm-naive-ssm is qmamba with neither (same linears, uniform scan)
    (False, False): "ptq4vm-naive-ssm",
    (True, False): "qmamba-ltsq-only",
    (False, True): "qmamba-tgq-only",
    (True, True): "qmamba",
}
#: Recipes that quantize the same sites as QMamba (the scan included): the W4A4 comparison set.
SAME_SITES = ("minmax", "percentile", "histogram", "ptq4vm-naive-ssm", "quamba")
#: (bits, allowed drop of QMamba's top-1 below float, in points)
TARGETS = (("w8a8", 0.3), ("w6a6", 1.0), ("w4a4", 5.0))


def _row(records: list[dict[str, Any]], recipe: str, bits: str) -> dict[str, Any] | None:
    ((w, a),) = parse_bits(bits)
    return next((r for r in records if r["recipe"] == recipe and (r["w_bits"], r["a_bits"]) == (w, a)), None)


def check_targets(records: list[dict[str, Any]]) -> list[str]:
    """One line per target: met or missed, by how much (recorded whatever the outcome)."""
    fp = records[0]["top1"]
    lines = []
    for bits, drop in TARGETS:
        q = _row(records, "qmamba", bits)
        if q is None:
            continue
        gap = fp - q["top1"]
        verdict = "met" if gap <= drop else f"MISSED by {gap - drop:.2f} points"
        lines.append(
            f"qmamba {bits.upper()}: {q['top1']:.2f} vs float {fp:.2f} (drop {gap:.2f}, target <= {drop}) {verdict}"
        )
    q = _row(records, "qmamba", "w4a4")
    if q is not None:
        rivals = [r for r in (_row(records, b, "w4a4") for b in SAME_SITES) if r is not None]
        if rivals:
            best = max(rivals, key=lambda r: r["top1"])
            lead = q["top1"] - best["top1"]
            verdict = "met" if lead > 0 else f"MISSED: {best['recipe']} is {-lead:.2f} points ahead"
            lines.append(
                f"qmamba W4A4 ahead of every same-site baseline ({', '.join(r['recipe'] for r in rivals)}): "
                f"best baseline {best['recipe']} {best['top1']:.2f}, lead {lead:+.2f} {verdict}"
            )
    return lines


def matrix(records: list[dict[str, Any]], bits: list[tuple[int, int]], label: str = "") -> list[str]:
    """Markdown rows ``| recipe | top-1 (agreement with float) per bit width |`` (the README form)."""
    lines = []
    for recipe in dict.fromkeys(r["recipe"] for r in records if r["recipe"] != "fp"):
        cells = []
        for w, a in bits:
            r = _row(records, recipe, f"w{w}a{a}")
            cells.append("–" if r is None else f"{r['top1']:.2f} ({r['agree']:.1f})")
        lines.append(f"| `{recipe}`{label} | " + " | ".join(cells) + " |")
    return lines


def _head(name: str, calib: int, seed: int, images: int) -> str:
    return f"{name}: calibration {calib} train images (seed {seed}), evaluation {images} test images"


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(name, None)
    xc, _ = load_split(args.data, "train", args.calib_size, args.seed, model)
    xe, ye = load_split(args.data, "test", args.eval_size, args.seed, model)
    head = _head(name, len(xc), args.seed, len(xe))
    bits = parse_bits(args.bits)
    calib_only = {"reconstruct": False}
    main_rows = compare(model, xc, xe, ye, args.recipes.split(","), bits, calib_only)
    print(f"\n## {head}\n{format_compare(main_rows)}", flush=True)
    missing = [(r, w, a) for r in ABLATION.values() for w, a in bits if _row(main_rows, r, f"w{w}a{a}") is None]
    extra = [compare(model, xc, xe, ye, [r], [(w, a)], calib_only)[1] for r, w, a in missing]
    feedback_rows = compare(model, xc, xe, ye, ["qmamba"], bits, {"h_feedback": True, **calib_only})[1:]
    result = {"model": name, "head": head, "bits": args.bits, "recipes": main_rows, "ablation_extra": extra}
    result.update(h_feedback_on=feedback_rows, targets=check_targets(main_rows))
    report(result)
    return result


def report(result: dict[str, Any]) -> None:
    """Print the README tables of one model's results (also from a saved ``--json``)."""
    name, bits, main_rows = result["model"], parse_bits(result["bits"]), result["recipes"]
    header = "| recipe | " + " | ".join(f"W{w}A{a}" for w, a in bits) + " |\n|---|" + "---|" * len(bits)
    print(f"\n## {result['head']}\ntop-1 % (agreement with float %), float {main_rows[0]['top1']:.2f} %\n{header}")
    print("\n".join(matrix(main_rows, bits) + matrix(result["h_feedback_on"], bits, ", `h_feedback=True`")))

    print(f"\n## {name}: ablation (top-1 %)")
    print("| LtSQ | TGQ | recipe | " + " | ".join(f"W{w}A{a}" for w, a in bits) + " |")
    print("|---|---|---|" + "---|" * len(bits))
    rows = main_rows + result["ablation_extra"]
    for (ltsq, tgq), recipe in ABLATION.items():
        cells = [f"{_row(rows, recipe, f'w{w}a{a}')['top1']:.2f}" for w, a in bits]
        print(f"| {'✓' if ltsq else '–'} | {'✓' if tgq else '–'} | `{recipe}` | " + " | ".join(cells) + " |")
    print(f"\n## {name}: targets\n" + "\n".join(result["targets"]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vim_fmnist", help="comma-separated timm names with packaged weights")
    ap.add_argument("--recipes", default=",".join(list_recipes()))
    ap.add_argument("--bits", default="w8a8,w6a6,w4a8,w4a4")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--report", metavar="JSON", help="print the tables of a saved --json file instead of running")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        run = saved["args"]
        for result in saved["results"]:
            result.setdefault("bits", run["bits"])
            result.setdefault("ablation_extra", [])
            result.setdefault("head", _head(result["model"], run["calib_size"], run["seed"], run["eval_size"]))
            report(result)
        return
    results = [run_model(name.strip(), args) for name in args.models.split(",")]
    if args.json:
        payload = json.dumps({"args": vars(args), "results": results}, indent=1)
        atomic_write(Path(args.json), lambda p: p.write_text(payload))


if __name__ == "__main__":
    main()
