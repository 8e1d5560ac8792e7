"""The Denoiser interface, and the PyTorch reference Denoiser.

A Denoiser runs one plan step: one UNet variant at one latent size. It keeps the caches a plan refers to
(the DeepCache feature and the captured cross-attention outputs) for the duration of one generation, keyed by
latent size; a resolution switch empties them. Backends (ONNX Runtime, Core ML) implement the same interface.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .conditioning import Conditioning
from .errors import PlanError
from .plan import Step
from .profiling import timed_call
from .unet import UNetSplit


@runtime_checkable
class Denoiser(Protocol):
    def reset(self) -> None:
        """Forget every cache (called at the start of each generation)."""

    def __call__(self, step: Step, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model output for ``sample`` (whose batch matches ``cond``) at plan step ``step``."""


class StepCaches:
    """The caches of one generation, shared by every Denoiser implementation.

    ``deep[hw]``: the DeepCache feature of the last full pass at that size, with whether its batch still holds
    the unconditional half. ``xattn[hw]``: conditional-branch cross-attention outputs by module index.
    """

    def __init__(self) -> None:
        self.deep: dict[tuple[int, int], tuple[object, bool]] = {}
        self.xattn: dict[tuple[int, int], dict[int, object]] = {}

    def clear(self) -> None:
        self.deep.clear()
        self.xattn.clear()

    def begin(self, step: Step, sample_hw: tuple[int, int]) -> None:
        if tuple(sample_hw) != tuple(step.latent_hw):
            raise PlanError(
                f"plan step {step.index}: latent is {sample_hw[0]}x{sample_hw[1]} but the plan says {step.latent_hw[0]}x{step.latent_hw[1]}"
            )
        if step.switches_resolution:
            self.clear()

    def deep_for(self, step: Step, cond: Conditioning):
        entry = self.deep.get(step.latent_hw)
        if entry is None:
            h, w = step.latent_hw
            raise PlanError(
                f"plan step {step.index}: a shallow step with no DeepCache feature at {h}x{w}; a full step must "
                f"come first at this resolution"
            )
        feature, has_uncond = entry
        if has_uncond and not cond.has_uncond:
            return feature[feature.shape[0] // 2 :]
        if cond.has_uncond and not has_uncond:
            raise PlanError(f"plan step {step.index}: CFG step after a conditional-only full step at this size")
        return feature

    def keep_deep(self, step: Step, feature, cond: Conditioning) -> None:
        self.deep[step.latent_hw] = (feature, cond.has_uncond)

    def xattn_for(self, step: Step, indices: list[int]) -> list:
        kept = self.xattn.get(step.latent_hw)
        if kept is None:
            h, w = step.latent_hw
            raise PlanError(f"plan step {step.index}: cached cross-attention at {h}x{w}, but none was captured there")
        return [kept[i] for i in indices]

    def keep_xattn(self, step: Step, indices: list[int], outputs, cond: Conditioning) -> None:
        def cond_only(x):
            return x[x.shape[0] // 2 :] if cond.has_uncond else x

        self.xattn[step.latent_hw] = {i: cond_only(x) for i, x in zip(indices, outputs)}


class TorchDenoiser:
    """Runs plan steps with the PyTorch UNet split (the reference every backend is compared with)."""

    def __init__(self, split: UNetSplit) -> None:
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
            out = self.split.forward(
                variant,
                sample,
                timestep,
                cond.encoder_hidden_states,
                cond.text_embeds,
                cond.time_ids,
                deep,
                xattn,
                cond.timestep_cond,
                cond.cross_attention_kwargs,
            )
        if step.unet == "full":
            caches.keep_deep(step, out[1], cond)
        if step.xattn == "capture":
            caches.keep_xattn(step, indices, out[2:], cond)
        return out[0]
