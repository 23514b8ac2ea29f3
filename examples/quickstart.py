"""Quickstart: quantize a Vision Mamba with torch.ao's standard FX calls and qmamba-ao's custom configs.

    python examples/quickstart.py

Builds a small randomly initialised Vim (no download), calibrates on random images, converts to
x86 int8, and prints how far the quantized output is from float. Replace the model with
``timm.create_model("vim_tiny_patch16_224", pretrained=..., checkpoint_path=...)`` and the images
with real ones for a real run.
"""

import copy
import time
import warnings

import timm
import torch
from tabulate import tabulate
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from tqdm import tqdm

import qmamba_ao
import qmamba_ao.models  # noqa: F401  (registers the Vim / VMamba names with timm)

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


def main() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=64, depth=4, num_classes=10).eval()
    images = torch.randn(8, 3, 64, 64)

    # 1. prepare: FX traces the model; each SelectiveScan becomes an observed leaf.
    mapping = get_default_qconfig_mapping("x86")
    prepared = prepare_fx(
        copy.deepcopy(model), mapping, (images[:1],), prepare_custom_config=qmamba_ao.prepare_custom_config(model)
    )
    # 2. calibrate
    with torch.inference_mode():
        for _ in tqdm(range(8), desc="calibrating"):
            prepared(torch.randn(4, 3, 64, 64))
    # 3. convert: x86 int8 linears, quantized selective scans.
    quantized = convert_fx(prepared, convert_custom_config=qmamba_ao.convert_custom_config(prepared))

    with torch.inference_mode():
        t0 = time.perf_counter()
        ref = model(images)
        t_float = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = quantized(images)
        t_int8 = time.perf_counter() - t0
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(
        tabulate(
            [
                ["relative L2 error of logits", f"{rel:.4f}"],
                ["top-1 agreement with float", f"{agree:.2%}"],
                ["float forward (8 images)", f"{t_float * 1e3:.0f} ms"],
                ["int8 forward (8 images)", f"{t_int8 * 1e3:.0f} ms"],
            ],
            headers=["Vim (depth 4, width 192, 64x64, random weights)", "value"],
        )
    )


if __name__ == "__main__":
    main()
