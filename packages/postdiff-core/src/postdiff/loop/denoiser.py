"""The Denoiser interface and the caches every Denoiser keeps (no PyTorch here).

A Denoiser runs one plan step: one UNet variant at one latent size. It keeps the caches a plan refers to
(the DeepCache feature and the captured cross-attention outputs) for the duration of one generation, keyed by
latent size; a resolution switch empties them. The PyTorch reference is ``postdiff.pytorch.denoiser.TorchDenoiser``;
bundle runtimes (ONNX Runtime, Core ML, OpenVINO) use ``postdiff.bundle.runtime.GraphDenoiser``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from postdiff.errors import PlanError
from postdiff.loop.conditioning import Conditioning
from postdiff.plan.compiler import Step


@runtime_checkable
class Denoiser(Protocol):
    def reset(self) -> None:
        """Forget every cache (called at the start of each generation)."""

    def __call__(self, step: Step, sample: Any, timestep: Any, cond: Conditioning) -> Any:
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
