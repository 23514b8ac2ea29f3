"""FX route against PT2E route: same recipe, same calibration images -> qparams and predictions compared.

For each model and bit width: the recipe's rewrite once, then ``prepare_fx`` and ``prepare_pt2e``
(``QMambaQuantizer``) calibrated on the same batches; the qparams of every site both routes share a
label for are compared exactly (scale, zero point, LtSQ's transform, TGQ's groups), then both
converted models are evaluated on the same test images (top-1, prediction agreement, largest logit
difference). Prints a table.

    OMP_NUM_THREADS=1 python benchmarks/pt2e_agreement.py            # 2,000 test images, both models
"""

from __future__ import annotations

import argparse
import time
import warnings

import timm
import torch
from tabulate import tabulate

import qmamba_ao
import qmamba_ao.models  # noqa: F401
from qmamba_ao import ptq
from qmamba_ao.data import load_split
from qmamba_ao.pt2e import QMambaQuantizer, calibrate_pt2e, export_model, site_qparams

warnings.filterwarnings("ignore")


def compare_sites(fx: dict, pt: dict) -> tuple[int, int, int]:
    """(sites compared, sites that differ, sites only one route labels)."""
    common = [k for k in pt if k in fx]
    differ = sum(
        1 for k in common if fx[k].keys() != pt[k].keys() or any(not torch.equal(fx[k][j], pt[k][j]) for j in fx[k])
    )
    return len(common), differ, len(set(fx) ^ set(pt))


@torch.no_grad()
def logits(model, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


def run(name: str, recipe: str, bits: int, calib: list, xt: torch.Tensor, yt: torch.Tensor) -> dict:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = timm.create_model(name, pretrained=True).eval()
    rec = qmamba_ao.get_recipe(recipe)
    rewritten = rec.rewrite(model, calib)
    t0 = time.perf_counter()
    fx_prepared = ptq.prepare(rewritten, (calib[0][:1],), rec, bits, bits)
    ptq.calibrate(fx_prepared, calib, progress=False)
    fx_sites = site_qparams(fx_prepared)
    fx_model = ptq.convert(fx_prepared, reference=True)
    t_fx = time.perf_counter() - t0
    t0 = time.perf_counter()
    pt_prepared = prepare_pt2e(export_model(rewritten, (calib[0],)), QMambaQuantizer(rec, bits, bits))
    calibrate_pt2e(pt_prepared, calib, progress=False)
    pt_sites = site_qparams(pt_prepared)
    pt_model = convert_pt2e(pt_prepared)
    t_pt = time.perf_counter() - t0
    lf, lp = logits(fx_model, xt), logits(pt_model, xt)
    pf, pp = lf.argmax(-1), lp.argmax(-1)
    compared, differ, unpaired = compare_sites(fx_sites, pt_sites)
    return {
        "model": name,
        "W/A": f"W{bits}A{bits}",
        "sites compared": compared,
        "sites differing": differ,
        "unpaired labels": unpaired,
        "FX top-1": 100.0 * float((pf == yt).float().mean()),
        "PT2E top-1": 100.0 * float((pp == yt).float().mean()),
        "agreement %": 100.0 * float((pf == pp).float().mean()),
        "max |logit diff|": float((lf - lp).abs().max()),
        "FX s": t_fx,
        "PT2E s": t_pt,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vim_fmnist,vmamba_fmnist")
    p.add_argument("--recipe", default="qmamba")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--calib-batch", type=int, default=64)
    p.add_argument("--eval-size", type=int, default=2000)
    args = p.parse_args()
    torch.manual_seed(0)
    xc, _ = load_split("fashion-mnist", "train", args.calib_size, seed=0)
    xt, yt = load_split("fashion-mnist", "test", args.eval_size)
    calib = list(xc.split(args.calib_batch))
    rows = []
    for name in args.models.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            rows.append(run(name, args.recipe, bits, calib, xt, yt))
            print(tabulate([rows[-1]], headers="keys", floatfmt=".3g"), flush=True)
    print()
    print(
        f"recipe {args.recipe}, {args.calib_size} calibration images (batches of {args.calib_batch}), "
        f"{args.eval_size} test images"
    )
    print(tabulate(rows, headers="keys", floatfmt=".4g"))


if __name__ == "__main__":
    main()
