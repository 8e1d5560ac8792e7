"""Paired fidelity metrics against the baseline image of the same seed and noise."""

from __future__ import annotations

import math

import numpy as np

from postdiff.bundle.export import tensor_psnr  # noqa: F401  (the engine's export check, re-exported with the metrics)


def _pair(image, reference) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired metrics need images of one shape, got {a.shape} and {b.shape}")
    return a, b


def psnr(image, reference, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    a, b = _pair(image, reference)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(image, reference, data_range: float = 1.0) -> float:
    """Structural similarity (scikit-image; 1 for identical images). H x W or H x W x C arrays."""
    from skimage.metrics import structural_similarity

    a, b = _pair(image, reference)
    channel_axis = -1 if a.ndim == 3 else None
    side = min(a.shape[:2])
    win = 7 if side >= 7 else side - (1 - side % 2)  # the largest odd window that fits
    return float(structural_similarity(a, b, data_range=data_range, channel_axis=channel_axis, win_size=win))


def lpips_distance(images, references, *, resize_to: int | None = None) -> np.ndarray:
    """LPIPS (AlexNet, v0.1) per pair. Inputs: N x H x W (gray) or N x H x W x 3, floats in [0, 1].

    LPIPS is meaningful from about 64 px up; ``resize_to`` upsamples both sides bilinearly first (say so when
    reporting it)."""
    import torch
    import torch.nn.functional as F

    from .lpips import lpips_model

    def prep(x) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if t.ndim == 3:
            t = t[..., None]
        t = t.permute(0, 3, 1, 2)
        if t.shape[1] == 1:
            t = t.repeat(1, 3, 1, 1)
        if resize_to is not None:
            t = F.interpolate(t, size=(resize_to, resize_to), mode="bilinear", align_corners=False)
        return t * 2 - 1

    a, b = prep(images), prep(references)
    if a.shape != b.shape:
        raise ValueError(f"LPIPS needs batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    model = lpips_model()
    out = [model(a[i : i + 64], b[i : i + 64]) for i in range(0, len(a), 64)]
    return torch.cat(out).numpy()
