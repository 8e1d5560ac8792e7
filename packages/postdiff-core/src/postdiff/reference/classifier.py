"""The in-domain Fashion-MNIST classifier: class accuracy of samples, and the features for FID/KID.

A small CNN trained by ``benchmarks/reference/train_classifier.py`` (deterministic, weights shipped). Its
128-d penultimate layer is the feature space of "FID (Fashion-MNIST classifier features)", which is not
comparable with published Inception FIDs. Class accuracy and confidence of generated samples stand in for
CLIP score, which cannot be computed offline.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"


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


@lru_cache(maxsize=1)
def load_classifier() -> Classifier:
    from safetensors.torch import load_file

    from ..errors import ModelError

    if not WEIGHTS.is_file():
        raise ModelError(f"classifier weights missing ({WEIGHTS}); run benchmarks/reference/train_classifier.py")
    model = Classifier()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classify(images_uint8: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class, softmax probabilities N x 10, features N x 128) of N x 32 x 32 uint8 images."""
    model = load_classifier()
    x = torch.from_numpy(np.asarray(images_uint8, dtype=np.float32)).div(127.5).sub(1.0)[:, None]
    logits, feats = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i : i + batch])
        feats.append(f)
        logits.append(model.head(f))
    logits_t = torch.cat(logits)
    probs = logits_t.softmax(-1).numpy()
    return probs.argmax(-1), probs, torch.cat(feats).numpy()


def classify_samples(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``classify`` for generated samples: N x H x W x 1 floats in [0, 1]."""
    return classify(np.round(np.asarray(images)[..., 0] * 255).astype(np.uint8))


@lru_cache(maxsize=1)
def test_set_features() -> np.ndarray:
    """Features of the 10,000 Fashion-MNIST test images (padded to 32 px): the FID/KID reference set."""
    from .. import data

    return classify(data.pad32(data.load("test")[0]))[2]
