"""The in-domain classifiers (Fashion-MNIST, MNIST digits): class accuracy of samples, and the features for FID/KID.

A small CNN per dataset, trained by ``benchmarks/reference/train_classifier.py`` (deterministic, weights
shipped beside each reference model's weights). Its 128-d penultimate layer is the feature space of
"FID (in-domain classifier features)", which is not
comparable with published Inception FIDs. Class accuracy and confidence of generated samples stand in for
CLIP score, which needs prompts (text-to-image models get it with ``--clip DIR``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .model import WEIGHT_FOLDERS


def weights_path(dataset: str = "fashion") -> Path:
    return Path(__file__).resolve().parent / WEIGHT_FOLDERS[dataset] / "classifier.safetensors"


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(128 * 16, 128), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@lru_cache(maxsize=2)
def load_classifier(dataset: str = "fashion") -> Classifier:
    from safetensors.torch import load_file

    from postdiff.errors import ModelError

    weights = weights_path(dataset)
    if not weights.is_file():
        raise ModelError(f"classifier weights missing ({weights}); run benchmarks/reference/train_classifier.py --dataset {dataset}")
    model = Classifier()
    model.load_state_dict(load_file(str(weights)))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classify(images_uint8: np.ndarray, batch: int = 1000, dataset: str = "fashion") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class, softmax probabilities N x 10, features N x 128) of N x 32 x 32 uint8 images.
    Images of another size (a low-resolution sample) are resized bilinearly to 32 x 32 first."""
    model = load_classifier(dataset)
    x = torch.from_numpy(np.asarray(images_uint8, dtype=np.float32)).div(127.5).sub(1.0)[:, None]
    if x.shape[-2:] != (32, 32):
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    logits, feats = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i : i + batch])
        feats.append(f)
        logits.append(model.head(f))
    logits_t = torch.cat(logits)
    probs = logits_t.softmax(-1).numpy()
    return probs.argmax(-1), probs, torch.cat(feats).numpy()


def classify_samples(images: np.ndarray, dataset: str = "fashion") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``classify`` for generated samples: N x H x W x 1 floats in [0, 1]."""
    return classify(np.round(np.asarray(images)[..., 0] * 255).astype(np.uint8), dataset=dataset)


def test_set_features(dataset: str = "fashion", size: int = 32) -> np.ndarray:
    """Features of the dataset's test images (padded to 32 px): the FID/KID reference set (10,000 Fashion-MNIST
    test images; the 2,000 held-out digits). With ``size`` < 32 the test images are first area-downsampled to
    that size, then classified like a sample of that size: the reference for a model run entirely at ``size``."""
    return _test_set(dataset, size)[0]


def test_set_accuracy(dataset: str = "fashion", size: int = 32) -> float:
    """The classifier's accuracy on the test images put through the same resampling as ``test_set_features``."""
    return _test_set(dataset, size)[1]


@lru_cache(maxsize=8)
def _test_set(dataset: str, size: int) -> tuple[np.ndarray, float]:
    from .. import data

    images, labels = data.load("test", dataset=dataset)
    images = data.pad32(images)
    if size != images.shape[-1]:
        x = torch.from_numpy(images).float()[:, None]
        images = torch.nn.functional.interpolate(x, size=(size, size), mode="area").round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    pred, _, feats = classify(images, dataset=dataset)
    return feats, float((pred == labels).mean())
