"""The ``qmamba-ao`` command: quantize, evaluate, compare recipes, analyze scans, export.

Only argument parsing and printing live here; the work is done by :mod:`qmamba_ao.api`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, Optional

from . import __version__, api, distributed

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"h_feedback": args.h_feedback == "on"}
    if getattr(args, "reconstruct", False):
        options["reconstruct"] = {} if args.reconstruct_iters is None else {"iters": args.reconstruct_iters}
        if getattr(args, "route", "fx") == "pt2e":
            raise api.QMambaError("--reconstruct runs on the FX route; drop --route pt2e or --reconstruct")
    elif getattr(args, "reconstruct_iters", None) is not None:
        raise api.QMambaError("--reconstruct-iters sets the steps of --reconstruct; add --reconstruct")
    if getattr(args, "site_bits", None) is not None:
        options["site_bits"] = args.site_bits
    return options


def _site_bits(text: str) -> dict[str, int]:
    """argparse type: own bit widths for scan sites, ``h=8`` or ``dA=8,h=8``."""
    from .recipes import parse_site_bits

    try:
        return parse_site_bits(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


DEFAULT_MODEL = "vim_fmnist"


def _int_at_least(low: int, what: str):
    """argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {value}")
        return value

    parse.__doc__ = f"argparse type: an integer >= {low} ({what})."
    return parse


_positive = _int_at_least(1, "image counts")
_non_negative = _int_at_least(0, "step counts")


