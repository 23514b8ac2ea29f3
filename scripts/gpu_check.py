"""CUDA check: scan agreement with mamba-ssm, the PTQ flow on CUDA tensors, float vs quantized Vim-T speed.

Run on a machine with a CUDA GPU (nothing is downloaded; mamba-ssm is optional)::

    python scripts/gpu_check.py --out gpu_check.json

Sections (each reports its own error and the script goes on):

1. ``scan``: the project's selective scan vs its sequential reference and, if ``mamba_ssm`` imports,
   vs ``selective_scan_fn`` (outputs and gradients), at Vim-T's sizes; and whether
   ``SelectiveScan`` dispatches to the kernel.
2. ``adapt``: if ``mamba_ssm`` imports, its ``Mamba`` (and the Vim fork's ``bimamba_type="v2"`` if
   the installed package is that fork) against ``adapt_mamba``'s replacement.
3. ``flow``: prepare -> calibrate -> convert (reference model: torch.ao's int8 kernels are CPU-only)
   on a randomly initialised Vim-T at 224 on CUDA, then timings of float (fused scan and own scan)
   and quantized forward passes.

Without CUDA it stops with "CUDA not available"; ``--cpu-smoke`` runs every section on the CPU at toy
sizes instead, to check the script itself.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import Tensor

import qmamba_ao
import qmamba_ao.models  # noqa: F401  (registers the timm names)
from qmamba_ao.models import adapt_mamba
from qmamba_ao.ssm import SelectiveScan, selective_scan, selective_scan_ref
from qmamba_ao.ssm.fused import fused_scan_fn, set_fused_scan

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


def log(msg: str) -> None:
    print(msg, flush=True)


def max_diff(a: Tensor, b: Tensor) -> dict[str, float]:
    a, b = a.detach().float(), b.detach().float()
    return {"max_abs": (a - b).abs().max().item(), "rel": ((a - b).norm() / b.norm().clamp_min(1e-30)).item()}


def section(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], out: str | None) -> None:
    """Run one check, record its result or its error, and save everything so far (a timeout keeps it)."""
    log(f"== {name}")
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # report and go on: one broken part should not hide the others
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        log(f"   FAILED: {type(exc).__name__}: {exc}")
    results[name]["seconds"] = round(time.perf_counter() - start, 2)
    log(f"   {json.dumps({k: v for k, v in results[name].items() if k != 'traceback'})}")
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


def mamba_ssm_scan() -> tuple[Callable[..., Tensor] | None, str]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return selective_scan_fn, "ok"


def check_scan(device: torch.device, smoke: bool) -> dict[str, Any]:
    b, d, n, length = (2, 16, 4, 12) if smoke else (2, 384, 16, 197)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(device)

    u, delta, z = rnd(b, d, length), rnd(b, d, length, scale=0.5), rnd(b, d, length)
    A = -torch.exp(rnd(d, n, scale=0.5))
    B, C = rnd(b, 1, n, length), rnd(b, 1, n, length)
    D, bias = rnd(d), rnd(d, scale=0.5) - 2.0
    args = (u, delta, A, B, C, D, z, bias, True)
    out: dict[str, Any] = {"shape": [b, d, n, length]}
    with torch.no_grad():
        ours = selective_scan(*args)
        out["ours_vs_ref"] = max_diff(ours, selective_scan_ref(*args))
    kernel, why = mamba_ssm_scan()
    if kernel is None:
        log(f"   SKIP mamba-ssm comparison: mamba_ssm is not importable ({why})")
        out["mamba_ssm"] = f"skipped: {why}"
    else:
        with torch.no_grad():
            out["ours_vs_mamba_ssm"] = max_diff(ours, kernel(*args))
        leaves = [t.clone().requires_grad_(True) for t in (u, delta, B, C)]
        weight = rnd(b, d, length)
        grads = []
        for fn in (selective_scan, kernel):
            xs = [t.detach().clone().requires_grad_(True) for t in leaves]
            (fn(xs[0], xs[1], A, xs[2], xs[3], D, z, bias, True) * weight).sum().backward()
            grads.append([x.grad for x in xs])
        out["grad_ours_vs_mamba_ssm"] = {k: max_diff(a, c) for k, a, c in zip("u delta B C".split(), *grads)}
    scan = SelectiveScan(d, n).to(device)
    with torch.no_grad():
        out["SelectiveScan_dispatches_to_kernel"] = fused_scan_fn(u) is not None
        out["SelectiveScan_forward_vs_own_scan"] = max_diff(scan(u, delta, B, C, z), scan.run(u, delta, B, C, z))
    return out


def check_adapt(device: torch.device, smoke: bool) -> dict[str, Any]:
    try:
        from mamba_ssm import Mamba
    except Exception as exc:
        log(f"   SKIP mamba-ssm adapter check: mamba_ssm is not importable ({type(exc).__name__}: {exc})")
        return {"skipped": f"mamba_ssm not importable: {type(exc).__name__}: {exc}"}
    d_model, length = (32, 12) if smoke else (192, 197)
    x = torch.randn(2, length, d_model, device=device)
    out: dict[str, Any] = {}
    variants: dict[str, dict[str, Any]] = {"mamba": {}, "vim_bimamba_v2": {"bimamba_type": "v2", "if_devide_out": True}}
    for name, kwargs in variants.items():
        try:
            torch.manual_seed(0)
            foreign = Mamba(d_model=d_model, d_state=16, **kwargs).to(device).eval()
        except TypeError as exc:
            out[name] = f"skipped: this mamba_ssm is not the Vim fork ({exc})"
            continue
        with torch.no_grad():
            for p in foreign.parameters():
                p.add_(0.05 * torch.randn_like(p))
            ref = foreign(x)
            adapted = adapt_mamba(copy.deepcopy(foreign))
            res = {"adapted_to": type(adapted).__name__, "fused_scan": max_diff(adapted(x), ref)}
            set_fused_scan(False)
            try:
                res["own_scan"] = max_diff(adapted(x), ref)
            finally:
                set_fused_scan(True)
        out[name] = res
    return out


def timed(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median wall time of ``fn`` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def check_flow(device: torch.device, smoke: bool, recipe: str, bits: int, batch: int, iters: int) -> dict[str, Any]:
    kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_classes=10) if smoke else {}
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", pretrained=False, **kwargs).eval().to(device)
    size = model.patch_embed.img_size
    g = torch.Generator(device="cpu").manual_seed(0)
    calib = [torch.randn(batch, 3, *size, generator=g).to(device) for _ in range(2)]
    x = torch.randn(batch, 3, *size, generator=g).to(device)
    out: dict[str, Any] = {"model": "vim_tiny_patch16_224" + (" (toy size)" if smoke else ""), "input": list(x.shape)}
    out.update(recipe=recipe, w_bits=bits, a_bits=bits)

    t0 = time.perf_counter()
    prepared = qmamba_ao.prepare(model, (calib[0],), recipe=recipe, w_bits=bits, a_bits=bits)
    t1 = time.perf_counter()
    log(f"   prepared in {t1 - t0:.1f} s")
    qmamba_ao.calibrate(prepared, calib, progress=False)
    t2 = time.perf_counter()
    log(f"   calibrated in {t2 - t1:.1f} s")
    quantized = qmamba_ao.convert(prepared, reference=True)
    t3 = time.perf_counter()
    out["stage_seconds"] = {"prepare": round(t1 - t0, 2), "calibrate": round(t2 - t1, 2), "convert": round(t3 - t2, 2)}
    with torch.inference_mode():
        ref = model(x)
        q = quantized(x)
    out["output_device"] = str(q.device)
    out["finite"] = bool(torch.isfinite(q).all())
    out["quantized_vs_float"] = max_diff(q, ref)

    ms: dict[str, float | None] = {}
    with torch.inference_mode():
        ms["float_fused_scan"] = timed(lambda: model(x), device, iters) if fused_scan_fn(x) else None
        set_fused_scan(False)
        try:
            ms["float_own_scan"] = timed(lambda: model(x), device, iters)
        finally:
            set_fused_scan(True)
        ms["quantized_reference"] = timed(lambda: quantized(x), device, iters)
    out["ms_per_batch"] = {k: None if v is None else round(v, 1) for k, v in ms.items()}
    return out


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    for pkg in ("mamba_ssm", "causal_conv1d", "transformers"):
        try:
            env[pkg] = getattr(importlib.import_module(pkg), "__version__", "installed")
        except Exception as exc:
            env[pkg] = f"not importable ({type(exc).__name__})"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU at toy sizes (checks the script)")
    parser.add_argument("--recipe", default="qmamba")
    parser.add_argument("--bits", type=int, default=8, help="weight and activation bits")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        log(
            f"CUDA not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}): this check needs a "
            "GPU. Use --cpu-smoke to run it on the CPU at toy sizes."
        )
        return 2
    else:
        device = torch.device("cuda")

    results: dict[str, Any] = {"environment": environment(device)}
    log(json.dumps(results["environment"]))
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    torch.backends.cudnn.allow_tf32 = False
    section(results, "scan", lambda: check_scan(device, args.cpu_smoke), args.out)
    section(results, "adapt", lambda: check_adapt(device, args.cpu_smoke), args.out)
    section(
        results,
        "flow",
        lambda: check_flow(
            device, args.cpu_smoke, args.recipe, args.bits, 2 if args.cpu_smoke else args.batch, args.iters
        ),
        args.out,
    )
    if args.out:
        log(f"wrote {args.out}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    log("FAILED sections: " + ", ".join(failed) if failed else "all sections ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
