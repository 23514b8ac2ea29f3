"""The library behind the ``qmamba-ao`` command: build, quantize, compare, save, load and export models.

Everything the command does is a function here, so that scripts, benchmarks and tests reach the same
code without going through argument parsing. Bad input raises :class:`QMambaError` with a message
that names the fix; the command prints it as one ``error: ...`` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import stat
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor, nn

from . import distributed, ptq
from .recipes import Recipe, bits_label, get_recipe

if TYPE_CHECKING:
    from .export import OnnxExport

__all__ = [
    "QMambaError",
    "MODEL_PREFIXES",
    "model_names",
    "has_packaged_weights",
    "parse_bits",
    "check_bits",
    "check_size",
    "check_output",
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
#: Bit widths the quantizers support.
MIN_BITS, MAX_BITS = 2, 8
#: Version of the file :func:`save_quantized` writes (files without one are version 1, without a checksum).
QUANTIZED_FORMAT = 2
#: The keys of a saved quantized model's record, and the types of their values.
_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "checkpoint": (str, type(None)),
    "recipe": (str,),
    "w_bits": (int,),
    "a_bits": (int,),
    "options": (dict,),
    "reference": (bool,),
    "state_dict": (dict,),
}


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


def check_bits(bits: Any, name: str = "--bits") -> int:
    """``bits`` if it is a supported bit width (an integer in 2..8), else QMambaError naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QMambaError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}; got {bits!r}")
    return bits


def parse_bits(spec: str) -> list[tuple[int, int]]:
    """``"w8a8,w4a4"`` -> ``[(8, 8), (4, 4)]``; every width must be in 2..8."""
    out = []
    for item in spec.split(","):
        text = item.strip().lower()
        try:
            w, a = text.removeprefix("w").split("a")
            bits = int(w), int(a)
        except ValueError:
            raise QMambaError(f"bad bit width {item!r}; write it as wXaY, e.g. w4a4 or w8a8") from None
        if not all(MIN_BITS <= b <= MAX_BITS for b in bits):
            raise QMambaError(
                f"bad bit width {item!r}: weight and activation bits must be in {MIN_BITS}..{MAX_BITS} (e.g. w4a4)"
            )
        out.append(bits)
    return out


