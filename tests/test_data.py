"""Data loading: IDX reading, the Fashion-MNIST dataset, image folders and ``load_split``."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from qmamba_ao.data import (
    FMNIST_FILES,
    FMNIST_MEAN,
    FMNIST_STD,
    IDX_IMAGES,
    IDX_LABELS,
    DataError,
    FashionMNISTIDX,
    ImageFolderSplit,
    fashion_mnist,
    find_fashion_mnist,
    load_split,
    read_idx,
)

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx(magic: int, shape: tuple[int, ...], body: bytes) -> bytes:
    return struct.pack(f">{1 + len(shape)}I", magic, *shape) + body


def write_fmnist(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = True, seed: int = 0) -> Path:
    """Four small Fashion-MNIST IDX files with random pixels and labels."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        pixels = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        for name, blob in (
            (f"{prefix}-images-idx3-ubyte", _idx(IDX_IMAGES, (n, 28, 28), pixels.numpy().tobytes())),
            (f"{prefix}-labels-idx1-ubyte", _idx(IDX_LABELS, (n,), labels.numpy().tobytes())),
        ):
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)
    return folder


def test_read_idx_plain_and_gzip(tmp_path):
    blob = _idx(IDX_IMAGES, (2, 28, 28), bytes(range(256)) * 6 + bytes(2 * 784 - 1536))
    (tmp_path / "a").write_bytes(blob)
    (tmp_path / "a.gz").write_bytes(gzip.compress(blob))
    assert read_idx(tmp_path / "a", IDX_IMAGES) == read_idx(tmp_path / "a.gz", IDX_IMAGES)
    shape, body = read_idx(tmp_path / "a", IDX_IMAGES)
    assert shape == (2, 28, 28) and body == blob[16:]


@pytest.mark.parametrize(
    "blob, words",
    [
        (b"\x00\x00", "too short for an IDX header"),
        (_idx(IDX_LABELS, (3,), b"\x01\x02\x03"), "magic number 2049, expected 2051"),
        (_idx(IDX_IMAGES, (2, 28, 28), bytes(784)), "truncated"),
        (_idx(IDX_IMAGES, (1, 28, 28), bytes(785)), "data past the 784 bytes"),
        (_idx(IDX_IMAGES, (2**32 - 1, 28, 28), bytes(784)), "truncated"),  # huge claim, no huge allocation
    ],
)
def test_read_idx_rejects(tmp_path, blob, words):
    path = tmp_path / "bad-idx"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=words) as e:
        read_idx(path, IDX_IMAGES)
    assert str(path) in str(e.value)


def test_fashion_mnist_items_are_totensor_then_normalize(tmp_path):
    folder = write_fmnist(tmp_path / "fm")
    ds = fashion_mnist(train=True, path=folder)
    assert isinstance(ds, FashionMNISTIDX) and len(ds) == 6
    assert ds.data.dtype == torch.uint8 and ds.data.shape == (6, 28, 28)
    assert ds.targets.dtype == torch.int64
    x, y = ds[3]
    want = ds.data[3].float().div(255).unsqueeze(0).sub(FMNIST_MEAN[0]).div(FMNIST_STD[0])
    assert torch.equal(x, want) and y == int(ds.targets[3]) and isinstance(y, int)
    raw, _ = fashion_mnist(train=False, path=folder, normalize=False)[0]
    assert raw.min() >= 0 and raw.max() <= 1 and raw.shape == (1, 28, 28)
    assert fashion_mnist(train=False, path=folder, img_size=32)[0][0].shape == (1, 32, 32)


def test_plain_and_gzip_folders_agree(tmp_path):
    a = fashion_mnist(train=True, path=write_fmnist(tmp_path / "gz", gz=True))
    b = fashion_mnist(train=True, path=write_fmnist(tmp_path / "plain", gz=False))
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)


def test_find_fashion_mnist_layouts_and_env(tmp_path, monkeypatch):
    raw = write_fmnist(tmp_path / "root" / "FashionMNIST" / "raw", gz=False)
    assert find_fashion_mnist(tmp_path / "root") == raw
    monkeypatch.setenv("QMAMBA_DATA", str(tmp_path / "root"))
    assert find_fashion_mnist() == raw and find_fashion_mnist("fashion-mnist") == raw


def test_explicit_path_does_not_fall_back(tmp_path, monkeypatch):
    import qmamba_ao.data as data

    monkeypatch.setattr(data, "DEBIAN_FMNIST", write_fmnist(tmp_path / "debian"))
    assert find_fashion_mnist() == tmp_path / "debian"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        find_fashion_mnist(tmp_path / "empty")
    monkeypatch.setenv("QMAMBA_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="missing"):
        find_fashion_mnist()


def test_load_split_subsets(tmp_path):
    folder = write_fmnist(tmp_path / "fm", n_train=8, n_test=5)
    ds = fashion_mnist(train=False, path=folder)
    x, y = load_split(folder, "test", 3)
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(3)]))
    assert torch.equal(y, ds.targets[:3])
    a, b = load_split(folder, "train", 4, seed=1), load_split(folder, "train", 4, seed=1)
    assert torch.equal(a[0], b[0]) and a[0].shape == (4, 1, 28, 28)
    assert load_split(str(folder), "test")[0].shape[0] == 5


@pytest.mark.parametrize("size", [0, -1, 6])
def test_load_split_size_out_of_range(tmp_path, size):
    with pytest.raises(ValueError, match="has 5"):
        load_split(write_fmnist(tmp_path / "fm", n_test=5), "test", size)


def test_load_split_bad_split(tmp_path):
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_split(write_fmnist(tmp_path / "fm"), "val")


def _write_images(folder: Path, files: dict[str, tuple[int, int, int]]) -> None:
    from PIL import Image

    for rel, color in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), color).save(folder / rel)


def test_image_folder_split_matches_timm(tmp_path):
    from timm.data import create_transform
    from timm.data.dataset import ImageDataset

    _write_images(tmp_path, {"b/2.png": (0, 0, 255), "a/10.png": (255, 0, 0), "a/9.jpg": (0, 255, 0)})
    tf = create_transform(input_size=(3, 32, 32), crop_pct=0.875)
    ours, ref = ImageFolderSplit(tmp_path, tf), ImageDataset(str(tmp_path), transform=tf)
    assert len(ours) == len(ref) == 3
    for i in range(3):
        (x, y), (rx, ry) = ours[i], ref[i]
        assert torch.equal(x, rx) and y == ry


def test_load_split_image_folder(tmp_path):
    model = torch.nn.Linear(2, 2)
    model.pretrained_cfg = {"input_size": (3, 32, 32)}
    _write_images(tmp_path / "val", {"cat/0.png": (9, 9, 9), "dog/0.png": (200, 1, 1)})
    x, y = load_split(tmp_path, "test", model=model)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_data_matches_torchvision(tmp_path):
    """The first 512 images of each split equal torchvision's FashionMNIST on the same files."""
    from torchvision import transforms
    from torchvision.datasets import FashionMNIST

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FMNIST_FILES:
        (raw / f).write_bytes(gzip.decompress((REAL_FMNIST / f"{f}.gz").read_bytes()))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(FMNIST_MEAN, FMNIST_STD)])
    for train in (True, False):
        ours, ref = fashion_mnist(train, REAL_FMNIST), FashionMNIST(str(tmp_path), train=train, transform=tf)
        assert torch.equal(ours.data, ref.data) and torch.equal(ours.targets, ref.targets)
        for i in range(512):
            (x, y), (rx, ry) = ours[i], ref[i]
            assert torch.equal(x, rx) and y == ry
