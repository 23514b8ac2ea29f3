"""QMamba against the uniform same-site baseline on models trained with other configurations.

    python benchmarks/robustness.py --checkpoint vim50.pth [--bits w8a8,w6a6,w4a4] [--eval-size 1000]
                                    [--reconstruct-bits w4a4] [--json out.json]

``--checkpoint``: a file written by ``examples/train_fmnist.py`` with ``--arch`` overrides (its
``.json`` log beside it names the timm model and the overrides), e.g. the two held-out models README
names (they are not shipped; the commands to train them are in README). Calibration: 256 training
images (seed 0); evaluation: the first ``--eval-size`` test images.

For every bit width: ``ptq4vm-naive-ssm`` without reconstruction (uniform scan sites) and ``qmamba``
(LtSQ + TGQ), and at ``--reconstruct-bits`` the same two reconstructed (``ptq4vm-naive-ssm`` with its
JLSS, ``qmamba --reconstruct``). The check: ``qmamba`` is never behind the uniform baseline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import timm

from qmamba_ao.api import atomic_write, build_model, compare, load_checkpoint, parse_bits
from qmamba_ao.data import load_split

#: the packaged model whose input configuration (size, channels, mean / std) a family's held-out models share
_FAMILY_CFG = {"vim": "vim_fmnist", "vmamba": "vmamba_fmnist"}


def held_out_model(checkpoint: Path) -> Any:
    """The timm model of a training log beside ``checkpoint``, with the Fashion-MNIST input config."""
    log = json.loads(checkpoint.with_suffix(".json").read_text())["config"]
    model = timm.create_model(log["model"], **log["overrides"])
    family = "vmamba" if "vmamba" in log["model"] else "vim"
    model.pretrained_cfg = build_model(_FAMILY_CFG[family], None).pretrained_cfg
    return load_checkpoint(model, checkpoint).eval(), log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--bits", default="w8a8,w6a6,w4a4")
    ap.add_argument("--reconstruct-bits", default="w4a4")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--json")
    args = ap.parse_args()
    model, log = held_out_model(args.checkpoint)
    xc, _ = load_split(args.data, "train", args.calib_size, args.seed, model)
    xe, ye = load_split(args.data, "test", args.eval_size, args.seed, model)
    print(f"{args.checkpoint.name}: {log['model']} {log['overrides']}")
    bits = parse_bits(args.bits)
    rec_bits = parse_bits(args.reconstruct_bits) if args.reconstruct_bits else []
    first = compare(model, xc, xe, ye, ["ptq4vm-naive-ssm"], bits, {"reconstruct": False})
    fp = first[0]["top1"]

    def by_bits(records: list[dict[str, Any]]) -> dict[tuple[int, int], float]:
        return {(r["w_bits"], r["a_bits"]): r["top1"] for r in records}

    groups = {
        "uniform": by_bits(first[1:]),
        "qmamba": by_bits(compare(model, xc, xe, ye, ["qmamba"], bits, {})[1:]),
        "uniform_rec": by_bits(compare(model, xc, xe, ye, ["ptq4vm-naive-ssm"], rec_bits, {})[1:]) if rec_bits else {},
        "qmamba_rec": by_bits(compare(model, xc, xe, ye, ["qmamba"], rec_bits, {"reconstruct": True})[1:])
        if rec_bits
        else {},
    }
    print(f"float {fp:.2f} % on {len(xe)} test images")
    print("| bits | uniform scan | qmamba | lead | ptq4vm-naive-ssm (JLSS) | qmamba + reconstruction | lead |")
    print("|---|---|---|---|---|---|---|")
    for wa in bits:
        cells = []
        for base, ours in (("uniform", "qmamba"), ("uniform_rec", "qmamba_rec")):
            if wa in groups[base] and wa in groups[ours]:
                u, q = groups[base][wa], groups[ours][wa]
                cells += [f"{u:.2f}", f"{q:.2f}", f"{q - u:+.2f}"]
            else:
                cells += ["–", "–", "–"]
        print(f"| W{wa[0]}A{wa[1]} | " + " | ".join(cells) + " |")
    rows = {"float": fp, **{k: {f"w{w}a{a}": v for (w, a), v in g.items()} for k, g in groups.items()}}
    if args.json:
        atomic_write(Path(args.json), lambda p: p.write_text(json.dumps({"log": log, "rows": rows}, indent=1)))


if __name__ == "__main__":
    main()