def check_size(value: Optional[int], name: str, minimum: int = 1) -> Optional[int]:
    """``value`` (an image count; ``None`` means all) if it is at least ``minimum``, else QMambaError naming it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise QMambaError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


# -- writing outputs ---------------------------------------------------------------------------------------

_NOT_FOLLOWED = (
    "symbolic links are refused as outputs: following one could replace a file outside the output path; "
    "give the path of a regular file (or remove the link)"
)


def _kind_of(mode: int) -> str:
    for test, kind in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _probe(folder: Path, label: str, path: Path) -> None:
    """Create and remove a temporary file in ``folder``: the only sure test that files can be created there."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".partial")
    except OSError as e:
        raise QMambaError(f"{label} {path}: cannot create files in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def _existing_ancestor(path: Path, label: str) -> Path:
    """The nearest existing folder above ``path`` (the folders below it are created when writing)."""
    parent = path.parent
    while not os.path.lexists(parent):
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        beyond = "" if parent == path.parent else f", so {path.parent} cannot be created"
        raise QMambaError(f"{label} {path}: {parent} is not a folder{beyond}")
    return parent


def check_output(path: Union[str, Path], kind: str = "file", label: str = "output") -> Path:
    """Fail now, before any work, unless ``path`` can be written: returns it as a Path.

    ``kind="file"``: ``path`` must be missing or an existing regular file, and its folder (or the nearest
    existing folder above it, when folders are to be created) must accept new files. ``kind="folder"``:
    ``path`` must be missing or an existing folder that accepts new files. Symbolic links, devices,
    FIFOs and sockets are refused: writing replaces the output, and replacing one of those would
    destroy it (or, for a link, write somewhere other than ``path``). ``label`` names the option in errors.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder'; got {kind!r}")
    path = Path(path)
    if str(path) in ("", "."):
        raise QMambaError(f"{label}: give a {kind} name; got {str(path)!r}")
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # the latter: a file above it (reported below)
        st = None
    except OSError as e:
        raise QMambaError(f"{label} {path}: cannot be inspected ({e.strerror or e})") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise QMambaError(f"{label} {path} is a symbolic link; {_NOT_FOLLOWED}")
    if kind == "folder":
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise QMambaError(f"{label} {path} is {_kind_of(st.st_mode)}, not a folder; give a folder name")
        _probe(path if st is not None else _existing_ancestor(path / "x", label), label, path)
        return path
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise QMambaError(f"{label} {path} is a folder; give a file name (e.g. {path / 'out'}{path.suffix})")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise QMambaError(
            f"{label} {path} is {_kind_of(st.st_mode)}; outputs are written only to regular files "
            "(writing replaces the file, which would destroy the device node)"
        )
    _probe(path.parent if st is not None else _existing_ancestor(path, label), label, path)
    return path


class _Staging:
    """Write files under temporary names next to their targets, then move them all into place.

    Nothing outside the targets and their temporary files is written; a failure or an interrupt
    (``abort``) removes the temporary files and the folders this staging created.
    """

    def __init__(self, label: str = "output") -> None:
        self.label = label
        self.staged: list[tuple[Path, Path]] = []
        self.created: list[Path] = []

    def mkdir(self, folder: Path) -> None:
        missing = []
        while not os.path.lexists(folder) and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for f in reversed(missing):
            try:
                f.mkdir()
            except OSError as e:
                raise QMambaError(f"{self.label}: cannot create folder {f} ({e.strerror or e})") from None
            self.created.append(f)

    def stage(self, path: Path, write: Callable[[Path], Any]) -> None:
        path = check_output(path, "file", self.label)
        self.mkdir(path.parent)
        try:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".partial{path.suffix}")
        except OSError as e:
            raise QMambaError(f"{self.label} {path}: cannot create a file there ({e.strerror or e})") from None
        os.close(fd)
        tmp = Path(name)
        self.staged.append((tmp, path))
        try:
            write(tmp)
        except OSError as e:
            raise QMambaError(f"{self.label} {path}: writing failed ({e.strerror or e})") from None
        try:
            old = os.lstat(path)
        except FileNotFoundError:
            old = None
        if old is not None and stat.S_ISREG(old.st_mode):
            os.chmod(tmp, stat.S_IMODE(old.st_mode))  # an existing file keeps its permissions ...
            if (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
                try:
                    os.chown(tmp, old.st_uid, old.st_gid)  # ... and, where allowed, its owner
                except OSError:
                    pass
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # a new one gets the mode open() would give it

    def commit(self) -> None:
        for tmp, path in self.staged:
            check_output(path, "file", self.label)  # still a regular file (or missing), not a link or device
            os.replace(tmp, path)
        self.staged = []
        self.created = []

    def abort(self) -> None:
        for tmp, _ in self.staged:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                pass
        self.staged = []
        self.created = []


def atomic_write(path: Union[str, Path], write: Callable[[Path], Any], label: str = "output") -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it onto ``path``.

    ``path`` is checked first (:func:`check_output`: a regular file or nothing, never a link or a
    device); missing folders are created. An existing file keeps its permissions. A failure or an
    interrupt leaves neither a half-written output nor a temporary file nor a created folder;
    ``OSError`` while writing becomes QMambaError naming ``path``.
    """
    staging = _Staging(label)
    try:
        staging.stage(Path(path), write)
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    return Path(path)


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
    state = _torch_load(path, "checkpoint", "a checkpoint", safe=_CHECKPOINT_GLOBALS)
    if not isinstance(state, Mapping):
        raise QMambaError(f"{path} is not a checkpoint: it holds a {type(state).__name__}, not a dict of tensors")
    name = name or type(model).__name__
    try:
        model.load_state_dict(checkpoint_filter(model)(state, model))
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise QMambaError(f"checkpoint {path} does not fit {name}: {e}") from None
    return model


def _checkpoint_globals() -> list[Any]:
    import argparse

    return [argparse.Namespace]  # the training arguments official Vim checkpoints carry (plain attributes)


#: Classes a checkpoint may hold besides tensors and plain containers.
_CHECKPOINT_GLOBALS = _checkpoint_globals()


def _held_globals(path: Path, error: Exception) -> list[str]:
    """The classes and functions a file would need unpickled (what ``weights_only`` refused)."""
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip-format file: the refusal names the first one
        found = []
    return found or re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def _torch_load(path: Path, label: str, what: str, safe: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)``: only tensors, plain containers and the ``safe`` classes are
    rebuilt, so a crafted file cannot run code; every failure is one QMambaError naming ``path``."""
    if not path.is_file():
        raise QMambaError(f"{label} {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise QMambaError(f"{path} is not {what}: the file is empty")
    try:
        with torch.serialization.safe_globals(list(safe)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pickle protocol notes; failures are reported below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        held = _held_globals(path, e)
        if held:
            raise QMambaError(
                f"{path} is not {what}: it holds {', '.join(held)}; only tensors and plain containers are loaded"
            ) from None
        raise QMambaError(f"{path} is not {what}: it cannot be read as tensors and plain containers") from None
    except PermissionError as e:
        raise QMambaError(f"{label} {path} cannot be read ({e.strerror or e})") from None
    except (EOFError, RuntimeError, KeyError, ValueError, zipfile.BadZipFile, UnicodeDecodeError, OSError) as e:
        detail = str(e).splitlines()[0].split(". ")[0] if str(e) else "unexpected end of data"
        if isinstance(e, KeyError):  # the legacy reader met bytes that are no pickle
            detail = "its bytes are not a torch.save file"
        raise QMambaError(f"{path} is not {what} or is damaged (truncated or overwritten): {detail}") from None


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
    route: str = "fx",
) -> torch.fx.GraphModule:
    """:func:`qmamba_ao.quantize` on calibration images (in batches of 32), the reference conversion.

    Under a process group every process passes the same ``calib`` and calibrates on its own share
    (:func:`qmamba_ao.distributed.calibration_shard`); the observers are merged at the end, into
    the statistics one process would have (:func:`qmamba_ao.distributed.calibration_offsets`).
    ``route="pt2e"``: the PT2E route (torchao), in one process; a missing torchao is a QMambaError
    saying what to install.
    """
    if route == "pt2e":
        if distributed.world_size() > 1:
            raise QMambaError("--route pt2e calibrates in one process; run it without torchrun (or use --route fx)")
        try:
            return ptq.quantize(
                model, list(calib.split(CALIB_BATCH)), recipe, w_bits, a_bits, route="pt2e", **dict(options or {})
            )
        except (ValueError, ImportError) as e:
            raise QMambaError(str(e)) from None
    if route != "fx":
        raise QMambaError(f"route {route!r}: use 'fx' or 'pt2e'")
    shard = distributed.calibration_offsets(len(calib), CALIB_BATCH)
    calib = distributed.calibration_shard(calib, CALIB_BATCH)
    options = {**dict(options or {}), "shard": shard}
    try:
        return ptq.quantize(model, list(calib.split(CALIB_BATCH)), recipe, w_bits, a_bits, **options)
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
    route: str = "fx",
) -> list[dict[str, Any]]:
    """Float row first, then every recipe x bit width: top-1, top-5, agreement with float, seconds
    (``route``: ``"fx"`` or ``"pt2e"``, see :func:`quantize_model`)."""
    fp = ptq.evaluate(model, images, labels, desc="float")
    records = [{"recipe": "fp", "w_bits": 32, "a_bits": 32, "top1": fp["top1"], "top5": fp["top5"], "agree": 100.0}]
    site_bits = dict((options or {}).get("site_bits") or {})
    for recipe in recipes:
        name = _recipe_name(recipe)
        for w_bits, a_bits in bits:
            t0 = time.perf_counter()
            q = quantize_model(model, calib, recipe, w_bits, a_bits, options, route)
            r = ptq.evaluate(q, images, labels, desc=f"{name} {bits_label(w_bits, a_bits, site_bits)}")
            records.append(
                {
                    "recipe": name,
                    "reconstructed": ptq.reconstruct_options((options or {}).get("reconstruct")) is not None,
                    # ptq4vm / ptq4vm-naive-ssm reconstruct by themselves (JLSS): not flagged in their label
                    "w_bits": w_bits,
                    "a_bits": a_bits,
                    "top1": r["top1"],
                    "top5": r["top5"],
                    "agree": agreement(r["preds"], fp["preds"]),
                    "seconds": round(time.perf_counter() - t0, 1),
                    **({"site_bits": site_bits} if site_bits else {}),
                }
            )
    return records


def format_compare(records: Sequence[Mapping[str, Any]]) -> str:
    """The records of :func:`compare` as a GitHub-markdown table."""
    from tabulate import tabulate

    rows = [
        [
            r["recipe"] + (" + reconstruction" if r.get("reconstructed") else ""),
            "fp32" if r["recipe"] == "fp" else bits_label(r["w_bits"], r["a_bits"], r.get("site_bits")),
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
    """Save a quantized model as its recipe, bit widths and state dict (what :func:`load_quantized` reads).

    The record also holds a format version and a SHA-256 over its fields and every state-dict value,
    which :func:`load_quantized` verifies. ``checkpoint`` is kept for information only: the state
    dict holds every weight, so loading never needs that file.
    """
    record: dict[str, Any] = {
        "model": model_name,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "recipe": _recipe_name(recipe),
        "w_bits": w_bits,
        "a_bits": a_bits,
        # the mapping options rebuild the structure; reconstruction only changed values the state dict holds
        "options": {k: v for k, v in dict(options or {}).items() if k != "reconstruct"},
        "reference": reference,
        "state_dict": quantized.state_dict(),
        "format": QUANTIZED_FORMAT,
    }
    record["sha256"] = _digest(record)
    atomic_write(path, lambda p: torch.save(record, p), label="quantized model")


def _lacks_ltsq_kinds(model: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    """Whether a saved state dict predates LtSQ quantizers keeping their transform kind as a buffer."""
    from .observers import FrozenLtSQ

    return any(f"{name}.kind_id" not in state_dict for name, m in model.named_modules() if isinstance(m, FrozenLtSQ))


def _feed(h: Any, value: Any) -> None:
    """Hash one state-dict value: a tensor's dtype, shape and bytes; containers item by item; else its repr."""
    if isinstance(value, Tensor):
        t = value.detach().cpu()
        if t.is_quantized:
            h.update(f"{t.qscheme()}".encode())
            if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                h.update(f"{t.q_scale()!r},{t.q_zero_point()}".encode())
            else:
                _feed(h, t.q_per_channel_scales())
                _feed(h, t.q_per_channel_zero_points())
                h.update(f"{t.q_per_channel_axis()}".encode())
            t = t.int_repr()
        t = t.contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (tuple, list)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"V{value!r}".encode())


