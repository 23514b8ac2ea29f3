"""Calibration and evaluation data: Fashion-MNIST IDX files and ImageNet-style image folders.

Fashion-MNIST is found from an explicit path, the ``QMAMBA_DATA`` variable, or Debian's package
``dataset-fashion-mnist`` (gzipped IDX files under /usr/share/datasets/fashion-mnist). An explicit path or
``QMAMBA_DATA`` is the only place looked at, so a wrong folder fails instead of quietly falling back to
another copy of the data.

The IDX files (gzipped or plain) are read straight into tensors on each load instead of being unpacked
into a cache folder for torchvision to read. A shared cache must be keyed by its source and revalidated on
every use, and any slip there evaluates one folder's data under another folder's name without a word;
reading directly has no such state, and decompressing the 47 MB of training images takes about half a
second, small next to calibration. Every file is checked before use (IDX magic number, 28x28 images, byte
count matching the header, labels in 0..9, as many labels as images), so a broken source fails with a
:class:`DataError` naming the file and what is wrong. Items go through the same PIL image and
``ToTensor`` / ``Normalize`` path as torchvision's ``FashionMNIST``, so the tensors are bit-identical to it.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Optional, Union

import torch
from torch.utils.data import Dataset

from .models._fmnist import FMNIST_MEAN, FMNIST_STD

__all__ = [
    "find_fashion_mnist",
    "fashion_mnist",
    "FashionMNISTIDX",
    "ImageFolderSplit",
    "read_idx",
    "load_split",
    "stack_subset",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "DataError",
]

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers: unsigned bytes, 3 and 1 dimensions
FMNIST_SIDE, FMNIST_CLASSES = 28, 10
_CHUNK = 1 << 24


class DataError(FileNotFoundError):
    """Data could not be found or read; the message says where we looked and how to fix it."""


def _layouts(base: Path) -> tuple[Path, ...]:
    return (base, base / "FashionMNIST" / "raw", base / "fashion-mnist")


def _present(folder: Path) -> list[str]:
    return [f for f in FMNIST_FILES if (folder / f).is_file() or (folder / f"{f}.gz").is_file()]


def find_fashion_mnist(path: Optional[Union[str, Path]] = None) -> Path:
    """Return a folder holding the four Fashion-MNIST IDX files (plain or ``.gz``)."""
    if path is not None and str(path) != "fashion-mnist":
        base = Path(path)
    elif os.environ.get("QMAMBA_DATA"):
        base = Path(os.environ["QMAMBA_DATA"])
    else:
        base = DEBIAN_FMNIST
    for folder in _layouts(base):
        if folder.is_dir() and len(_present(folder)) == len(FMNIST_FILES):
            return folder
    for folder in _layouts(base):
        if folder.is_dir() and _present(folder):
            missing = [f for f in FMNIST_FILES if f not in _present(folder)]
            raise DataError(f"{folder} lacks Fashion-MNIST files {', '.join(missing)} (each plain or .gz)")
    raise DataError(
        f"Fashion-MNIST not found (looked in: {base}). Install Debian's package with "
        f"`apt-get install -y dataset-fashion-mnist`, or pass --data / set QMAMBA_DATA to a folder with "
        f"{', '.join(f + '.gz' for f in FMNIST_FILES)}."
    )


def _read_upto(f: IO[bytes], n: int) -> bytes:
    """At most ``n`` bytes, in chunks, so a header claiming a huge size cannot allocate it up front."""
    chunks, got = [], 0
    while got < n:
        chunk = f.read(min(_CHUNK, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_idx(path: Union[str, Path], magic: int) -> tuple[tuple[int, ...], bytes]:
    """Shape and data bytes of an unsigned-byte IDX file (gzipped if its name ends in ``.gz``).

    The header must carry ``magic`` (2051: images, 2049: labels) and the data must be exactly as long as
    the header's shape says; anything else raises a :class:`DataError` naming the file.
    """
    path = Path(path)
    dims = magic & 0xFF
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            header = _read_upto(f, 4)  # the magic number first, so a swapped file is called by its kind
            found = struct.unpack(">I", header)[0] if len(header) == 4 else magic
            if found != magic:
                kind = "image" if magic == IDX_IMAGES else "label"
                raise DataError(f"{path} is not an IDX {kind} file: magic number {found}, expected {magic}")
            header += _read_upto(f, 4 * dims)
            if len(header) < 4 + 4 * dims:
                raise DataError(f"{path} is too short for an IDX header ({len(header)} bytes, need {4 + 4 * dims})")
            shape = struct.unpack(f">{dims}I", header[4:])
            count = math.prod(shape)
            body = _read_upto(f, count + 1)  # one byte more than needed detects trailing data
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        kind = "a gzip file" if path.suffix == ".gz" else "IDX data"
        raise DataError(f"{path} cannot be read as {kind}: {e}") from e
    if len(body) < count:
        raise DataError(f"{path} is truncated: its header shape {tuple(shape)} needs {count} bytes, found {len(body)}")
    if len(body) > count:
        raise DataError(f"{path} has data past the {count} bytes its header shape {tuple(shape)} describes")
    return tuple(shape), body


def _idx_file(folder: Path, name: str) -> Path:
    plain = folder / name
    return plain if plain.is_file() else folder / f"{name}.gz"


def _as_uint8(body: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    if not body:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(shape)


def _load_fmnist_split(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(images (N, 28, 28) uint8, labels (N,) int64)`` of one split."""
    prefix = "train" if train else "t10k"
    images_path = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    shape, body = read_idx(images_path, IDX_IMAGES)
    if shape[1:] != (FMNIST_SIDE, FMNIST_SIDE):
        raise DataError(f"{images_path} holds {shape[1]}x{shape[2]} images; Fashion-MNIST images are 28x28")
    (n_labels,), label_body = read_idx(labels_path, IDX_LABELS)
    if n_labels != shape[0]:
        raise DataError(f"{images_path} holds {shape[0]} images but {labels_path} holds {n_labels} labels")
    labels = _as_uint8(label_body, (n_labels,)).long()
    if n_labels and int(labels.max()) >= FMNIST_CLASSES:
        raise DataError(f"{labels_path} holds label {int(labels.max())}; Fashion-MNIST labels are 0..9")
    return _as_uint8(body, shape), labels


