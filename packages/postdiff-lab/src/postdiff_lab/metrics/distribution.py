"""Distribution metrics over feature vectors: Fréchet distance (FID) and kernel distance (KID)."""

from __future__ import annotations

import math
import warnings

import numpy as np

from postdiff.errors import warn_once

# A covariance (FID) and an unbiased MMD (KID) need two samples per set; below that the metric is not a number
# (null in JSON, with the reason among the notes). Below as many samples as feature dimensions the covariance is
# singular and FID is biased upward: still computed, with a one-line warning.
MIN_SAMPLES = 2


def too_few_note(n: int) -> str | None:
    """The note for a result whose FID/KID could not be computed from ``n`` samples, or None."""
    if n >= MIN_SAMPLES:
        return None
    return f"FID/KID need at least {MIN_SAMPLES} samples per set, got {n}: null here; use --samples {MIN_SAMPLES} or more"


def warn_if_few(n: int, dims: int, what: str = "FID/KID") -> None:
    """One warning line when a distribution metric is computed on fewer samples than its features have dimensions."""
    if MIN_SAMPLES <= n < dims:
        warn_once(
            f"few-samples:{n}:{dims}:{what}",
            f"{what} on {n} samples of {dims}-dimensional features is biased upward (the covariance needs more samples "
            f"than dimensions to mean anything): compare only at equal N, and use {dims} samples or more for a real FID",
        )


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two N x D feature sets (FID when the features are
    Inception's). Biased for small N: always report N."""
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if min(len(a), len(b)) < MIN_SAMPLES:
        return math.nan  # no covariance from one sample (scipy's sqrtm fails on it)
    mu1, mu2 = a.mean(0), b.mean(0)
    if min(len(a), len(b)) < a.shape[1]:
        # Fewer samples than dimensions (Inception's 2048 at N = 200): the covariances are A'A and B'B with A, B the
        # centred, scaled samples, and the nonzero eigenvalues of (A'A)(B'B) are the squared singular values of AB'
        # (N1 x N2). So tr sqrtm(S1 S2) is exactly the sum of those singular values: from the small Gram matrix in
        # milliseconds, where sqrtm of the D x D product takes seconds (10 s for D = 2048 on this CPU) and is
        # ill-conditioned on singular matrices. Agrees with the sqrtm route to about 1e-8 relative.
        sa, sb = (a - mu1) / math.sqrt(len(a) - 1), (b - mu2) / math.sqrt(len(b) - 1)
        small, big = (sa, sb) if len(sa) <= len(sb) else (sb, sa)
        k = small @ big.T
        trace_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(k @ k.T), 0, None)).sum())
        return float(((mu1 - mu2) ** 2).sum() + (sa * sa).sum() + (sb * sb).sum() - 2 * trace_covmean)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # a near-singular product can still give sqrtm trouble: a non-finite root is retried with a ridge below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, *, subsets: int = 10, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD² with the kernel (x·y / d + 1)³, mean and std over subsets."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    if m < MIN_SAMPLES:
        return math.nan, math.nan  # the unbiased MMD divides by m (m - 1)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))
