"""Paired fidelity metrics against the baseline image of the same seed."""

from __future__ import annotations

import math

import numpy as np


def psnr(image, reference, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images). Images as float arrays in [0, 1]."""
    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs images of one shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)
