"""Run a plan inside a diffusers Stable Diffusion / SDXL / LCM / PixArt pipeline: ``postdiff.apply(pipe, "postdiff")``.

After ``apply``, the usual ``pipe(prompt, ...)`` call runs the plan; ``postdiff.remove(pipe)`` restores the
vanilla pipeline. The pipeline's own loop stays in charge (prompt encoding, CFG arithmetic, callbacks, VAE
decoding, every ``__call__`` option); for the duration of each call only, PostDiff

* compiles the recipe against the scheduler's actual timesteps and the call's image size,
* hooks the denoising network (the UNet, or PixArt's transformer; diffusers ``HookRegistry``) so each call runs
  the plan step's variant through a ``TorchDenoiser`` (full/shallow, CFG or conditional-only with cached
  cross-attention),
* puts a thin proxy in front of the scheduler whose ``step`` is ``PlanRun.advance`` (the resolution switch),
* draws the initial latent at the plan's first latent size from the call's generator.

All of it is torn down when the call returns: nothing carries over from one call to the next.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .backbone import network_of, spec_of, split_for
from .conditioning import Conditioning
from .errors import ModelError, PlanError
from .plan import Plan, compile_plan
from .recipe import Recipe, load_recipe
from .resolution import is_consistency_scheduler
from .sampling import PlanRun, initial_latents
from .torch_denoiser import TorchDenoiser

SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "LatentConsistencyModelPipeline",
    "PixArtAlphaPipeline",
    "PixArtSigmaPipeline",
)
_HOOK_NAME = "postdiff"
_SUBCLASSES: dict[type, type] = {}


def apply(pipe, plan: str | Recipe | dict = "postdiff"):
    """Make ``pipe(...)`` run ``plan`` (a built-in name, a JSON file, a dict or a Recipe). Returns ``pipe``.

    The recipe's ``steps`` is the default number of inference steps; an explicit ``num_inference_steps`` in a
    call re-compiles the recipe for that many steps.
    """
    recipe = load_recipe(plan)
    base = getattr(pipe, "_postdiff_base", type(pipe))
    if not any(c.__name__ in SUPPORTED_PIPELINES for c in base.__mro__):
        raise ModelError(f"postdiff.apply supports {', '.join(SUPPORTED_PIPELINES)}, not {base.__name__}")
    spec_of(network_of(pipe))  # fails early, with a clear message, on a network PostDiff cannot split
    if base not in _SUBCLASSES:
        # Same class name, so anything that reads it (save_pretrained, logging) still sees the original.
        _SUBCLASSES[base] = type(base.__name__, (base,), {"__call__": _call, "_postdiff_base": base})
    pipe.__class__ = _SUBCLASSES[base]
    object.__setattr__(pipe, "_postdiff_recipe", recipe)
    return pipe


def remove(pipe):
    """Restore the vanilla pipeline. Returns ``pipe``."""
    base = getattr(type(pipe), "_postdiff_base", None)
    if base is not None:
        pipe.__class__ = base
        pipe.__dict__.pop("_postdiff_recipe", None)
        pipe.__dict__.pop("_postdiff_last_plan", None)
    return pipe


def applied_recipe(pipe) -> Recipe | None:
    return pipe.__dict__.get("_postdiff_recipe")


def _call(self, *args, **kwargs):
    base = type(self)._postdiff_base
    bound = inspect.signature(base.__call__).bind(self, *args, **kwargs)
    arguments = bound.arguments
    recipe: Recipe = self._postdiff_recipe
    if "num_inference_steps" not in arguments:
        arguments["num_inference_steps"] = recipe.steps
    elif arguments["num_inference_steps"] != recipe.steps:
        recipe = recipe.with_steps(int(arguments["num_inference_steps"]))
    if arguments.get("denoising_end") is not None:
        raise PlanError("denoising_end cuts the plan short; PostDiff plans run every step. Drop denoising_end")
    size = network_of(self).config.sample_size * self.vae_scale_factor
    height = arguments.get("height") or size
    width = arguments.get("width") or size
    if getattr(self, "transformer", None) is not None and arguments.get("use_resolution_binning", True):
        height, width = _pixart_bin(self, int(height), int(width))
    latent_hw = (int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)
    session = _Session(self, recipe, latent_hw, arguments.get("generator"))
    try:
        with session.installed():
            return base.__call__(*bound.args, **bound.kwargs)
    finally:
        object.__setattr__(self, "_postdiff_last_plan", session.plan)


def _pixart_bin(pipe, height: int, width: int) -> tuple[int, int]:
    """The size a PixArt pipeline generates at with ``use_resolution_binning`` (its default): the nearest aspect-ratio
    bin of its sample size, from the pipelines' own tables (the image is resized back to the request at the end)."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    bins = {32: ASPECT_RATIO_256_BIN, 64: ASPECT_RATIO_512_BIN, 128: ASPECT_RATIO_1024_BIN, 256: ASPECT_RATIO_2048_BIN}
    ratios = bins.get(int(pipe.transformer.config.sample_size))
    if ratios is None:  # the pipeline itself refuses this ("Invalid sample size")
        return height, width
    return pipe.image_processor.classify_height_width_bin(height, width, ratios=ratios)


