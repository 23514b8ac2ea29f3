"""Quickstart: quantize a Vision Mamba with torch.ao's standard FX calls and qmamba-ao's custom configs.

    python examples/quickstart.py

Loads the packaged Fashion-MNIST Vim (``vim_fmnist``), calibrates torch.ao's default x86
mapping on 128 training images, converts to x86 int8 and compares with float on 1,000 test images;
then does the same with QMamba's W4A4 recipe through ``qmamba_ao.quantize``. Fashion-MNIST comes
from Debian's ``dataset-fashion-mnist`` (or ``QMAMBA_DATA``).
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
import qmamba_ao.models  # noqa: F401  (registers the Vim names with timm)
from qmamba_ao.data import load_split
from qmamba_ao.ptq import evaluate

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


def main() -> None:
    model = timm.create_model("vim_fmnist", pretrained=True).eval()
    calib, _ = load_split("fashion-mnist", "train", 128, seed=0)
    images, labels = load_split("fashion-mnist", "test", 1000)

    # 1. prepare: FX traces the model; each SelectiveScan becomes an observed leaf.
    prepared = prepare_fx(
        copy.deepcopy(model),
        get_default_qconfig_mapping("x86"),
        (calib[:1],),
        prepare_custom_config=qmamba_ao.prepare_custom_config(model),
    )
    # 2. calibrate
    with torch.inference_mode():
        for batch in tqdm(calib.split(32), desc="calibrating"):
            prepared(batch)
    # 3. convert: x86 int8 linears, quantized selective scans.
    int8 = convert_fx(prepared, convert_custom_config=qmamba_ao.convert_custom_config(prepared))

    # The same in one call with a qmamba-ao recipe (simulated W4A4).
    t0 = time.perf_counter()
    w4a4 = qmamba_ao.quantize(model, calib.split(32), recipe="qmamba", w_bits=4, a_bits=4)
    t_quant = time.perf_counter() - t0

    fp = evaluate(model, images, labels, desc="float")
    rows = [["float", f"{fp['top1']:.2f}", "100.00"]]
    for name, m in (("torch.ao x86 default (int8)", int8), ("qmamba W4A4 (simulated)", w4a4)):
        r = evaluate(m, images, labels, desc=name)
        agree = 100.0 * (r["preds"] == fp["preds"]).float().mean().item()
        rows.append([name, f"{r['top1']:.2f}", f"{agree:.2f}"])
    print(tabulate(rows, headers=["vim_fmnist, 1000 test images", "top-1 %", "agrees with float %"]))
    print(f"qmamba_ao.quantize (prepare_fx + calibration on 128 images + convert): {t_quant:.1f} s")


if __name__ == "__main__":
    main()
