"""Calibration and evaluation data on torchvision / timm dataset classes.

Fashion-MNIST is found from an explicit path, the ``QMAMBA_DATA`` variable, or Debian's package
``dataset-fashion-mnist`` (gzipped IDX files under /usr/share/datasets/fashion-mnist). The gzipped
files are unpacked once into a cache folder laid out the way torchvision's ``FashionMNIST``
expects, so torchvision does the reading.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch.utils.data import Dataset

__all__ = [
    "find_fashion_mnist",
    "fashion_mnist",
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
#: Per-channel statistics of the Fashion-MNIST training images (pixel values scaled to [0, 1]).
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)


class DataError(FileNotFoundError):
    """Data could not be found or read; the message says where we looked and how to fix it."""


def _cache_dir() -> Path:
    return Path(os.environ.get("QMAMBA_CACHE", Path.home() / ".cache" / "qmamba_ao"))


def _has_files(folder: Path) -> bool:
    return all((folder / f).exists() or (folder / f"{f}.gz").exists() for f in FMNIST_FILES)


def find_fashion_mnist(path: Optional[Union[str, Path]] = None) -> Path:
    """Return a folder holding the four Fashion-MNIST IDX files (plain or ``.gz``)."""
    candidates = []
    if path is not None and str(path) != "fashion-mnist":
        candidates.append(Path(path))
    elif os.environ.get("QMAMBA_DATA"):
        candidates.append(Path(os.environ["QMAMBA_DATA"]))
    candidates.append(DEBIAN_FMNIST)
    for c in candidates:
        for folder in (c, c / "FashionMNIST" / "raw", c / "fashion-mnist"):
            if folder.is_dir() and _has_files(folder):
                return folder
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"Fashion-MNIST not found (looked in: {looked}). Install Debian's package with "
        f"`apt-get install -y dataset-fashion-mnist`, or pass --data / set QMAMBA_DATA to a folder with "
        f"{', '.join(f + '.gz' for f in FMNIST_FILES)}."
    )


def _torchvision_root(folder: Path) -> Path:
    """A root whose FashionMNIST/raw holds the unpacked files, unpacking into the cache if needed."""
    if (
        folder.name == "raw"
        and folder.parent.name == "FashionMNIST"
        and all((folder / f).exists() for f in FMNIST_FILES)
    ):
        return folder.parent.parent
    import gzip
    import shutil

    root = _cache_dir() / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in FMNIST_FILES:
        if (raw / f).exists():
            continue
        if (folder / f).exists():
            (raw / f).write_bytes((folder / f).read_bytes())
        else:
            tmp = raw / f"{f}.partial"
            with gzip.open(folder / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(raw / f)  # atomic: an interrupted unpack leaves no half-written file
    return root


def fashion_mnist(
    train: bool, path: Optional[Union[str, Path]] = None, img_size: int = 28, normalize: bool = True
) -> Dataset:
    """torchvision's FashionMNIST as float tensors ``(1, img_size, img_size)``, normalised."""
    from torchvision import transforms
    from torchvision.datasets import FashionMNIST

    steps = [transforms.ToTensor()]
    if img_size != 28:
        steps.insert(0, transforms.Resize(img_size))
    if normalize:
        steps.append(transforms.Normalize(FMNIST_MEAN, FMNIST_STD))
    root = _torchvision_root(find_fashion_mnist(path))
    return FashionMNIST(str(root), train=train, transform=transforms.Compose(steps), download=False)


def stack_subset(ds: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise a subset as ``(images, labels)`` tensors (small sets: calibration, tests)."""
    xs, ys = zip(*(ds[int(i)] for i in indices))
    return torch.stack(xs), torch.tensor(ys)


def _folder_split(root: Path, split: str, model: torch.nn.Module) -> Dataset:
    """An ImageNet-style folder split (``root/train``, ``root/val``) with timm's eval transform."""
    from timm.data import create_transform, resolve_model_data_config
    from timm.data.dataset import ImageDataset

    names = ("train",) if split == "train" else ("val", "validation")
    for name in names:
        if (root / name).is_dir():
            return ImageDataset(str(root / name), transform=create_transform(**resolve_model_data_config(model)))
    raise DataError(
        f"{root} has no {' or '.join(names)} folder (expected ImageNet layout: {root}/train/<class>/*.JPEG)"
    )


def load_split(
    data: Union[str, Path],
    split: str,
    size: Optional[int] = None,
    seed: int = 0,
    model: Optional[torch.nn.Module] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` images of a split as tensors: a seeded random subset of ``train`` (calibration),
    the first ``size`` of ``test`` (evaluation). ``data``: ``fashion-mnist`` or a folder.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    text = str(data)
    if text == "fashion-mnist" or (Path(text).is_dir() and _has_any_fmnist(Path(text))):
        ds = fashion_mnist(train=split == "train", path=None if text == "fashion-mnist" else text)
    else:
        root = Path(text)
        if not root.is_dir():
            raise DataError(f"data path {root} does not exist; pass --data fashion-mnist or an ImageNet-style folder")
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
    return any(_has_files(f) for f in (folder, folder / "FashionMNIST" / "raw", folder / "fashion-mnist"))
