"""x86 int8 lowering (torch.ao ``convert_fx``) of W8A8 against float and the simulated model, in one run.

* accuracy: the lowered model (torch.ao's x86 quantized linears / convs) against the simulated
  (reference) conversion of the *same* calibration, on the Fashion-MNIST test set;
* latency: float, lowered int8 and simulated, single-threaded, interleaved in one process (median);
  ``--linears-only`` adds an x86 lowering of the linears alone (every scan left in float), which
  shows what the int8 kernels give by themselves; ``--int8-depthwise`` adds twins of the lowered
  models that run fbgemm's int8 depthwise conv kernels instead of the float arithmetic
  ``ptq.convert`` gives them (``qmamba_ao.lowered``), with an accuracy row of their own;
  with ``--onnx`` also onnxruntime on the float export (``qmamba_ao.export.float_exportable``) and on
  the QDQ export of the same W8A8 calibration (``to_exportable``), in the same interleaved loop;
* size: float32 weights against packed W8 and W4 weights (safetensors, ``qmamba_ao.export.save_packed``).

Activations are observed in 7 bits (``qmamba_ao.export.x86_qconfig_mapping``): the x86 kernels add
pairs of uint8 x int8 products in 16 bits on CPUs without VNNI and saturate with full 8-bit
activations. ``--full-range`` also evaluates the recipe's own 8-bit activations lowered the same way,
to show that effect. Reads the model's weights fresh on every run.

    OMP_NUM_THREADS=1 python benchmarks/export_latency.py

``--data random`` calibrates on random images of the model's input size and skips the accuracy
rows: latency at ImageNet shapes without ImageNet, e.g.

    OMP_NUM_THREADS=1 python benchmarks/export_latency.py --model vim_tiny_patch16_224 --data random \
        --calib-size 8 --batch-sizes 1,8 --repeats 5 --onnx
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

from qmamba_ao import ptq
from qmamba_ao.api import build_model
from qmamba_ao.data import load_split
from qmamba_ao.export import (
    export_onnx,
    float_exportable,
    onnx_session,
    to_exportable,
    x86_qconfig_mapping,
)
from qmamba_ao.export.packed import save_packed
from qmamba_ao.lowered import FLOAT_FORWARD
from qmamba_ao.ssm.modules import SelectiveScan

warnings.filterwarnings("ignore")


class OrtModel:
    """An onnxruntime session called like a model (one thread, all graph optimizations: QDQ pairs fused)."""

    def __init__(self, path: Path) -> None:
        self.session = onnx_session(path, threads=1, optimization="all")
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor):
        return self.session.run(None, {self.input: x.numpy()})[0]


def onnx_models(model, prepared, example: torch.Tensor, recurrence: str, tmp: Path) -> dict:
    """Float and QDQ ONNX exports of the same model, as onnxruntime sessions."""
    out = {}
    for name, exportable in (
        ("onnxruntime float", float_exportable(model, recurrence)),
        ("onnxruntime QDQ", to_exportable(prepared, recurrence)),
    ):
        t0 = time.perf_counter()
        info = export_onnx(exportable, example, tmp / f"{name.split()[-1]}.onnx")
        print(f"{name}: exported in {time.perf_counter() - t0:.1f} s, {info.nodes} nodes", flush=True)
        out[name] = OrtModel(info.path)
    return out


def int8_depthwise(lowered: torch.nn.Module) -> torch.nn.Module:
    """A copy of a lowered model whose depthwise convs run fbgemm's int8 kernels (the state is the same)."""
    out = copy.deepcopy(lowered)
    kernels = {float_cls: int8_cls for int8_cls, float_cls in FLOAT_FORWARD.items()}
    for m in out.modules():
        if type(m) in kernels:
            m.__class__ = kernels[type(m)]
    return out


def random_split(model: torch.nn.Module, size: int, seed: int) -> tuple[torch.Tensor, None]:
    """``size`` standard-normal images of the model's input size (latency only: no labels)."""
    shape = model.pretrained_cfg.get("input_size", (1, 28, 28))
    return torch.randn(size, *shape, generator=torch.Generator().manual_seed(seed)), None


