"""The ``qmamba-ao`` command: quantize, evaluate, compare recipes, analyze scans."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from . import __version__

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


def parse_bits(spec: str) -> list[tuple[int, int]]:
    """``"w8a8,w4a4"`` -> ``[(8, 8), (4, 4)]``."""
    out = []
    for item in spec.split(","):
        text = item.strip().lower()
        try:
            w, a = text.removeprefix("w").split("a")
            out.append((int(w), int(a)))
        except ValueError:
            raise SystemExit(f"error: bad bit width {item!r}; write it as wXaY, e.g. w4a4 or w8a8") from None
    return out


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file so that an interrupted run leaves no half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_model(name: str, checkpoint: Optional[str]):
    """A timm model by name; ``checkpoint`` (official or ours) loads through the family's filter."""
    import timm
    import torch

    from . import models  # noqa: F401  (registration)

    if not timm.is_model(name):
        ours = [n for n in timm.list_models() if n.startswith(("vim_", "vmamba_", "vanilla_vmamba_"))]
        raise SystemExit(f"error: unknown model {name!r}; qmamba-ao registers: {', '.join(ours)}")
    model = timm.create_model(name, pretrained=checkpoint is None and _has_packaged_weights(name))
    if checkpoint is None and not _has_packaged_weights(name):
        print(
            f"note: {name} has no weights inside the package; using a random initialisation "
            f"(pass --checkpoint for trained weights)",
            file=sys.stderr,
        )
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise SystemExit(f"error: checkpoint {path} not found")
        state = torch.load(path, map_location="cpu", weights_only=False)
        filter_fn = sys.modules[type(model).__module__].checkpoint_filter_fn
        try:
            model.load_state_dict(filter_fn(state, model))
        except ValueError as e:
            raise SystemExit(f"error: checkpoint {path} does not fit {name}: {e}") from None
    return model.eval()


def _has_packaged_weights(name: str) -> bool:
    import timm

    from . import models  # noqa: F401  (registration)

    cfg = timm.create_model(name, pretrained=False).pretrained_cfg  # resolves aliases and tags
    return bool(cfg.get("file")) and Path(cfg["file"]).is_file()


def _data(args: argparse.Namespace, model, split: str, size: Optional[int]):
    from .data import DataError, load_split

    try:
        return load_split(args.data, split, size, getattr(args, "seed", 0), model)
    except (DataError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def _quantize(model, calib, recipe: str, w_bits: int, a_bits: int, options: dict):
    from . import ptq

    try:
        return ptq.quantize(model, list(calib.split(32)), recipe, w_bits, a_bits, **options)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"h_feedback": args.h_feedback == "on"}


def cmd_models(_: argparse.Namespace) -> int:
    import timm

    from . import models  # noqa: F401

    print("\n".join(n for n in timm.list_models() if n.startswith(("vim_", "vmamba_", "vanilla_vmamba_"))))
    return 0