def last_plan(pipe) -> Plan | None:
    """The plan the pipeline's last call compiled and ran (step by step: latent size, UNet variant, guidance), or
    None before the first call."""
    return pipe.__dict__.get("_postdiff_last_plan")


class _Session:
    """The per-call state: compiled plan, its PlanRun, the UNet split and its caches."""

    def __init__(self, pipe, recipe: Recipe, latent_hw: tuple[int, int], generator) -> None:
        self.pipe = pipe
        self.recipe = recipe
        self.latent_hw = latent_hw
        self.generator = generator
        self.network = network_of(pipe)
        self.spec = spec_of(self.network)
        self.images: int | None = None  # latents per call (the CFG batch is twice that)
        self.plan: Plan | None = None
        self.run: PlanRun | None = None
        self.denoiser: TorchDenoiser | None = None

    @contextlib.contextmanager
    def installed(self):
        pipe = self.pipe
        scheduler = pipe.scheduler
        split = split_for(self.network, self.recipe)
        self.denoiser = TorchDenoiser(split)
        registry = HookRegistry.check_if_exists_or_initialize(self.network)
        registry.register_hook(_UNetHook(self), _HOOK_NAME)
        object.__setattr__(pipe, "scheduler", _SchedulerProxy(scheduler, self))
        object.__setattr__(pipe, "prepare_latents", self._prepare_latents(pipe.prepare_latents))
        try:
            yield
        finally:
            pipe.__dict__.pop("prepare_latents", None)
            object.__setattr__(pipe, "scheduler", scheduler)
            registry.remove_hook(_HOOK_NAME)
            split.close()

    # -- called by the pipeline through the proxies ----------------------------------------------------------------
    def on_set_timesteps(self, scheduler, args, kwargs) -> None:
        n = int(scheduler.num_inference_steps)
        recipe = self.recipe if n == self.recipe.steps else self.recipe.with_steps(n)
        self.plan = compile_plan(
            recipe,
            timesteps=[float(t) for t in scheduler.timesteps],
            latent_hw=self.latent_hw,
            model=self.spec,
            order=int(getattr(scheduler, "order", 1)),
            scheduler=type(scheduler).__name__,
        )
        self.run = PlanRun(self.plan, scheduler, self.generator, (args, kwargs))
        self.denoiser.reset()

    def _prepare_latents(self, original):
        @functools.wraps(original)
        def prepare_latents(batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None, *rest):
            if self.plan is None:
                raise PlanError("the pipeline prepared latents before setting timesteps; PostDiff cannot plan this call")
            # The noise is drawn at full size exactly as the vanilla pipeline draws it (or taken from latents=), then
            # derived for the plan's first, possibly lower, resolution: one seed, one starting point for every plan.
            drawn = original(batch_size, num_channels_latents, height, width, dtype, device, generator, latents, *rest)
            self.images = int(drawn.shape[0])
            return initial_latents(self.plan, drawn)

        return prepare_latents

    def unet_call(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs=None,
        encoder_attention_mask=None,
        **other,
    ):
        transformer = self.spec.is_transformer
        unsupported = sorted(k for k, v in other.items() if v is not None and k != "return_dict")
        allowed = {"resolution", "aspect_ratio"} if transformer else {"text_embeds", "time_ids"}
        extra = sorted(k for k, v in (added_cond_kwargs or {}).items() if k not in allowed and v is not None)
        if encoder_attention_mask is not None and not transformer:
            extra.append("encoder_attention_mask")
        if unsupported or extra:
            raise PlanError(f"PostDiff plans do not support these UNet inputs yet: {unsupported + extra}")
        if self.run is None:
            raise PlanError("the UNet ran before the scheduler's timesteps were set; PostDiff cannot plan this call")
        step = self.run.step
        added = added_cond_kwargs or {}
        # a CFG batch holds two rows per latent the pipeline prepared (not every pipeline keeps a flag for it)
        has_uncond = self.images is not None and sample.shape[0] == 2 * self.images
        cond = Conditioning(
            encoder_hidden_states=encoder_hidden_states,
            has_uncond=has_uncond,
            text_embeds=added.get("text_embeds"),
            time_ids=added.get("time_ids"),
            timestep_cond=timestep_cond,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
            resolution=added.get("resolution"),
            aspect_ratio=added.get("aspect_ratio"),
        )
        full_hw = self.plan.latent_hw
        if step.guidance == "cond" and cond.has_uncond:
            # CFG dropped: run the conditional half only and hand the pipeline the same prediction twice, so its
            # uncond + scale * (cond - uncond) is exactly the conditional prediction.
            half = sample.shape[0] // 2
            t = timestep[half:] if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == sample.shape[0] else timestep
            out = self.denoiser(step, sample[half:], t, cond.cond_half().at_size(step.latent_hw, full_hw))
            return torch.cat([out, out])
        return self.denoiser(step, sample, timestep, cond.at_size(step.latent_hw, full_hw))