def _digest(record: Mapping[str, Any]) -> str:
    """SHA-256 over a quantized record's fields (but ``sha256``) and its state dict in key order."""
    h = hashlib.sha256()
    meta = {k: v for k, v in record.items() if k not in ("state_dict", "sha256")}
    h.update(json.dumps(meta, sort_keys=True, default=repr).encode())
    for key, value in record["state_dict"].items():
        h.update(f"K{key}".encode())
        _feed(h, value)
    return h.hexdigest()


def _state_value_ok(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.is_quantized or not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return all(_state_value_ok(v) for v in value)
    return value is None or isinstance(value, (torch.dtype, torch.qscheme, int, float, bool, str))


def _check_record(path: Path, record: Any) -> str:
    """Raise unless ``record`` is a quantized model's record; returns how its integrity was checked."""
    not_ours = f"{path} is not a file written by `qmamba-ao quantize --output`"
    if not isinstance(record, dict):
        raise QMambaError(f"{not_ours}: it holds a {type(record).__name__}, not a dict")
    missing = [k for k in _RECORD_TYPES if k not in record]
    if missing:
        raise QMambaError(f"{not_ours}: it lacks {', '.join(missing)}")
    for key, types in _RECORD_TYPES.items():
        if not isinstance(record[key], types) or (types == (int,) and isinstance(record[key], bool)):
            raise QMambaError(f"{not_ours}: its {key} is a {type(record[key]).__name__}")
    version = record.get("format", 1)
    if not isinstance(version, int) or version > QUANTIZED_FORMAT:
        raise QMambaError(
            f"{path} has format {version!r}, newer than this qmamba-ao reads (1..{QUANTIZED_FORMAT}); upgrade qmamba-ao"
        )
    if "sha256" in record:
        if record["sha256"] != _digest(record):
            raise QMambaError(
                f"{path} is damaged: its contents do not match the SHA-256 stored in it (the file was modified "
                "or corrupted after saving); quantize again to get a good copy"
            )
        return "sha256 verified"
    if version >= 2:
        raise QMambaError(f"{path} is damaged: its format {version} record has no checksum")
    state = record["state_dict"]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not _state_value_ok(v)]
    if bad:
        raise QMambaError(f"{path} is damaged: non-finite or unexpected values in {', '.join(map(str, bad[:5]))}")
    return (
        "no checksum (saved by an older qmamba-ao): only its structure and finiteness were checked; "
        "quantize again for a file with a checksum"
    )