def _bit_width(text: str) -> int:
    """argparse type: one bit width in 2..8."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not api.MIN_BITS <= value <= api.MAX_BITS:
        raise argparse.ArgumentTypeError(f"must be an integer in {api.MIN_BITS}..{api.MAX_BITS}; got {value}")
    return value


def _one_bit_width(command: str, spec: str) -> tuple[int, int]:
    bits = api.parse_bits(spec)
    if len(bits) != 1:
        raise api.QMambaError(f"{command} takes one bit width (e.g. --bits w8a8); got {spec!r}")
    return bits[0]


def _model(args: argparse.Namespace):
    """The float model of ``--model`` / ``--checkpoint``, with a note when it has no trained weights."""
    args.model = args.model or DEFAULT_MODEL
    model = api.build_model(args.model, args.checkpoint)
    if args.checkpoint is None and not api.has_packaged_weights(model) and distributed.is_main():
        print(
            f"note: {args.model} has no weights inside the package; using a random initialisation "
            f"(pass --checkpoint for trained weights)",
            file=sys.stderr,
        )
    return model


def _images(args: argparse.Namespace, model, split: str, size: Optional[int]):
    return api.load_images(args.data, split, size, getattr(args, "seed", 0), model)


def cmd_models(_: argparse.Namespace) -> int:
    print("\n".join(api.model_names()))
    return 0


def cmd_recipes(_: argparse.Namespace) -> int:
    from tabulate import tabulate

    from . import describe_recipes

    print(tabulate(describe_recipes(), headers=["recipe", "what it quantizes"]))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .ptq import evaluate
    from .recipes import bits_label

    # every argument is checked before the model and the data load
    w_bits, a_bits = _one_bit_width("quantize", args.bits)
    (recipe,) = api.resolve_recipes([args.recipe])
    options = _options(args)
    if args.output:
        if args.route == "pt2e":
            raise api.QMambaError("--output saves FX-route models; drop --output or use --route fx")
        api.check_output(args.output, "file", "--output")
    model = _model(args)
    xc, _ = _images(args, model, "train", args.calib_size)
    xe, ye = _images(args, model, "test", args.eval_size)
    t0 = time.perf_counter()
    q = api.quantize_model(model, xc, recipe, w_bits, a_bits, options, args.route)
    seconds = time.perf_counter() - t0
    fp, qr = evaluate(model, xe, ye, desc="float"), evaluate(q, xe, ye, desc="quantized")
    rec = " + reconstruction" if args.reconstruct else ""
    label = f"{args.recipe}{rec} {bits_label(w_bits, a_bits, args.site_bits)}"
    distributed.check_all_succeeded()  # every process finished before anything is printed or written
    print(
        tabulate(
            [
                ["float", fp["top1"], fp["top5"], 100.0],
                [label, qr["top1"], qr["top5"], api.agreement(qr["preds"], fp["preds"])],
            ],
            headers=["model", "top-1 %", "top-5 %", "agree %"],
            floatfmt=".2f",
        )
    )
    print(f"calibration + conversion: {seconds:.1f} s on {len(xc)} images; evaluation on {len(xe)} images")
    if args.output and distributed.is_main():
        api.save_quantized(args.output, q, args.model, recipe, w_bits, a_bits, options, args.checkpoint)
        print(f"saved {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .ptq import evaluate

    if args.quantized:
        if args.checkpoint is not None:
            raise api.QMambaError(
                "--checkpoint cannot be combined with --quantized: the quantized file holds every weight"
            )
        model, record = api.load_quantized(args.quantized)
        if args.model is not None and args.model != record["model"]:
            raise api.QMambaError(
                f"--model {args.model} does not match {args.quantized}, which holds a quantized {record['model']}; "
                "leave out --model (the file names its model)"
            )
        if record["integrity"] != "sha256 verified":
            print(f"note: {args.quantized}: {record['integrity']}", file=sys.stderr)
        from .recipes import bits_label

        opts = record["options"]
        bits = bits_label(record["w_bits"], record["a_bits"], opts.get("site_bits"), opts.get("first_last_bits", 8))
        label = f"{record['recipe']} {bits}"
    else:
        model, label = _model(args), "float"
    xe, ye = _images(args, model, "test", args.eval_size)
    r = evaluate(model, xe, ye)
    print(
        tabulate(
            [[label, r["top1"], r["top5"], len(xe)]], headers=["model", "top-1 %", "top-5 %", "images"], floatfmt=".2f"
        )
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    recipes = api.resolve_recipes(args.recipes)  # bad names and bit widths fail before anything loads
    bits = api.parse_bits(args.bits)
    options = _options(args)
    if args.json:
        api.check_output(args.json, "file", "--json")
    model = _model(args)
    xc, _ = _images(args, model, "train", args.calib_size)
    xe, ye = _images(args, model, "test", args.eval_size)
    records = api.compare(model, xc, xe, ye, recipes, bits, options, args.route)
    distributed.check_all_succeeded()  # every process finished before anything is printed or written
    print(f"{args.model}: calibration {len(xc)} train images (seed {args.seed}), evaluation {len(xe)} test images")
    print(api.format_compare(records))
    if args.json and distributed.is_main():
        api.atomic_write(args.json, lambda p: p.write_text(json.dumps(records, indent=1)), label="--json")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import format_table

    out = api.check_output(args.output, "folder", "--output")
    for name in ("analysis.json", "sites.png"):
        api.check_output(out / name, "file", "--output")
    model = _model(args)
    xc, _ = _images(args, model, "train", args.images)
    result = api.analyze(model, xc, args.bits, out)
    print(format_table(result["statistics"]))
    print(format_table(result["errors"]))
    if result["figure"] is None:
        print(
            "note: no sites.png: the figure needs matplotlib "
            '(pip install matplotlib, or the plot extra: pip install "qmamba-ao[plot]")',
            file=sys.stderr,
        )
        print(f"wrote {result['json']}")
    else:
        print(f"wrote {result['figure']} and {result['json']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    opset = api.check_export(args.output, args.opset)  # also checks that --output can be written
    w_bits, a_bits = _one_bit_width("export", args.bits)
    (recipe,) = api.resolve_recipes([args.recipe])
    options = _options(args)
    if args.calib_size < api.EXPORT_MIN_CALIB:
        raise api.QMambaError(api.export_calib_message(args.calib_size))
    model = _model(args)
    xc, _ = _images(args, model, "train", args.calib_size)
    info = api.export(model, xc, recipe, w_bits, a_bits, args.output, opset, args.recurrence, options)
    print(info.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmamba-ao", description="Post-training quantization of vision state-space models (torch.ao plugin)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, data: bool = True) -> None:
        p.add_argument("--model", default=None, help=f"timm name (default: {DEFAULT_MODEL}, shipped weights)")
        p.add_argument("--checkpoint", help="official or qmamba-ao checkpoint to load into --model")
        if data:
            p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an ImageNet-style folder")
            p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")

    def quant(p: argparse.ArgumentParser) -> None:
        p.add_argument("--calib-size", type=_positive, default=256, help="calibration images from the train split")
        p.add_argument(
            "--h-feedback",
            choices=["on", "off"],
            default="off",
            help="whether the quantized hidden state feeds the recurrence",
        )
        p.add_argument(
            "--site-bits",
            type=_site_bits,
            default=None,
            metavar="SITE=BITS[,...]",
            help="own bit widths for scan sites (dA, dBu, h, y), e.g. h=8 or dA=8,h=8; the rest stay at the A bits",
        )
        p.add_argument(
            "--reconstruct",
            action="store_true",
            help="learn the quantization parameters block by block on the calibration images (see README)",
        )
        p.add_argument(
            "--reconstruct-iters",
            type=_non_negative,
            default=None,
            help="optimisation steps per block for --reconstruct (default: DEFAULT_ITERS of qmamba_ao/reconstruct.py)",
        )

    sub.add_parser("models", help="list the timm names qmamba-ao registers").set_defaults(func=cmd_models)
    sub.add_parser("recipes", help="list the quantization recipes").set_defaults(func=cmd_recipes)

    p = sub.add_parser("quantize", help="calibrate, convert, evaluate and save one recipe")
    common(p)
    quant(p)
    p.add_argument("--recipe", default="qmamba")
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--eval-size", type=_positive, default=None, help="test images (default: the whole split)")
    p.add_argument("--output", help="save the quantized model here (a regular file; links and devices are refused)")
    p.add_argument(
        "--route",
        choices=("fx", "pt2e"),
        default="fx",
        help="fx: torch.ao prepare_fx/convert_fx (default); pt2e: torch.export + torchao prepare_pt2e/convert_pt2e",
    )
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("evaluate", help="top-1/top-5 of a float or saved quantized model")
    common(p)
    p.add_argument("--quantized", help="a file written by `qmamba-ao quantize --output`")
    p.add_argument("--eval-size", type=_positive, default=None, help="test images (default: the whole split)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="one table: float and every recipe x bit width")
    common(p)
    quant(p)
    p.add_argument("--recipes", default="qmamba,qmamba-ltsq-only,qmamba-tgq-only,minmax,percentile")
    p.add_argument("--bits", default="w8a8,w6a6,w4a8,w4a4")
    p.add_argument("--eval-size", type=_positive, default=None, help="test images (default: the whole split)")
    p.add_argument("--json", help="write the records here")
    p.add_argument(
        "--route",
        choices=("fx", "pt2e"),
        default="fx",
        help="fx: torch.ao prepare_fx/convert_fx (default); pt2e: torch.export + torchao prepare_pt2e/convert_pt2e",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("analyze", help="distribution figures and error tables of the scan sites")
    common(p)
    p.add_argument("--images", type=_positive, default=64, help="train images to record")
    p.add_argument("--bits", type=_bit_width, default=4, help="bit width of the error tables, 2..8 (default 4)")
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


#: commands that run in one process only (under torchrun they stop with an error)
_ONE_PROCESS = ("analyze", "export")


def _process_label() -> str:
    """`` (process R of N)`` when launched as one of several processes, else empty."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (process {os.environ.get('RANK', '?')} of {world})" if world not in ("", "0", "1") else ""


def _run(args: argparse.Namespace) -> int:
    """Run the command; under torchrun (``WORLD_SIZE`` > 1) in a process group where every process
    takes its share of the calibration and test images and only process 0 prints and writes."""
    with distributed.process_group_from_env() as grouped:
        if grouped and args.command in _ONE_PROCESS:
            raise api.QMambaError(
                f"`qmamba-ao {args.command}` runs in one process; launch it without torchrun "
                "(quantize, evaluate and compare can use several)"
            )
        if grouped and not distributed.is_main():
            with contextlib.redirect_stdout(io.StringIO()):
                return int(args.func(args))
        return int(args.func(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; bad input prints one ``error: ...`` line and returns 1, Ctrl-C prints
    ``interrupted`` and returns 130 (outputs are written atomically, so none is left half-written)."""
    from .data import DataError
    from .export import ExportError

    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (api.QMambaError, DataError, ExportError, distributed.DistributedError) as e:
        print(f"error{_process_label()}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