class FashionMNISTIDX(Dataset):
    """One Fashion-MNIST split held in memory, laid out like torchvision's ``FashionMNIST``.

    ``data`` is ``(N, 28, 28)`` uint8 and ``targets`` ``(N,)`` int64; an item is ``(transform(PIL image),
    int label)``, the PIL image made exactly as torchvision makes it.
    """

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, transform: Optional[Callable] = None):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[object, int]:
        from PIL import Image

        img = Image.fromarray(self.data[index].numpy())  # 2-D uint8 gives mode "L"
        return (img if self.transform is None else self.transform(img)), int(self.targets[index])


def fashion_mnist(
    train: bool, path: Optional[Union[str, Path]] = None, img_size: int = 28, normalize: bool = True
) -> FashionMNISTIDX:
    """Fashion-MNIST as float tensors ``(1, img_size, img_size)``, normalised."""
    from torchvision import transforms

    steps = [transforms.ToTensor()]
    if img_size != 28:
        steps.insert(0, transforms.Resize(img_size))
    if normalize:
        steps.append(transforms.Normalize(FMNIST_MEAN, FMNIST_STD))
    data, targets = _load_fmnist_split(find_fashion_mnist(path), train)
    return FashionMNISTIDX(data, targets, transforms.Compose(steps))


def stack_subset(ds: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise a subset as ``(images, labels)`` tensors (small sets: calibration, tests)."""
    xs, ys = zip(*(ds[int(i)] for i in indices))
    return torch.stack(xs), torch.tensor(ys)


class ImageFolderSplit(Dataset):
    """An ImageNet-style split ``folder/<class>/<image>``: the files and labels timm's image-folder reader
    finds (same order, same class indices), but an image that cannot be decoded raises a
    :class:`DataError` naming it instead of being skipped for the next one, which would silently change
    the evaluated set.
    """

    def __init__(self, folder: Union[str, Path], transform: Optional[Callable] = None):
        from timm.data.readers.img_extensions import get_img_extensions
        from timm.data.readers.reader_image_folder import find_images_and_targets

        self.folder, self.transform = Path(folder), transform
        layout = f"expected ImageNet layout: {self.folder}/<class>/*.JPEG"
        self.samples, self.class_to_idx = find_images_and_targets(str(self.folder))
        if not self.samples:
            exts = ", ".join(sorted(get_img_extensions(as_set=True)))
            raise DataError(f"{self.folder} holds no images ({layout}; image extensions: {exts})")
        loose = [f for f, _ in self.samples if Path(f).parent == self.folder]
        if loose:
            raise DataError(
                f"{self.folder} holds {len(loose)} image(s) outside class folders, e.g. {loose[0]} ({layout})"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[object, int]:
        from PIL import Image

        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")  # convert decodes, so a broken file fails here
        except Exception as e:  # PIL raises several types for undecodable files
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
        return (img if self.transform is None else self.transform(img)), target


def _folder_split(root: Path, split: str, model: torch.nn.Module) -> Dataset:
    """An ImageNet-style folder split (``root/train``, ``root/val``) with timm's eval transform."""
    from timm.data import create_transform, resolve_model_data_config

    names = ("train",) if split == "train" else ("val", "validation")
    for name in names:
        if (root / name).is_dir():
            return ImageFolderSplit(root / name, transform=create_transform(**resolve_model_data_config(model)))
    raise DataError(
        f"{root} has no {' or '.join(names)} folder (expected ImageNet layout: {root}/{names[0]}/<class>/*.JPEG)"
    )


def load_split(
    data: Union[str, Path],
    split: str,
    size: Optional[int] = None,
    seed: int = 0,
    model: Optional[torch.nn.Module] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` images of a split as tensors: a seeded random subset of ``train`` (calibration),
    the first ``size`` of ``test`` (evaluation). ``data``: ``fashion-mnist``, a Fashion-MNIST IDX folder
    or an ImageNet-style folder.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    text = str(data)
    if text == "fashion-mnist" or (Path(text).is_dir() and _has_any_fmnist(Path(text))):
        ds = fashion_mnist(train=split == "train", path=None if text == "fashion-mnist" else text)
    else:
        root = Path(text)
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DataError(
                f"data path {root} {what}; pass --data fashion-mnist, a Fashion-MNIST IDX folder "
                f"or an ImageNet-style folder"
            )
        if model is None:
            raise ValueError("an image folder needs the model to resolve its input transform")
        ds = _folder_split(root, split, model)
    n = len(ds)
    if n == 0:
        raise DataError(f"the {split} split of {data} is empty")
    size = n if size is None else size
    if size < 1 or size > n:
        raise ValueError(f"asked for {size} {split} images but the {split} split of {data} has {n}")
    if split == "train":
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    else:
        idx = torch.arange(size)
    return stack_subset(ds, idx)


def _has_any_fmnist(folder: Path) -> bool:
    return any(f.is_dir() and _present(f) for f in _layouts(folder))
