"""Packed integer weights in safetensors: 4-bit (and narrower) codes two per byte, 8-bit codes one per byte.

A converted model (from :func:`qmamba_ao.export.to_exportable`) keeps each quantized layer's float weight
next to its scale and zero point and quantizes it on the fly. :func:`save_packed` stores the integer
codes instead; :func:`load_packed` puts ``scale * (code - zero_point)`` back, which quantizes to the
same codes, so the loaded model computes exactly what the saved one did. Every other tensor of the
state dict (norms, scan parameters, qparams) is stored as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule

from ..observers.affine import bits_of_range

__all__ = ["pack_nibbles", "unpack_nibbles", "save_packed", "load_packed", "quantized_weights", "METADATA_KEY"]

METADATA_KEY = "qmamba_ao.packed_weights"
EXTRAS_KEY = "qmamba_ao.state_extras"


def pack_nibbles(codes: Tensor, quant_min: int) -> Tensor:
    """Integer codes in ``[quant_min, quant_min + 15]`` -> uint8, two per byte (first code in the low nibble)."""
    shifted = codes.reshape(-1).to(torch.int16) - quant_min
    if shifted.numel() and (int(shifted.min()) < 0 or int(shifted.max()) > 15):
        raise ValueError(f"codes must lie in [{quant_min}, {quant_min + 15}]; they do not fit 4 bits")
    flat = shifted.to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: Tensor, quant_min: int, shape: tuple[int, ...], dtype: torch.dtype = torch.int8) -> Tensor:
    """Inverse of :func:`pack_nibbles`."""
    n = 1
    for s in shape:
        n *= s
    lo, hi = packed & 0x0F, packed >> 4
    flat = torch.stack([lo, hi], dim=1).reshape(-1)[:n]
    return (flat.to(torch.int16) + quant_min).to(dtype).reshape(shape)


def quantized_weights(model: nn.Module) -> dict[str, ReferenceQuantizedModule]:
    """Layers of a converted model whose weights are quantized (torch.ao reference modules)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ReferenceQuantizedModule)}


def _codes(mod: ReferenceQuantizedModule) -> Tensor:
    with torch.no_grad():
        return mod.get_quantized_weight()


def save_packed(model: nn.Module, path: Union[str, Path]) -> dict[str, int]:
    """Write the converted ``model``'s state to ``path`` (safetensors) with integer weight codes.

    Returns ``{"bytes": file size, "weights": number of packed layers}``.
    """
    from safetensors.torch import save_file

    layers = quantized_weights(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no quantized weights (torch.ao reference modules); convert it with "
            "qmamba_ao.export.to_exportable(prepared) first"
        )
    tensors: dict[str, Tensor] = {}
    meta: dict[str, dict] = {}
    packed_keys = {f"{name}.weight" for name in layers}
    extras: dict[str, str] = {}  # non-tensor entries (qscheme, dtype, ranges of reference modules)
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            extras[key] = repr(value)
        elif key not in packed_keys:
            tensors[key] = value.detach().contiguous().clone()
    for name, mod in layers.items():
        codes = _codes(mod)
        qmin, qmax = int(mod.weight_quant_min), int(mod.weight_quant_max)
        bits = bits_of_range(qmin, qmax)
        nibbles = bits <= 4
        tensors[f"{name}.weight.codes"] = pack_nibbles(codes, qmin) if nibbles else codes.to(torch.int8).contiguous()
        meta[name] = {
            "bits": bits,
            "shape": list(codes.shape),
            "quant_min": qmin,
            "quant_max": qmax,
            "nibbles": nibbles,
        }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta), EXTRAS_KEY: json.dumps(extras)})
    return {"bytes": path.stat().st_size, "weights": len(layers)}


def _dequantize(codes: Tensor, mod: ReferenceQuantizedModule) -> Tensor:
    scale, zp = mod.weight_scale.float(), mod.weight_zero_point.float()
    if mod.weight_qscheme in (torch.per_channel_affine, torch.per_channel_affine_float_qparams):
        shape = [1] * codes.dim()
        shape[int(mod.weight_axis_int)] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (codes.float() - zp) * scale


def load_packed(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load a file written by :func:`save_packed` into a converted model of the same structure (in place).

    The weights come back as ``scale * (code - zero_point)``: they quantize to exactly the saved codes.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if METADATA_KEY not in header:
        raise ValueError(f"{path} was not written by qmamba_ao.export.save_packed (no {METADATA_KEY!r} metadata)")
    meta = json.loads(header[METADATA_KEY])
    saved_extras = json.loads(header.get(EXTRAS_KEY, "{}"))
    tensors = load_file(str(path))
    layers = quantized_weights(model)
    missing = sorted(set(meta) - set(layers))
    if missing:
        raise ValueError(f"{path} holds packed weights for layers the model lacks: {missing[:5]}")
    # qparams first: the weights are rebuilt from the loaded scales and zero points.
    state: dict = {k: v for k, v in tensors.items() if not k.endswith(".weight.codes")}
    # Non-tensor entries describe the structure (qscheme, dtype, range): the model's own must match.
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            if saved_extras.get(key, repr(value)) != repr(value):
                raise ValueError(
                    f"{path}: {key} was {saved_extras[key]} when saved but the model has {value!r}; "
                    "convert the model with the same recipe and bit widths"
                )
            state[key] = value
    model.load_state_dict(state, strict=False)
    for name, info in meta.items():
        blob = tensors[f"{name}.weight.codes"]
        shape = tuple(info["shape"])
        codes = unpack_nibbles(blob, info["quant_min"], shape) if info["nibbles"] else blob.reshape(shape)
        state[f"{name}.weight"] = _dequantize(codes, layers[name])
    model.load_state_dict(state, strict=True)
    return model
