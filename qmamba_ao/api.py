"""The library behind the ``qmamba-ao`` command: build, quantize, compare, save, load and export models.

Everything the command does is a function here, so that scripts, benchmarks and tests reach the same
code without going through argument parsing. Bad input raises :class:`QMambaError` with a message
that names the fix; the command prints it as one ``error: ...`` line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor, nn

from . import ptq
from .recipes import Recipe, get_recipe

if TYPE_CHECKING:
    from .export import OnnxExport

__all__ = [
    "QMambaError",
    "MODEL_PREFIXES",
    "model_names",
    "has_packaged_weights",
    "parse_bits",
    "atomic_write",
    "build_model",
    "load_checkpoint",
    "load_images",
    "resolve_recipes",
    "quantize_model",
    "agreement",
    "compare",
    "format_compare",
    "save_quantized",
    "load_quantized",
    "analyze",
    "check_export",
    "export",
]

#: Prefixes of the timm names that qmamba-ao registers.
MODEL_PREFIXES = ("vim_", "vmamba_", "vanilla_vmamba_")
#: Calibration images per forward pass.
CALIB_BATCH = 32


class QMambaError(ValueError):
    """Bad input to a qmamba-ao function (a name, a path, a size), with a message that names the fix."""


def model_names() -> list[str]:
    """The timm names qmamba-ao registers (Vim and VMamba families)."""
    import timm

    from . import models  # noqa: F401  (registration)

    return [n for n in timm.list_models() if n.startswith(MODEL_PREFIXES)]


def has_packaged_weights(model: Union[str, nn.Module]) -> bool:
    """Whether a model (or timm name) has trained weights shipped inside the package."""
    if isinstance(model, str):
        import timm

        from . import models  # noqa: F401  (registration)

        model = timm.create_model(model, pretrained=False)  # resolves aliases and tags
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return bool(cfg.get("file")) and Path(cfg["file"]).is_file()


def parse_bits(spec: str) -> list[tuple[int, int]]:
    """``"w8a8,w4a4"`` -> ``[(8, 8), (4, 4)]``."""
    out = []
    for item in spec.split(","):
        text = item.strip().lower()
        try:
            w, a = text.removeprefix("w").split("a")
            out.append((int(w), int(a)))
        except ValueError:
            raise QMambaError(f"bad bit width {item!r}; write it as wXaY, e.g. w4a4 or w8a8") from None
    return out


def atomic_write(path: Union[str, Path], write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file, then move it to ``path``: an interrupted run leaves no
    half-written output (and no temporary file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_model(name: str, checkpoint: Optional[Union[str, Path]] = None) -> nn.Module:
    """A timm model by name, in eval mode: the packaged weights when there are any, else a random
    initialisation; ``checkpoint`` (official or qmamba-ao) loads through the family's filter."""
    import timm

    from . import models  # noqa: F401  (registration)

    if not timm.is_model(name):
        raise QMambaError(f"unknown model {name!r}; qmamba-ao registers: {', '.join(model_names())}")
    model = timm.create_model(name, pretrained=checkpoint is None and has_packaged_weights(name))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name)
    return model.eval()