@torch.inference_mode()
def latency(models: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds per forward; the models take turns so that load changes hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m(x)  # warm-up
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[name].append(1000.0 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def sizes(model_name: str, checkpoint, xc: torch.Tensor, recipe: str) -> dict[str, int]:
    """Bytes on disk: float32 state dict, and packed W8A8 / W4A4 converted models (safetensors)."""
    from safetensors.torch import save_file

    model = build_model(model_name, checkpoint)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "float.safetensors"
        save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(path))
        out["float32"] = path.stat().st_size
        for bits in (8, 4):
            prepared = ptq.prepare_calibrated(model, [xc], recipe, bits, bits, progress=False)
            out[f"W{bits}"] = save_packed(to_exportable(prepared), Path(tmp) / f"w{bits}.safetensors")["bytes"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vim_fmnist")
    p.add_argument("--checkpoint")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist', a folder, or 'random' (latency only)")
    p.add_argument("--recipe", default="qmamba")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--eval-size", type=int, default=None, help="test images (default: all 10k)")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--full-range", action="store_true", help="also lower the recipe's full 8-bit activations")
    p.add_argument(
        "--linears-only",
        action="store_true",
        help="also time an x86 lowering of the linears alone (scans left in float: qconfig None)",
    )
    p.add_argument(
        "--int8-depthwise", action="store_true", help="also run the lowered models with int8 depthwise conv kernels"
    )
    p.add_argument("--onnx", action="store_true", help="also time onnxruntime on float and QDQ ONNX exports")
    p.add_argument("--recurrence", default="scan", help="ONNX form of the scans' recurrence: 'scan' or 'unroll'")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.data == "random" and (args.eval_size is not None or args.full_range):
        p.error("--data random measures latency only: --eval-size and --full-range need a dataset")
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = build_model(args.model, args.checkpoint)
    random_data = args.data == "random"
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if random_data:
        xc, _ = random_split(model, args.calib_size, 0)
        xe, ye = random_split(model, max(batches), 1)
    else:
        xc, _ = load_split(args.data, "train", args.calib_size, 0, model)
        xe, ye = load_split(args.data, "test", args.eval_size, 0, model)
    calib = list(xc.split(32))
    result: dict = {"model": args.model, "recipe": args.recipe, "images": len(xe), "accuracy": [], "latency_ms": {}}

    variants = [("7-bit activations (x86 mapping)", x86_qconfig_mapping(args.recipe, 8, 8))]
    if args.full_range:
        variants.append(("8-bit activations (recipe)", None))
    lowered_main = simulated_main = prepared_main = None
    for label, mapping in variants:
        prepared = ptq.prepare_calibrated(model, calib, args.recipe, 8, 8, qconfig_mapping=mapping, progress=False)
        lowered = ptq.convert(copy.deepcopy(prepared), reference=False)
        simulated = ptq.convert(copy.deepcopy(prepared), reference=True)
        if lowered_main is None:
            lowered_main, simulated_main, prepared_main = lowered, simulated, prepared
        if random_data:
            continue
        si = ptq.evaluate(simulated, xe, ye, progress=False)
        twins = [(label, lowered)]
        if args.int8_depthwise and lowered is lowered_main:
            twins.append((f"{label}, int8 depthwise kernels", int8_depthwise(lowered)))
        for row_label, lowered_model in twins:
            lo = ptq.evaluate(lowered_model, xe, ye, progress=False)
            row = {
                "activations": row_label,
                "lowered_top1": lo["top1"],
                "simulated_top1": si["top1"],
                "difference": lo["top1"] - si["top1"],
                "agreement": 100.0 * (lo["preds"] == si["preds"]).float().mean().item(),
            }
            result["accuracy"].append(row)
            print(json.dumps(row), flush=True)
    if not random_data:
        result["float_top1"] = ptq.evaluate(model, xe, ye, progress=False)["top1"]

    models = {"float": model, "int8 x86": lowered_main, "simulated": simulated_main}
    if args.linears_only:
        mapping = x86_qconfig_mapping(args.recipe, 8, 8).set_object_type(SelectiveScan, None)
        prepared = ptq.prepare_calibrated(model, calib, args.recipe, 8, 8, qconfig_mapping=mapping, progress=False)
        models["int8 linears only"] = ptq.convert(prepared, reference=False)
    if args.int8_depthwise:
        for name in [k for k in models if k.startswith("int8")]:
            models[f"{name}, int8 depthwise"] = int8_depthwise(models[name])
    with tempfile.TemporaryDirectory() as tmp:
        if args.onnx:
            models.update(onnx_models(model, prepared_main, xc[:2], args.recurrence, Path(tmp)))
        for bs in batches:
            ms = latency(models, xe[:bs], args.repeats)
            ms["int8 / float"] = ms["int8 x86"] / ms["float"]
            if args.linears_only:
                ms["linears only / float"] = ms["int8 linears only"] / ms["float"]
            if args.onnx:
                ms["ORT QDQ / ORT float"] = ms["onnxruntime QDQ"] / ms["onnxruntime float"]
            result["latency_ms"][bs] = ms
            print(f"batch {bs}: " + json.dumps({k: round(v, 3) for k, v in ms.items()}), flush=True)
    result["bytes"] = sizes(args.model, args.checkpoint, xc[:64], args.recipe)

    if random_data:
        print(f"\n{args.model}, {args.recipe} W8A8, random inputs: latency only")
    else:
        print(f"\n{args.model}, {args.recipe} W8A8, {len(xe)} test images, float top-1 {result['float_top1']:.2f} %")
        cols = ["activations", "lowered_top1", "simulated_top1", "difference", "agreement"]
        rows = [[r[c] for c in cols] for r in result["accuracy"]]
        print(tabulate(rows, headers=cols, floatfmt=".2f", tablefmt="github"))
    cols = list(next(iter(result["latency_ms"].values())))
    rows = [[bs] + [v[c] for c in cols] for bs, v in result["latency_ms"].items()]
    headers = ["batch"] + [c if "/" in c else f"{c} ms" for c in cols]
    print(tabulate(rows, headers=headers, floatfmt=".2f", tablefmt="github"))
    b = result["bytes"]
    print(
        tabulate(
            [[k, v, b["float32"] / v] for k, v in b.items()],
            headers=["weights", "bytes", "x smaller"],
            floatfmt=".2f",
            tablefmt="github",
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
