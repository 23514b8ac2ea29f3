"""ONNX export against the PyTorch quantized model: top-1 agreement and accuracy on Fashion-MNIST.

For each bit width: prepare + calibrate once, convert with ``qmamba_ao.export.to_exportable`` (the
exportable quantized model), export it to ONNX, run it in onnxruntime, and compare predictions and
top-1 with the same model in PyTorch. The project's default simulated model (``convert_to_reference_fx``
of the same calibration) is evaluated too, for context. Reads the model's weights fresh on every run.

    OMP_NUM_THREADS=1 python benchmarks/onnx_accuracy.py --eval-size 1000
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

from qmamba_ao import ptq
from qmamba_ao.api import build_model, parse_bits
from qmamba_ao.data import load_split
from qmamba_ao.export import DEFAULT_OPSET, export_onnx, run_onnx, to_exportable

warnings.filterwarnings("ignore")


def stage(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    preds = logits.argmax(-1)  # ties -> lower class, the rule ptq.evaluate uses
    return 100.0 * (preds == labels).float().mean().item(), preds


@torch.inference_mode()
def logits_of(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vim_fmnist")
    p.add_argument("--checkpoint")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--recipe", default="qmamba")
    p.add_argument("--bits", default="w8a8,w4a4")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--eval-size", type=int, default=None, help="test images (default: all 10k)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--recurrence", default="scan,unroll", help="'scan', 'unroll' or both, comma-separated")
    p.add_argument("--ort-optimization", choices=["basic", "all"], default="basic")
    p.add_argument("--json", help="write the records here")
    args = p.parse_args()

    torch.manual_seed(0)
    records = []
    start = time.perf_counter()
    recurrences = [r.strip() for r in args.recurrence.split(",")]
    for w_bits, a_bits in parse_bits(args.bits):
        model = build_model(args.model, args.checkpoint)
        xc, _ = load_split(args.data, "train", args.calib_size, 0, model)
        xe, ye = load_split(args.data, "test", args.eval_size, 0, model)
        # the recipe's model transform (qmamba smooths its Linears), prepare_fx and calibration
        prepared = ptq.prepare_calibrated(model, list(xc.split(32)), args.recipe, w_bits, a_bits, progress=False)
        # The PyTorch quantized model: both recurrences compute the same values (tests check it).
        t0 = time.perf_counter()
        pt_logits = logits_of(to_exportable(prepared), xe)
        pt_seconds = time.perf_counter() - t0
        pt_top1, pt_preds = top1(pt_logits, ye)
        sim = ptq.evaluate(ptq.convert(copy.deepcopy(prepared), reference=True), xe, ye, progress=False)
        stage(f"W{w_bits}A{a_bits} calibrated, converted and evaluated in PyTorch", start)
        for recurrence in recurrences:
            exportable = to_exportable(prepared, recurrence)
            with tempfile.TemporaryDirectory() as tmp:
                info = export_onnx(exportable, xc[:2], Path(tmp) / "model.onnx", opset=args.opset)
                size_mb = info.path.stat().st_size / 2**20
                stage(info.summary(), start)
                t0 = time.perf_counter()
                ort_logits = run_onnx(info.path, xe, optimization=args.ort_optimization)
                ort_seconds = time.perf_counter() - t0
                stage("onnxruntime evaluated", start)
            ort_top1, ort_preds = top1(ort_logits, ye)
            rec = {
                "bits": f"W{w_bits}A{a_bits}",
                "recurrence": recurrence,
                "images": len(xe),
                "pytorch_top1": pt_top1,
                "onnx_top1": ort_top1,
                "agreement": 100.0 * (ort_preds == pt_preds).float().mean().item(),
                "max_logit_diff": (ort_logits - pt_logits).abs().max().item(),
                "reference_fx_top1": sim["top1"],
                "agreement_with_reference_fx": 100.0 * (ort_preds == sim["preds"]).float().mean().item(),
                "export_seconds": round(info.seconds, 1),
                "onnx_nodes": info.nodes,
                "quantize_linear": info.op_counts.get("QuantizeLinear", 0),
                "dequantize_linear": info.op_counts.get("DequantizeLinear", 0),
                "clip": info.op_counts.get("Clip", 0),
                "onnx_mb": round(size_mb, 2),
                "ort_seconds": round(ort_seconds, 1),
                "pytorch_seconds": round(pt_seconds, 1),
            }
            records.append(rec)
            print(json.dumps(rec), flush=True)
    print(
        f"{args.model} / {args.recipe}: calibration {args.calib_size} train images, ORT optimization "
        f"{args.ort_optimization!r}, opset {args.opset}"
    )
    cols = [
        "bits",
        "recurrence",
        "images",
        "pytorch_top1",
        "onnx_top1",
        "agreement",
        "max_logit_diff",
        "reference_fx_top1",
        "agreement_with_reference_fx",
        "export_seconds",
        "onnx_nodes",
        "onnx_mb",
        "ort_seconds",
    ]
    print(tabulate([[r[c] for c in cols] for r in records], headers=cols, floatfmt=".2f", tablefmt="github"))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