class _UNetHook(ModelHook):
    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.session = session

    def new_forward(self, module, sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        if args:
            raise PlanError("PostDiff expects the UNet's optional inputs as keywords, as diffusers pipelines pass them")
        out = self.session.unet_call(sample, timestep, encoder_hidden_states, **kwargs)
        if not return_dict:
            return (out,)
        if self.session.spec.is_transformer:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


class _SchedulerProxy:
    """Stands in for the pipeline's scheduler during one call: every attribute is the real scheduler's, except
    ``set_timesteps`` (which also compiles the plan) and ``step`` (which is ``PlanRun.advance``)."""

    def __init__(self, inner, session: _Session) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_session", session)

        @functools.wraps(inner.set_timesteps)
        def set_timesteps(*args, **kwargs):
            out = inner.set_timesteps(*args, **kwargs)
            session.on_set_timesteps(inner, args, kwargs)
            if any(s.schedule_index is not None for s in session.plan.steps):
                # a shifted switch repeats or skips timesteps: the pipeline's loop (which reads the timesteps right
                # after setting them) runs the plan's calls instead of the schedule's
                object.__setattr__(self, "timesteps", inner.timesteps.new_tensor(session.plan.timesteps))
            else:
                self.__dict__.pop("timesteps", None)
            return out

        @functools.wraps(inner.step)
        def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            if args:
                raise PlanError("PostDiff expects scheduler.step's options as keywords")
            run = session.run
            out = run.advance(model_output, timestep, sample, **kwargs)
            if is_consistency_scheduler(inner):  # LCM: (prev_sample, denoised)
                if return_dict:
                    from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

                    return LCMSchedulerOutput(prev_sample=out, denoised=run.denoised)
                return (out, run.denoised)
            if return_dict:
                from diffusers.schedulers.scheduling_utils import SchedulerOutput

                return SchedulerOutput(prev_sample=out)
            return (out,)

        object.__setattr__(self, "set_timesteps", set_timesteps)
        object.__setattr__(self, "step", step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)