def load_checkpoint(model: nn.Module, path: Union[str, Path], name: Optional[str] = None) -> nn.Module:
    """Load an official or qmamba-ao checkpoint into ``model`` (in place) through its family's filter;
    ``name`` (default: the class name) is how errors call the model."""
    from .models import checkpoint_filter

    path = Path(path)
    if not path.is_file():
        raise QMambaError(f"checkpoint {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=False)
    name = name or type(model).__name__
    try:
        model.load_state_dict(checkpoint_filter(model)(state, model))
    except (ValueError, RuntimeError) as e:
        raise QMambaError(f"checkpoint {path} does not fit {name}: {e}") from None
    return model


def load_images(
    data: Union[str, Path], split: str, size: Optional[int], seed: int = 0, model: Optional[nn.Module] = None
) -> tuple[Tensor, Tensor]:
    """:func:`qmamba_ao.data.load_split` with its errors (missing data, too many images) as QMambaError."""
    from .data import DataError, load_split

    try:
        return load_split(data, split, size, seed, model)
    except (DataError, ValueError) as e:
        raise QMambaError(str(e)) from None


def resolve_recipes(names: Union[str, Sequence[Union[str, Recipe]]]) -> list[Recipe]:
    """Recipes from names (``"qmamba,minmax"`` or a list): fails on the first unknown one, before any work."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    try:
        return [get_recipe(n) for n in names]
    except (KeyError, ValueError) as e:
        raise QMambaError(e.args[0] if e.args else str(e)) from None


def _recipe_name(recipe: Union[str, Recipe]) -> str:
    return recipe if isinstance(recipe, str) else recipe.name


def quantize_model(
    model: nn.Module,
    calib: Tensor,
    recipe: Union[str, Recipe],
    w_bits: int,
    a_bits: int,
    options: Optional[Mapping[str, Any]] = None,
) -> torch.fx.GraphModule:
    """:func:`qmamba_ao.quantize` on calibration images (in batches of 32), the reference conversion."""
    try:
        return ptq.quantize(model, list(calib.split(CALIB_BATCH)), recipe, w_bits, a_bits, **dict(options or {}))
    except ValueError as e:
        raise QMambaError(str(e)) from None


def agreement(preds: Tensor, reference: Tensor) -> float:
    """Percentage of predictions equal to the reference ones."""
    return 100.0 * (preds == reference).float().mean().item()


def compare(
    model: nn.Module,
    calib: Tensor,
    images: Tensor,
    labels: Tensor,
    recipes: Sequence[Union[str, Recipe]],
    bits: Sequence[tuple[int, int]],
    options: Optional[Mapping[str, Any]] = None,
) -> list[dict[str, Any]]:
    """Float row first, then every recipe x bit width: top-1, top-5, agreement with float, seconds."""
    fp = ptq.evaluate(model, images, labels, desc="float")
    records = [{"recipe": "fp", "w_bits": 32, "a_bits": 32, "top1": fp["top1"], "top5": fp["top5"], "agree": 100.0}]
    for recipe in recipes:
        name = _recipe_name(recipe)
        for w_bits, a_bits in bits:
            t0 = time.perf_counter()
            q = quantize_model(model, calib, recipe, w_bits, a_bits, options)
            r = ptq.evaluate(q, images, labels, desc=f"{name} W{w_bits}A{a_bits}")
            records.append(
                {
                    "recipe": name,
                    "w_bits": w_bits,
                    "a_bits": a_bits,
                    "top1": r["top1"],
                    "top5": r["top5"],
                    "agree": agreement(r["preds"], fp["preds"]),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
    return records


def format_compare(records: Sequence[Mapping[str, Any]]) -> str:
    """The records of :func:`compare` as a GitHub-markdown table."""
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


def save_quantized(
    path: Union[str, Path],
    quantized: nn.Module,
    model_name: str,
    recipe: Union[str, Recipe],
    w_bits: int,
    a_bits: int,
    options: Optional[Mapping[str, Any]] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    reference: bool = True,
) -> None:
    """Save a quantized model as its recipe, bit widths and state dict (what :func:`load_quantized` reads)."""
    record = {
        "model": model_name,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "recipe": _recipe_name(recipe),
        "w_bits": w_bits,
        "a_bits": a_bits,
        "options": dict(options or {}),
        "reference": reference,
        "state_dict": quantized.state_dict(),
    }
    atomic_write(path, lambda p: torch.save(record, p))


def load_quantized(path: Union[str, Path]) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_quantized`; returns it and the saved record.

    The recipe's rewrite without calibration data gives the same module structure with neutral
    values, prepare/convert the same graph, and the saved state dict then supplies every value.
    """
    path = Path(path)
    if not path.is_file():
        raise QMambaError(f"quantized model {path} not found")
    record = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(record, dict) or "state_dict" not in record or "recipe" not in record:
        raise QMambaError(f"{path} is not a file written by `qmamba-ao quantize --output`")
    (recipe,) = resolve_recipes([record["recipe"]])
    model = build_model(record["model"], record.get("checkpoint"))
    example = torch.zeros(1, *model.pretrained_cfg["input_size"])
    model = recipe.rewrite(model, None)  # the module structure of the saved model, neutral values
    prepared = ptq.prepare(model, (example,), recipe, record["w_bits"], record["a_bits"], **record["options"])
    ptq.calibrate(prepared, [example], progress=False)  # buffer shapes only; the saved state replaces the values
    quantized = ptq.convert(prepared, reference=record.get("reference", True))
    quantized.load_state_dict(record["state_dict"])
    return quantized, record


def analyze(model: nn.Module, images: Tensor, bits: int, output: Union[str, Path]) -> dict[str, Any]:
    """Record the scan sites on ``images``; write ``analysis.json`` (statistics and quantization errors
    at ``bits``) and ``sites.png`` (``None`` under ``"figure"`` when matplotlib is missing) to ``output``."""
    from .analysis import collect_sites, plot_sites, quantization_error_table, site_statistics

    records = collect_sites(model, images)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stats = site_statistics(records)
    errors = quantization_error_table(records, bits=bits)
    payload = json.dumps({"statistics": stats, "errors": errors}, indent=1, default=float)
    atomic_write(out / "analysis.json", lambda p: p.write_text(payload))
    try:
        figure: Optional[Path] = plot_sites(records, out / "sites.png")
    except ImportError:
        figure = None
    return {"statistics": stats, "errors": errors, "figure": figure, "json": out / "analysis.json"}


def check_export(output: Union[str, Path], opset: Optional[int] = None) -> int:
    """Fail early (before any model or data loads) on what ONNX export cannot do; returns the opset."""
    from .export import DEFAULT_OPSET, ExportError
    from .export.onnx import check_opset, require

    opset = DEFAULT_OPSET if opset is None else opset
    try:
        require("onnx", "onnxscript")
        check_opset(opset)
    except (ImportError, ExportError) as e:
        raise QMambaError(str(e)) from None
    if Path(output).suffix != ".onnx":
        raise QMambaError(f"--output must name an .onnx file; got {str(output)!r}")
    return opset


def export(
    model: nn.Module,
    calib: Tensor,
    recipe: Union[str, Recipe],
    w_bits: int,
    a_bits: int,
    output: Union[str, Path],
    opset: Optional[int] = None,
    recurrence: str = "scan",
    options: Optional[Mapping[str, Any]] = None,
) -> OnnxExport:
    """Quantize for export on ``calib`` and write ONNX with QuantizeLinear/DequantizeLinear nodes."""
    from .export import export_onnx, quantize_for_export

    opset = check_export(output, opset)
    try:
        q = quantize_for_export(
            model, list(calib.split(CALIB_BATCH)), recipe, w_bits, a_bits, recurrence=recurrence, **dict(options or {})
        )
        return export_onnx(q, calib[:2], output, opset=opset)
    except (ValueError, ImportError) as e:
        raise QMambaError(str(e)) from None