def cmd_recipes(_: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .qconfig import describe_recipes

    print(tabulate(describe_recipes(), headers=["recipe", "what it quantizes"]))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    from tabulate import tabulate

    from .ptq import evaluate

    ((w_bits, a_bits),) = parse_bits(args.bits)
    model = build_model(args.model, args.checkpoint)
    xc, _ = _data(args, model, "train", args.calib_size)
    xe, ye = _data(args, model, "test", args.eval_size)
    t0 = time.perf_counter()
    q = _quantize(model, xc, args.recipe, w_bits, a_bits, _options(args))
    seconds = time.perf_counter() - t0
    fp, qr = evaluate(model, xe, ye, desc="float"), evaluate(q, xe, ye, desc="quantized")
    agree = 100.0 * (fp["preds"] == qr["preds"]).float().mean().item()
    print(
        tabulate(
            [
                ["float", fp["top1"], fp["top5"], 100.0],
                [f"{args.recipe} W{w_bits}A{a_bits}", qr["top1"], qr["top5"], agree],
            ],
            headers=["model", "top-1 %", "top-5 %", "agree %"],
            floatfmt=".2f",
        )
    )
    print(f"calibration + conversion: {seconds:.1f} s on {len(xc)} images; evaluation on {len(xe)} images")
    if args.output:
        record = {
            "model": args.model,
            "checkpoint": args.checkpoint,
            "recipe": args.recipe,
            "w_bits": w_bits,
            "a_bits": a_bits,
            "options": _options(args),
            "reference": True,
            "state_dict": q.state_dict(),
        }
        _atomic_write(Path(args.output), lambda p: torch.save(record, p))
        print(f"saved {args.output}")
    return 0


def load_quantized(path: str):
    """Rebuild a model saved by ``qmamba-ao quantize --output``: same recipe, saved qparams."""
    import torch

    from . import ptq
    from .qconfig import recipe_transform

    record = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(record["model"], record.get("checkpoint"))
    example = (torch.zeros(1, *model.pretrained_cfg["input_size"]),)
    transform = recipe_transform(record["recipe"])
    if transform is not None:  # same module structure; the saved state replaces the values
        model = transform(model, [example[0]])
    prepared = ptq.prepare(model, example, record["recipe"], record["w_bits"], record["a_bits"], **record["options"])
    ptq.calibrate(prepared, [example[0]], progress=False)  # shapes only; the saved state replaces it
    q = ptq.convert(prepared, reference=record.get("reference", True))
    q.load_state_dict(record["state_dict"])
    return q, record


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .ptq import evaluate

    if args.quantized:
        model, record = load_quantized(args.quantized)
        label = f"{record['recipe']} W{record['w_bits']}A{record['a_bits']}"
    else:
        model, label = build_model(args.model, args.checkpoint), "float"
    xe, ye = _data(args, model, "test", args.eval_size)
    r = evaluate(model, xe, ye)
    print(
        tabulate(
            [[label, r["top1"], r["top5"], len(xe)]], headers=["model", "top-1 %", "top-5 %", "images"], floatfmt=".2f"
        )
    )
    return 0


def run_compare(
    model, xc, xe, ye, recipes: Sequence[str], bits: Sequence[tuple[int, int]], options: dict
) -> list[dict[str, Any]]:
    """Float row first, then every recipe x bit width: top-1, top-5, agreement with float."""
    from .ptq import evaluate

    fp = evaluate(model, xe, ye, desc="float")
    records = [{"recipe": "fp", "w_bits": 32, "a_bits": 32, "top1": fp["top1"], "top5": fp["top5"], "agree": 100.0}]
    for recipe in recipes:
        for w_bits, a_bits in bits:
            t0 = time.perf_counter()
            q = _quantize(model, xc, recipe, w_bits, a_bits, options)
            r = evaluate(q, xe, ye, desc=f"{recipe} W{w_bits}A{a_bits}")
            records.append(
                {
                    "recipe": recipe,
                    "w_bits": w_bits,
                    "a_bits": a_bits,
                    "top1": r["top1"],
                    "top5": r["top5"],
                    "agree": 100.0 * (r["preds"] == fp["preds"]).float().mean().item(),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
    return records


def format_compare(records: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    rows = [
        [
            r["recipe"],
            "fp32" if r["recipe"] == "fp" else f"W{r['w_bits']}A{r['a_bits']}",
            r["top1"],
            r["top5"],
            r["agree"],
        ]
        for r in records
    ]
    return tabulate(
        rows, headers=["recipe", "bits", "top-1 %", "top-5 %", "agree w/ fp %"], floatfmt=".2f", tablefmt="github"
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from .qconfig import list_recipes

    recipes = [r.strip() for r in args.recipes.split(",")]
    unknown = [r for r in recipes if r not in list_recipes()]
    if unknown:
        raise SystemExit(f"error: unknown recipe(s) {unknown}; choose from {list_recipes()}")
    bits = parse_bits(args.bits)
    model = build_model(args.model, args.checkpoint)
    xc, _ = _data(args, model, "train", args.calib_size)
    xe, ye = _data(args, model, "test", args.eval_size)
    records = run_compare(model, xc, xe, ye, recipes, bits, _options(args))
    print(f"{args.model}: calibration {len(xc)} train images (seed {args.seed}), evaluation {len(xe)} test images")
    print(format_compare(records))
    if args.json:
        _atomic_write(Path(args.json), lambda p: p.write_text(json.dumps(records, indent=1)))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import collect_sites, format_table, plot_sites, quantization_error_table, site_statistics

    model = build_model(args.model, args.checkpoint)
    xc, _ = _data(args, model, "train", args.images)
    records = collect_sites(model, xc)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stats = site_statistics(records)
    errors = quantization_error_table(records, bits=args.bits)
    print(format_table(stats))
    print(format_table(errors))
    figure = plot_sites(records, out / "sites.png")
    _atomic_write(
        out / "analysis.json",
        lambda p: p.write_text(json.dumps({"statistics": stats, "errors": errors}, indent=1, default=float)),
    )
    print(f"wrote {figure} and {out / 'analysis.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import DEFAULT_OPSET, ExportError, export_onnx, quantize_for_export
    from .export.onnx import check_opset, require

    opset = DEFAULT_OPSET if args.opset is None else args.opset
    try:
        require("onnx", "onnxscript")
        check_opset(opset)
    except (ImportError, ExportError) as e:
        raise SystemExit(f"error: {e}") from None
    if Path(args.output).suffix != ".onnx":
        raise SystemExit(f"error: --output must name an .onnx file; got {args.output!r}")
    bits = parse_bits(args.bits)
    if len(bits) != 1:
        raise SystemExit(f"error: export takes one bit width (e.g. --bits w8a8); got {args.bits!r}")
    ((w_bits, a_bits),) = bits
    model = build_model(args.model, args.checkpoint)
    xc, _ = _data(args, model, "train", args.calib_size)
    try:
        q = quantize_for_export(
            model, list(xc.split(32)), args.recipe, w_bits, a_bits, recurrence=args.recurrence, **_options(args)
        )
        info = export_onnx(q, xc[:2], args.output, opset=opset)
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    print(info.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmamba-ao", description="Post-training quantization of vision state-space models (torch.ao plugin)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, data: bool = True) -> None:
        p.add_argument("--model", default="vim_fmnist", help="timm name (default: vim_fmnist, shipped weights)")
        p.add_argument("--checkpoint", help="official or qmamba-ao checkpoint to load into --model")
        if data:
            p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an ImageNet-style folder")
            p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")

    def quant(p: argparse.ArgumentParser) -> None:
        p.add_argument("--calib-size", type=int, default=256, help="calibration images from the train split")
        p.add_argument(
            "--h-feedback",
            choices=["on", "off"],
            default="off",
            help="whether the quantized hidden state feeds the recurrence",
        )

    sub.add_parser("models", help="list the timm names qmamba-ao registers").set_defaults(func=cmd_models)
    sub.add_parser("recipes", help="list the quantization recipes").set_defaults(func=cmd_recipes)

    p = sub.add_parser("quantize", help="calibrate, convert, evaluate and save one recipe")
    common(p)
    quant(p)
    p.add_argument("--recipe", default="qmamba")
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--eval-size", type=int, default=None, help="test images (default: the whole split)")
    p.add_argument("--output", help="save the quantized model here")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("evaluate", help="top-1/top-5 of a float or saved quantized model")
    common(p)
    p.add_argument("--quantized", help="a file written by `qmamba-ao quantize --output`")
    p.add_argument("--eval-size", type=int, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="one table: float and every recipe x bit width")
    common(p)
    quant(p)
    p.add_argument("--recipes", default="qmamba,qmamba-ltsq-only,qmamba-tgq-only,minmax,percentile")
    p.add_argument("--bits", default="w8a8,w6a6,w4a8,w4a4")
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--json", help="write the records here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("analyze", help="distribution figures and error tables of the scan sites")
    common(p)
    p.add_argument("--images", type=int, default=64, help="train images to record")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--output", required=True, help="folder for sites.png and analysis.json")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="quantize and export to ONNX with QuantizeLinear/DequantizeLinear nodes")
    common(p)
    quant(p)
    p.add_argument("--recipe", default="qmamba")
    p.add_argument("--bits", default="w8a8")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 18..21 (default 20)")
    p.add_argument(
        "--recurrence",
        choices=["scan", "unroll"],
        default="scan",
        help="each selective scan as one ONNX Scan node, or unrolled over time steps",
    )
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
