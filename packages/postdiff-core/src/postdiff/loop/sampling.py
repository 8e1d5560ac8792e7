"""Running a compiled plan: the step-to-step walk (``PlanRun``) and the denoising loop (``run_plan``).

``PlanRun`` owns what happens *between* UNet calls: the ordinary scheduler step, or, before a step that
switches resolution, the switch itself (predict x0, upsample, re-noise with fresh noise from the generator,
reset the scheduler's history). ``run_plan`` is the loop every exported backend uses; the diffusers
integration (diffusers_hook.py) lets the pipeline's own loop drive the same ``PlanRun``.

Both work on PyTorch tensors with diffusers' schedulers and on numpy arrays with ``postdiff.loop.numpy_schedulers``
(the runtime without PyTorch): the array operations come from ``postdiff.loop.arrays`` for the kind of latent given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from postdiff.errors import PlanError
from postdiff.loop.arrays import ops_for
from postdiff.loop.conditioning import Conditioning
from postdiff.loop.denoiser import Denoiser
from postdiff.loop.resolution import (
    check_switchable,
    downsample_noise,
    init_noise_sigma,
    predict_x0,
    renoise,
    restart_repeat,
    scale_model_input,
    upsample,
)
from postdiff.plan.compiler import ModelSpec, Plan, Step, compile_plan
from postdiff.plan.recipe import Recipe
from postdiff.plan.schedulers import label_of


def schedule_shift(scheduler, latent_hw: tuple[int, int], factor: int) -> dict[str, float]:
    """``set_timesteps``' ``mu`` for a scheduler that shifts its sigmas by the image's token count
    (``use_dynamic_shifting``: FLUX's), as the FLUX pipeline computes it from the full-size latent; {} for the others."""
    config = getattr(scheduler, "config", {})
    if not config.get("use_dynamic_shifting", False):
        return {}
    tokens = (int(latent_hw[0]) // factor) * (int(latent_hw[1]) // factor)
    base, most = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
    low, high = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    slope = (high - low) / (most - base)
    return {"mu": tokens * slope + low - slope * base}


def compile_for_scheduler(recipe: Recipe, scheduler, latent_hw: tuple[int, int], model: ModelSpec, device=None) -> Plan:
    """Set the scheduler's timesteps for ``recipe.steps`` and compile the recipe against them."""
    trained = int(getattr(scheduler, "config", {}).get("num_train_timesteps", 1000))
    if recipe.steps > trained:
        raise PlanError(
            f"{recipe.steps} steps is more than the {trained} timesteps {type(scheduler).__name__} was trained with; "
            f"use at most {trained} steps"
        )
    scheduler.set_timesteps(recipe.steps, device=device, **schedule_shift(scheduler, latent_hw, model.downsample_factor))
    return compile_plan(
        recipe,
        timesteps=[float(t) for t in scheduler.timesteps],
        latent_hw=tuple(latent_hw),
        model=model,
        order=int(getattr(scheduler, "order", 1)),
        scheduler=label_of(scheduler),
        restart_repeat=restart_repeat(scheduler),
    )


class PlanRun:
    """One generation's position in a plan. ``advance`` is called once per UNet call, in place of
    ``scheduler.step``."""

    def __init__(self, plan: Plan, scheduler, generator=None, set_timesteps_args=None) -> None:
        if any(s.switches_resolution for s in plan.steps):
            check_switchable(scheduler)
        self.plan = plan
        self.scheduler = scheduler
        self.generator = generator
        self._set_timesteps = set_timesteps_args or ((plan.recipe.steps,), {})
        self.index = 0
        # the clean sample of the last step, where the scheduler returns one (LCM's ``denoised``; at a switch the
        # upsampled x0): what an LCM pipeline decodes after its last step
        self.denoised = None

    @property
    def step(self) -> Step:
        if self.index >= len(self.plan.steps):
            raise PlanError(f"the UNet was called more often than the plan has steps ({len(self.plan.steps)})")
        return self.plan.steps[self.index]

    @property
    def next_step(self) -> Step | None:
        i = self.index + 1
        return self.plan.steps[i] if i < len(self.plan.steps) else None

    def advance(self, model_output, timestep, sample, **step_kwargs):
        """The latent for the next step: a scheduler step, or the resolution switch."""
        step, nxt = self.step, self.next_step
        if nxt is not None and nxt.switches_resolution:
            x0 = predict_x0(self.scheduler, sample, model_output, step.scheduler_index, step.timestep)
            x0 = upsample(x0, nxt.latent_hw)
            noise = ops_for(x0).randn_like(x0, self.generator)  # as diffusers' randn_tensor draws it
            self._restart(nxt.scheduler_index)
            out = renoise(self.scheduler, x0, noise, nxt.scheduler_index, nxt.timestep)
            self.denoised = x0
        else:
            result = self.scheduler.step(model_output, timestep, sample, **step_kwargs, return_dict=False)
            out = result[0]
            self.denoised = result[1] if len(result) > 1 else None
        self.index += 1
        return out

    def _restart(self, index: int) -> None:
        """Reset the solver's history (multistep buffers, Heun's half step) and continue at position ``index`` of
        the scheduler's timesteps (the next step's ``scheduler_index``)."""
        args, kwargs = self._set_timesteps
        self.scheduler.set_timesteps(*args, **kwargs)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(index)


def begin_by_position(scheduler) -> None:
    """Start the solver at position 0 of its timesteps when they repeat a value. Without a begin index, diffusers
    finds the first step by value and, when the value repeats (DPM++ Karras at 998 nine times on a cosine schedule),
    takes its second occurrence and runs off the end of the schedule; plans count steps by position. Unique
    timesteps are left alone (the lookup gives position 0 there, and img2img pipelines set their own begin)."""
    listed = [float(t) for t in scheduler.timesteps]
    if len(set(listed)) < len(listed) and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)


def _brief_timesteps(timesteps) -> str:
    t = [round(float(x)) for x in timesteps]
    return f"{len(t)}: {', '.join(map(str, t[:4]))}, ..., {t[-1]}" if len(t) > 6 else ", ".join(map(str, t))


def same_timesteps(a: list[float], b: list[float]) -> bool:
    """The same schedule: equal to 1e-5 relative (timesteps derived from Karras sigmas are floats, which the numpy
    schedulers reproduce to about 5e-6 of diffusers': their float32 betas round a few values the other way)."""
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a, b))


