"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (MIT licence), read from its IDX files.

No download code: the data comes from the system package (``apt-get install dataset-fashion-mnist``) or from
a folder the user names that holds the same four ``*-idx*-ubyte.gz`` files. The sha256 of every file used is
checked against the package's files as recorded below, so a changed file is noticed, not silently used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from .errors import PostDiffError

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


class DataError(PostDiffError):
    pass


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


def load(split: str = "train", root: str | Path | None = None, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels int64 N) of ``split`` ("train" or "test")."""
    if split not in FILES:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
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


def to_uint8(x) -> np.ndarray:
    """Model space N x 1 x 32 x 32 in [-1, 1] → uint8 N x 32 x 32 (the padding kept: samples are 32 x 32)."""
    import torch

    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()
