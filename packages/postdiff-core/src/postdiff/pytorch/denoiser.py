"""The PyTorch reference Denoiser: plan steps run with the PyTorch UNet split (every backend is compared with it)."""

from __future__ import annotations

import torch

from postdiff.loop.conditioning import Conditioning
from postdiff.loop.denoiser import StepCaches
from postdiff.plan.compiler import Step
from postdiff.profiling import timed_call


class TorchDenoiser:
    """Runs plan steps with the PyTorch network split (``UNetSplit`` or ``TransformerSplit``: the reference every
    backend is compared with)."""

    def __init__(self, split) -> None:
        self.split = split
        self.caches = StepCaches()

    def reset(self) -> None:
        self.caches.clear()

    @torch.no_grad()
    def __call__(self, step: Step, sample: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
        caches = self.caches
        caches.begin(step, tuple(sample.shape[-2:]))
        variant = step.variant
        indices = self.split.xattn_indices(variant)
        deep = caches.deep_for(step, cond) if step.unet == "shallow" else None
        xattn = caches.xattn_for(step, indices) if step.xattn == "cached" else ()
        with timed_call(variant, step.latent_hw, sample.shape[0]):
            out = self.split.step(variant, sample, timestep, cond, deep, xattn)
        if step.unet == "full":
            caches.keep_deep(step, out[1], cond)
        if step.xattn == "capture":
            caches.keep_xattn(step, indices, out[2:], cond)
        return out[0]