def initial_latents(plan: Plan, latents):
    """The plan's starting latent from noise drawn at full size (or already at the first step's size)."""
    first_hw = tuple(plan.steps[0].latent_hw)
    shape = tuple(latents.shape[-2:])
    if shape == first_hw:
        return latents
    if shape == tuple(plan.latent_hw):
        return downsample_noise(latents, first_hw)
    raise PlanError(
        f"initial latents are {shape[0]}x{shape[1]}; plan {plan.name!r} needs {plan.latent_hw[0]}x{plan.latent_hw[1]} "
        f"(full size) or {first_hw[0]}x{first_hw[1]} (its first step)"
    )


def scheduler_step_kwargs(scheduler, generator=None, eta: float = 0.0) -> dict[str, Any]:
    """The extra ``scheduler.step`` arguments diffusers pipelines pass (eta for DDIM, the generator for ancestral)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def run_plan(
    plan: Plan,
    denoiser: Denoiser,
    scheduler,
    cond: Conditioning,
    *,
    guidance_scale: float = 7.5,
    generator=None,
    latents=None,
    channels: int = 4,
    eta: float = 0.0,
    device=None,
    dtype=None,
    progress: bool = True,
    on_step: Callable[[Step, Any], None] | None = None,
):
    """Denoise from noise to the final latent following ``plan``.

    ``cond`` holds the unconditional half first when ``cond.has_uncond`` (CFG with ``guidance_scale``).
    The initial noise is drawn from ``generator`` at the plan's first latent size; the switch draws fresh noise
    from the same generator, so one seed gives one image, run after run. Tensors in, tensors out (drawn on
    ``device`` in ``dtype``, float32 by default); numpy arrays in (``latents`` given, ``postdiff.loop.torch_random``
    generators, a ``postdiff.loop.numpy_schedulers`` scheduler), numpy arrays out.
    """
    scheduler.set_timesteps(plan.recipe.steps, device=device)
    begin_by_position(scheduler)
    timesteps = scheduler.timesteps
    listed = [float(t) for t in timesteps]
    at = [s.scheduler_index for s in plan.steps]
    # every call at its point of the schedule, and the plan ends where the schedule does
    if at[-1] != len(listed) - 1 or max(at) >= len(listed) or not same_timesteps([listed[i] for i in at], plan.timesteps):
        raise PlanError(
            f"plan {plan.name!r} was compiled for {plan.scheduler or 'another scheduler'}'s timesteps "
            f"({_brief_timesteps(plan.timesteps)}); {label_of(scheduler)} at {plan.recipe.steps} steps gives "
            f"{_brief_timesteps(listed)}: recompile the plan for it (compile_for_scheduler, or pass --scheduler)"
        )
    run = PlanRun(plan, scheduler, generator, ((plan.recipe.steps,), {"device": device}))
    denoiser.reset()
    batch = cond.batch // 2 if cond.has_uncond else cond.batch
    if latents is None:
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch, channels, *plan.latent_hw)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype or torch.float32)
        latents = latents * init_noise_sigma(scheduler)
    ops = ops_for(latents)
    latents = initial_latents(plan, latents)
    step_kwargs = scheduler_step_kwargs(scheduler, generator, eta)
    for step in tqdm(plan.steps, desc=f"postdiff {plan.name}", disable=not progress, leave=False):
        t = timesteps[step.scheduler_index]
        with_cfg = cond.has_uncond and step.guidance == "cfg"
        c = (cond if with_cfg else cond.cond_half()).at_size(step.latent_hw, plan.latent_hw)
        x = ops.cat([latents] * 2) if with_cfg else latents
        x = scale_model_input(scheduler, x, t)
        out = denoiser(step, x, t, c)
        if with_cfg:
            half = out.shape[0] // 2
            uncond, text = out[:half], out[half:]
            out = uncond + guidance_scale * (text - uncond)
        if on_step is not None:
            on_step(step, latents)
        latents = run.advance(out, t, latents, **step_kwargs)
    return latents
