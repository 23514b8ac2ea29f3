"""PT2E deployment: int8 through torch.compile against the float model, compile time reported apart.

The int8 model is ``torchao``'s ``X86InductorQuantizer`` (W8A8: uint8 per-tensor activations, int8
per-channel weights, int8 kernels after inductor's freezing passes) for the linears and convs,
composed (``ComposableQuantizer``) with ``QMambaQuantizer(recipe, 8, 8, layers=False)`` for the
selective scans' inputs, output and internal sites (``--linears-only`` also times the x86 quantizer
alone, the scans left in float). The float model is the same exported graph
without quantization. Both are compiled with ``torch.compile`` (inductor, freezing on); the first
call (compilation) is timed apart from the median of the following calls. Also tries the ONNX
exporter on the converted graph.

    OMP_NUM_THREADS=1 python benchmarks/pt2e_latency.py                   # vim_fmnist and Vim-T 224, batch 1 and 8
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch
from tabulate import tabulate

import qmamba_ao.models  # noqa: F401
from qmamba_ao.data import load_split
from qmamba_ao.pt2e import QMambaQuantizer, calibrate_pt2e, export_model

warnings.filterwarnings("ignore")


def int8_model(
    model: torch.nn.Module, example: torch.Tensor, calib: list, recipe: str, scans: bool = True
) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import ComposableQuantizer
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    x86 = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    quantizer = ComposableQuantizer([QMambaQuantizer(recipe, 8, 8, layers=False), x86]) if scans else x86
    prepared = prepare_pt2e(export_model(model, (example,)), quantizer)
    calibrate_pt2e(prepared, calib, progress=False)
    return convert_pt2e(prepared)


@torch.no_grad()
def timed(compiled, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, i.e. compilation; median ms of ``repeats`` later calls)."""
    t0 = time.perf_counter()
    compiled(x)
    first = time.perf_counter() - t0
    compiled(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled(x)
        times.append(1000.0 * (time.perf_counter() - t0))
    return first, statistics.median(times)


def try_onnx(gm: torch.fx.GraphModule, x: torch.Tensor) -> str:
    try:
        torch.onnx.export(gm, (x,), dynamo=True, external_data=False)
        return "exported"
    except Exception as e:  # report what the exporter said
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vim_fmnist,vim_tiny_patch16_224")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--recipe", default="qmamba")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--linears-only", action="store_true", help="also time X86InductorQuantizer alone (scans left in float)"
    )
    p.add_argument("--onnx", action="store_true", help="also try torch.onnx.export(dynamo=True) of the int8 graph")
    args = p.parse_args()
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    rows = []
    for name in args.models.split(","):
        pretrained = name.endswith("_fmnist")
        model = timm.create_model(name, pretrained=pretrained).eval()
        shape = model.default_cfg["input_size"]
        if pretrained:
            images, _ = load_split("fashion-mnist", "train", 64, seed=0)
        else:
            images = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
        calib = list(images.split(8))
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            x = images[:bs]
            float_gm = export_model(model, (x,))
            quant_gm = int8_model(model, x, calib, args.recipe)
            torch._dynamo.reset()
            c_float, t_float = timed(torch.compile(float_gm), x, args.repeats)
            torch._dynamo.reset()
            c_int8, t_int8 = timed(torch.compile(quant_gm), x, args.repeats)
            row = {
                "model": name,
                "input": "x".join(map(str, shape)),
                "batch": bs,
                "float ms": t_float,
                "int8 ms": t_int8,
                "int8/float": t_int8 / t_float,
                "compile float s": c_float,
                "compile int8 s": c_int8,
            }
            if args.linears_only:
                torch._dynamo.reset()
                lin_gm = int8_model(model, x, calib, args.recipe, scans=False)
                c_lin, t_lin = timed(torch.compile(lin_gm), x, args.repeats)
                row.update({"int8 linears only ms": t_lin, "linears-only/float": t_lin / t_float})
                row["compile linears-only s"] = c_lin
            if args.onnx and bs == 1:
                row["ONNX (int8 graph)"] = try_onnx(quant_gm, x)
            rows.append(row)
            print(tabulate([row], headers="keys", floatfmt=".3g"), flush=True)
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats} calls")
    print(tabulate(rows, headers="keys", floatfmt=".3g"))


if __name__ == "__main__":
    main()
