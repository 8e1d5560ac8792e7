"""Which of PyTorch's two CPU convolution paths a UNet call takes: oneDNN (PyTorch's default) or the native one
(im2col + GEMM), chosen per call shape.

Measured on this project's 2-core Xeon (torch 2.13.0): for SD1.5 at batch 2, the native path is 1.5x faster at a
16x16 latent and 1.2x at 32x32, equal at 64x64; for the 1M-parameter reference model at batch 20 it is 2x
slower. oneDNN's kernels lose where the weights are large against the feature maps (small latents, small
batches), which is exactly where mixed-resolution plans spend their early steps. No fixed rule holds across
models, so ``auto`` measures: the first call of each (variant, input shape) runs both paths twice (the first
call of a path pays its setup), keeps the faster, and every later call of that shape uses it, like
``torch.backends.cudnn.benchmark`` on GPUs.

Set with ``POSTDIFF_CPU_CONV`` (``onednn``, the default; ``native``; ``auto``) or ``UNetSplit(cpu_conv=...)``.
``auto`` costs four extra calls per shape once, and the two paths round differently (about 1e-6 relative), so
images are reproducible only with a fixed path.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from postdiff.errors import PostDiffError

MODES = ("onednn", "native", "auto")
T = TypeVar("T")
# torch.backends.mkldnn.flags also resets oneDNN's TF32 flag, which warns on CPU-only builds; nothing is wrong
warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")


def mode_from_env() -> str:
    mode = os.environ.get("POSTDIFF_CPU_CONV", "onednn").strip().lower() or "onednn"
    return check_mode(mode, "POSTDIFF_CPU_CONV")


def check_mode(mode: str, where: str = "cpu_conv") -> str:
    if mode not in MODES:
        raise PostDiffError(f"{where} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


class ConvPath:
    """Runs calls under the chosen convolution path; with ``auto``, remembers the faster path per key."""

    def __init__(self, mode: str = "onednn") -> None:
        self.mode = check_mode(mode)
        self.chosen: dict[object, bool] = {}  # key -> oneDNN enabled

    def run(self, key, on_cpu: bool, fn: Callable[[], T]) -> T:
        if not on_cpu or self.mode == "onednn" or torch.compiler.is_compiling():  # exporters trace one path
            return fn()
        if self.mode == "native":
            with torch.backends.mkldnn.flags(enabled=False):
                return fn()
        if key not in self.chosen:
            best: dict[bool, float] = {}
            for enabled in (True, False, True, False):
                with torch.backends.mkldnn.flags(enabled=enabled):
                    start = time.perf_counter()
                    fn()
                    seconds = time.perf_counter() - start
                best[enabled] = min(best.get(enabled, seconds), seconds)
            self.chosen[key] = min(best, key=best.get)
        with torch.backends.mkldnn.flags(enabled=self.chosen[key]):
            return fn()