def load_quantized(path: Union[str, Path]) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_quantized`; returns it and the saved record.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain containers only), its
    checksum verified (files saved before checksums: their structure and finiteness checked; the
    record's ``"integrity"`` says which). The architecture is built without weights and the saved
    state supplies every value, so neither the packaged weights nor the checkpoint the model was
    quantized from are needed (except for older files of LtSQ recipes, which lack the transform
    kinds: those are derived from the original weights, as the version that saved them did).
    """
    import timm

    from . import models  # noqa: F401  (registration)

    path = Path(path)
    record = _torch_load(path, "quantized model", "a file written by `qmamba-ao quantize --output`")
    integrity = _check_record(path, record)
    resolve_recipes([record["recipe"]])
    for key in ("w_bits", "a_bits"):
        if not MIN_BITS <= record[key] <= MAX_BITS:
            raise QMambaError(f"{path} is damaged: {key}={record[key]} is outside {MIN_BITS}..{MAX_BITS}")
    if not (record["model"].startswith(MODEL_PREFIXES) and timm.is_model(record["model"])):
        raise QMambaError(f"{path} holds model {record['model']!r}, which this qmamba-ao does not register")
    quantized = _rebuild(path, record, timm.create_model(record["model"], pretrained=False).eval())
    if _lacks_ltsq_kinds(quantized, record["state_dict"]):
        # Saved before the LtSQ transform kinds were stored: derive them as that version did, by
        # calibrating the model with its original weights on a zero image.
        checkpoint = record["checkpoint"]
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise QMambaError(
                f"{path} was saved by an older qmamba-ao, which did not store the LtSQ transform kinds; "
                f"rebuilding them needs the checkpoint it was quantized from, {checkpoint}, which is not found "
                f"from {Path.cwd()}: run from the folder it was saved in, or quantize again for a self-contained file"
            )
        quantized = _rebuild(path, record, build_model(record["model"], checkpoint))
    record["integrity"] = integrity
    return quantized, record


def _rebuild(path: Path, record: dict[str, Any], model: nn.Module) -> torch.fx.GraphModule:
    """The recipe's rewrite without calibration data gives the saved module structure with neutral values;
    prepare/convert give the same graph, and the saved state dict then supplies every value."""
    (recipe,) = resolve_recipes([record["recipe"]])
    example = torch.zeros(1, *model.pretrained_cfg["input_size"])
    try:
        model = recipe.rewrite(model, None)
        prepared = ptq.prepare(model, (example,), recipe, record["w_bits"], record["a_bits"], **record["options"])
        # buffer shapes only; the saved state replaces values (every process loads the same file: nothing to merge)
        ptq.calibrate(prepared, [example], progress=False, sync=False)
        quantized = ptq.convert(prepared, reference=record["reference"])
        quantized.load_state_dict(record["state_dict"])
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        raise QMambaError(f"{path} does not rebuild into {record['model']} {record['recipe']}: {e}") from None
    return quantized


def analyze(model: nn.Module, images: Tensor, bits: int, output: Union[str, Path]) -> dict[str, Any]:
    """Record the scan sites on ``images``; write ``analysis.json`` (statistics and quantization errors
    at ``bits``) and ``sites.png`` (``None`` under ``"figure"`` when matplotlib is missing) to ``output``.

    ``output`` is checked before any work; both files are written together at the end, so a failed
    or interrupted run leaves neither of them (nor a folder it created).
    """
    from .analysis import collect_sites, plot_sites, quantization_error_table, site_statistics

    bits = check_bits(bits)
    out = check_output(output, "folder", "analysis folder")
    for name in ("analysis.json", "sites.png"):
        check_output(out / name, "file", "analysis folder")
    records = collect_sites(model, images)
    stats = site_statistics(records)
    errors = quantization_error_table(records, bits=bits)
    payload = json.dumps({"statistics": stats, "errors": errors}, indent=1, default=float)
    staging = _Staging("analysis folder")
    figure: Optional[Path] = out / "sites.png"
    try:
        staging.mkdir(out)
        staging.stage(out / "analysis.json", lambda p: p.write_text(payload))
        try:
            staging.stage(out / "sites.png", lambda p: plot_sites(records, p))
        except ImportError:
            tmp, _ = staging.staged.pop()
            tmp.unlink()
            figure = None
        staging.commit()
    except BaseException:
        staging.abort()
        raise
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
    check_output(output, "file", "--output")
    return opset


#: Export traces with the first two calibration images: with a batch of 1, torch.export would
#: specialise the batch dimension to 1 and the exported model could not keep it dynamic.
EXPORT_MIN_CALIB = 2


def export_calib_message(size: int) -> str:
    return (
        f"export needs --calib-size >= {EXPORT_MIN_CALIB}; got {size}: the model is traced with a batch of "
        f"{EXPORT_MIN_CALIB} calibration images so that the exported batch dimension stays dynamic"
    )


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
    if len(calib) < EXPORT_MIN_CALIB:
        raise QMambaError(export_calib_message(len(calib)))
    try:
        q = quantize_for_export(
            model, list(calib.split(CALIB_BATCH)), recipe, w_bits, a_bits, recurrence=recurrence, **dict(options or {})
        )
        return export_onnx(q, calib[:2], output, opset=opset)
    except (ValueError, ImportError) as e:
        raise QMambaError(str(e)) from None
