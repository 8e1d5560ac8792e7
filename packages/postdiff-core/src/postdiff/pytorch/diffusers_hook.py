"""Run a plan inside a diffusers Stable Diffusion / SDXL / LCM / PixArt / SD3 / SANA pipeline (text-to-image, image-to-image,
inpainting, the SDXL refiner): ``postdiff.apply(pipe, "postdiff")``.

After ``apply``, the usual ``pipe(prompt, ...)`` call runs the plan; ``postdiff.remove(pipe)`` restores the
vanilla pipeline. The pipeline's own loop stays in charge (prompt encoding, CFG arithmetic, callbacks, VAE
decoding, every ``__call__`` option); for the duration of each call only, PostDiff

* compiles the recipe against the scheduler's actual timesteps and the call's image size,
* hooks the denoising network (the UNet, or PixArt's transformer; diffusers ``HookRegistry``) so each call runs
  the plan step's variant through a ``TorchDenoiser`` (full/shallow, CFG or conditional-only with cached
  cross-attention),
* puts a thin proxy in front of the scheduler whose ``step`` is ``PlanRun.advance`` (the resolution switch),
* draws the initial latent at the plan's first latent size from the call's generator.

Image-to-image and inpainting runs denoise only the last steps of the schedule (``strength``, SDXL's
``denoising_start``/``denoising_end``): the plan is compiled for the steps that run (``Recipe.for_partial_run``),
its steps keep their place in the whole schedule (``plan.starting_at``). At a lower stage size the tensors the
pipeline prepared once at full size and uses every step (the encoded image and its noise, the inpainting mask and
masked image) follow the stage: PostDiff resizes them in place, so the pipeline's own blending and the 9-channel
inpainting UNet's input are at the stage's size, and back at full size from the switch on.

All of it is torn down when the call returns: nothing carries over from one call to the next.

A plan belongs to its call. The pipeline object is not changed during a call (its ``scheduler``, ``prepare_latents``
and ``prepare_mask_latents`` look up the call in a ``ContextVar``), the call steps its own copy of the scheduler, and
the hook on the network (shared by every call that uses it, counted) runs the plan only for the call that set it up,
in that call's thread, and not while the call's step callbacks run. So other threads, other pipelines sharing the
UNet (``from_pipe``, a server's shared components), and a pipeline called from inside a step callback run exactly as
they would without PostDiff. One exception, opt-in: ``POSTDIFF_CPU_CONV=native|auto`` switches PyTorch's process-wide
oneDNN flag for the plan's calls, which other threads' convolutions see (they round about 1e-6 differently).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import threading
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from postdiff.errors import ModelError, PlanError
from postdiff.loop.conditioning import Conditioning, second_half
from postdiff.loop.resolution import (
    downsample_latent,
    downsample_noise,
    downsample_noisy,
    is_consistency_scheduler,
    noise_level,
    restart_repeat,
)
from postdiff.loop.sampling import PlanRun, begin_by_position, compile_for_scheduler, initial_latents
from postdiff.plan.compiler import Plan, check_recipe_fits, compile_plan, first_latent_hw, starting_at
from postdiff.plan.recipe import Recipe, load_recipe
from postdiff.pytorch.backbone import network_of, spec_of, split_for
from postdiff.pytorch.denoiser import TorchDenoiser

SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLControlNetInpaintPipeline",
    "LatentConsistencyModelPipeline",
    "PixArtAlphaPipeline",
    "PixArtSigmaPipeline",
    "StableDiffusion3Pipeline",
    "SanaPipeline",
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
    # a network PostDiff cannot split, or a recipe this network cannot run: refused here, not at every later call
    spec = spec_of(network_of(pipe))
    check_recipe_fits(recipe, spec)
    if "height" in inspect.signature(base.__call__).parameters:
        # the default call (the pipeline's own image size, the recipe's steps, its scheduler) compiled now, on a copy
        # of the scheduler: a size the plan cannot reach or a schedule it cannot run is refused here too. A call at
        # another size or step count is compiled when it starts, before its first network call.
        compile_for_scheduler(recipe, copy.deepcopy(pipe.scheduler), _latent_hw(pipe, base, {}), spec)
    if base not in _SUBCLASSES:
        # Same class name, so anything that reads it (save_pretrained, logging) still sees the original.
        _SUBCLASSES[base] = type(base.__name__, (base,), _call_dispatch(base))
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


# The plan call running in this thread (or asyncio task), if any: what the subclass's attributes and the network's
# hook read. A ContextVar, so a call in another thread sees none and runs vanilla.
_CALL: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("postdiff_call", default=None)


def _running(pipe) -> _Session | None:
    session = _CALL.get()
    return session if session is not None and session.pipe is pipe else None


def _call_dispatch(base) -> dict[str, Any]:
    """The applied subclass's attributes: ``__call__`` runs the plan; ``scheduler`` and the latent preparation are the
    call's own while a call of this pipeline runs in this context, and the pipeline's everywhere else."""

    def get_scheduler(self):
        session = _running(self)
        return session.scheduler_proxy if session is not None else self.__dict__["scheduler"]

    def set_scheduler(self, value) -> None:
        self.__dict__["scheduler"] = value

    attributes: dict[str, Any] = {"__call__": _call, "_postdiff_base": base, "scheduler": property(get_scheduler, set_scheduler)}
    for name in ("prepare_latents", "prepare_mask_latents"):
        if hasattr(base, name):
            attributes[name] = _dispatched(base, name)
    return attributes


def _dispatched(base, name: str):
    original = getattr(base, name)

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        session = _running(self)
        bound = original.__get__(self)
        if session is None:
            return bound(*args, **kwargs)
        return getattr(session, f"_{name}")(bound)(*args, **kwargs)

    return method


def _call(self, *args, **kwargs):
    base = type(self)._postdiff_base
    bound = inspect.signature(base.__call__).bind(self, *args, **kwargs)
    arguments = bound.arguments
    recipe: Recipe = self._postdiff_recipe
    if "num_inference_steps" not in arguments:
        arguments["num_inference_steps"] = recipe.steps
    elif arguments["num_inference_steps"] != recipe.steps:
        recipe = recipe.with_steps(int(arguments["num_inference_steps"]))
    latent_hw = _latent_hw(self, base, arguments)
    params = inspect.signature(base.__call__).parameters
    if "original_size" in params and "image" in params:
        # SDXL img2img/inpaint take the size conditioning's default from the prepared latent, which PostDiff makes at
        # the first stage's size: give the pipeline the full size it would have read
        full = (latent_hw[0] * self.vae_scale_factor, latent_hw[1] * self.vae_scale_factor)
        for key in ("original_size", "target_size"):
            if arguments.get(key) is None:
                arguments[key] = full
    end = arguments.get("denoising_end")
    end = float(end) if isinstance(end, float) and 0 < end < 1 else None  # as the pipelines test it
    session = _Session(self, recipe, latent_hw, arguments.get("generator"), end=end)
    # step callbacks (SD's legacy ``callback`` arrives in the pipeline's **kwargs) run as user code, outside the plan
    var_keyword = next((p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    for holder in (arguments, arguments.get(var_keyword) or {}):
        for key in ("callback_on_step_end", "callback"):
            if holder.get(key) is not None:
                holder[key] = session.outside_plan(holder[key])
    token = _CALL.set(session)
    try:
        with session.installed():
            return base.__call__(*bound.args, **bound.kwargs)
    finally:
        _CALL.reset(token)
        object.__setattr__(self, "_postdiff_last_plan", session.plan)


def _latent_hw(pipe, base, arguments) -> tuple[int, int]:
    """The full latent size of a call: the input image's (image-to-image pipelines, which have no ``height``), else
    ``height``/``width`` or the network's sample size (PixArt: after resolution binning)."""
    factor = pipe.vae_scale_factor
    image = arguments.get("image")
    if "height" not in inspect.signature(base.__call__).parameters and image is not None:
        prepared = pipe.image_processor.preprocess(image)  # as the pipeline prepares it (a latent passes unchanged)
        h, w = (int(v) for v in prepared.shape[-2:])
        latent_channels = int(getattr(pipe.vae.config, "latent_channels", 4))
        return (h, w) if prepared.shape[1] == latent_channels else (h // factor, w // factor)
    params = inspect.signature(base.__call__).parameters
    size = network_of(pipe).config.sample_size * factor
    # the pipeline's own default where it has one (SANA's 1024 px), else the network's sample size (SD, PixArt, SD3)
    height = arguments.get("height") or (params["height"].default if isinstance(params["height"].default, int) else size)
    width = arguments.get("width") or (params["width"].default if isinstance(params["width"].default, int) else size)
    binning = "use_resolution_binning" in inspect.signature(base.__call__).parameters  # PixArt's and SANA's pipelines
    if binning and arguments.get("use_resolution_binning", True):
        height, width = _resolution_bin(pipe, int(height), int(width))
    return (int(height) // factor, int(width) // factor)


def _resolution_bin(pipe, height: int, width: int) -> tuple[int, int]:
    """The size a PixArt or SANA pipeline generates at with ``use_resolution_binning`` (its default): the nearest
    aspect-ratio bin of its sample size, from the pipelines' own tables, chosen as each pipeline chooses them (the image
    is resized back to the request at the end)."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

    if type(pipe.transformer).__name__ == "SanaTransformer2DModel":  # SANA keys its tables by its 32x VAE's sizes
        bins = {16: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_4096_BIN}
    else:
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
    """The per-call state: compiled plan, its PlanRun, the UNet split and its caches, and the tensors that follow the
    stage's size."""

    def __init__(self, pipe, recipe: Recipe, latent_hw: tuple[int, int], generator, end: float | None = None) -> None:
        self.pipe = pipe
        self.recipe = recipe
        self.latent_hw = latent_hw
        self.generator = generator
        self.end = end  # denoising_end: the run stops at this fraction of the schedule
        self.network = network_of(pipe)
        self.spec = spec_of(self.network)
        self.images: int | None = None  # latents per call (the CFG batch is twice that)
        self.plan: Plan | None = None
        self.run: PlanRun | None = None
        self.denoiser: TorchDenoiser | None = None
        self.scheduler = None  # the real scheduler, once the pipeline set its timesteps
        self.begin = 0  # where the run starts in the scheduler's timesteps (set_begin_index)
        self.shifted = False  # the plan re-noises to another point of the schedule at its switch
        self.noised = None  # (x0, noise, timestep) of the add_noise call that made an img2img starting latent
        self.preparing = False
        self.stage_tensors: list[tuple[Any, Any, str]] = []  # (tensor the pipeline holds, its full-size data, kind)
        self.controlnets = _controlnets(pipe)
        # the call steps a copy: a scheduler shared with other pipelines (from_pipe) keeps its state for them
        self.scheduler_proxy = _SchedulerProxy(copy.deepcopy(pipe.__dict__["scheduler"]), self)
        self.in_callback = False  # user code runs: the network's hook passes calls straight through

    def runs(self, module) -> bool:
        """Whether a call of ``module`` (the network or a ControlNet) made now belongs to this plan call."""
        return not self.in_callback and (module is self.network or any(module is net for net in self.controlnets))

    def outside_plan(self, callback):
        """``callback`` run as user code: whatever it calls (another pipeline on the same UNet) runs without the plan."""
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        session = self

        def run(fn, *args, **kwargs):
            before, session.in_callback = session.in_callback, True
            try:
                return fn(*args, **kwargs)
            finally:
                session.in_callback = before

        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            # still a MultiPipelineCallbacks, so the pipeline reads its tensor_inputs as it would the original's
            class OutsidePlan(MultiPipelineCallbacks):
                def __call__(self, *args, **kwargs):
                    return run(callback, *args, **kwargs)

            return OutsidePlan([callback])
        return functools.wraps(callback)(lambda *args, **kwargs: run(callback, *args, **kwargs))

    @contextlib.contextmanager
    def installed(self):
        split = split_for(self.network, self.recipe)
        self.denoiser = TorchDenoiser(split)
        hooked = [(self.network, _UNetHook), *((net, _ControlNetHook) for net in self.controlnets)]
        for module, kind in hooked:
            _hold_hook(module, kind)
        try:
            yield
        finally:
            self._resize_stage(self.latent_hw)  # what the pipeline keeps of this call is at full size
            for module, _ in hooked:
                _release_hook(module)
            split.close()

    # -- the plan ---------------------------------------------------------------------------------------------------
    def on_set_timesteps(self, scheduler, args, kwargs) -> None:
        self.scheduler, self._set_timesteps, self.begin = scheduler, (args, kwargs), 0
        self._compile()

    def on_set_begin_index(self, begin: int) -> None:
        if self.scheduler is not None:
            self.begin = int(begin)
            self._compile()

    def _begin_at(self, timestep) -> None:
        """The run starts at ``timestep`` (img2img's first timestep, which ``prepare_latents`` noises the image to):
        with schedulers that have no ``set_begin_index`` (DDIM, ...) this is how PostDiff learns that ``strength``
        cut the schedule."""
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        listed = [float(v) for v in self.scheduler.timesteps]
        if listed and abs(listed[0] - t) > 1e-6:
            begin = next((i for i, v in enumerate(listed) if abs(v - t) <= 1e-6), None)
            if begin is None:
                raise PlanError(
                    f"the pipeline starts at timestep {t:g}, which is not in its scheduler's timesteps; PostDiff cannot plan this call"
                )
            self.begin = begin
            self._compile()

    def _compile(self) -> None:
        """Compile the recipe for the steps this call runs: the schedule from ``begin`` on, cut at ``denoising_end``."""
        scheduler = self.scheduler
        n = int(scheduler.num_inference_steps)
        recipe = self.recipe if n == self.recipe.steps else self.recipe.with_steps(n)
        timesteps = [float(t) for t in scheduler.timesteps]
        running = timesteps[self.begin :]
        if self.end is not None:  # as SDXL pipelines cut their loop at denoising_end
            trained = int(scheduler.config.num_train_timesteps)
            cutoff = int(round(trained - self.end * trained))
            running = running[: sum(1 for t in running if t >= cutoff)]
        if not running:
            raise PlanError("this call runs no denoising step (strength or denoising_start/denoising_end leave none); raise strength")
        order = int(getattr(scheduler, "order", 1))
        partial = len(running) != len(timesteps)
        if partial:
            recipe = recipe.for_partial_run(-(-len(running) // order))
        plan = compile_plan(
            recipe, timesteps=running, latent_hw=self.latent_hw, model=self.spec, order=order, scheduler=type(scheduler).__name__
        )
        if restart_repeat(scheduler) and any(s.switches_resolution for s in plan.steps):
            raise PlanError(
                f"{type(scheduler).__name__} starts over after the resolution switch with a repeated call, which the "
                f"pipeline's own loop (one UNet call per timestep) cannot make; use a plan without low_res, or another "
                f"scheduler (ddim, euler, dpmpp-2m-karras, unipc, ...) for this pipeline. PostDiff's own loop (bundles, "
                f"the embedded models) runs it"
            )
        self.shifted = any(s.schedule_index is not None for s in plan.steps)
        if self.shifted and partial:
            raise PlanError(
                "low_res.renoise_shift moves the switch along the schedule, and this call runs only part of it (img2img "
                "strength, inpainting or denoising_start/denoising_end); use renoise_shift 0 for partial runs"
            )
        self.plan = starting_at(plan, self.begin)
        self.run = PlanRun(self.plan, scheduler, self.generator, self._set_timesteps)
        self.denoiser.reset()

    # -- the pipeline's prepared tensors ----------------------------------------------------------------------------
    def _prepare_latents(self, original):
        signature = inspect.signature(original)
        from_image = next(iter(signature.parameters), None) == "image"  # img2img: prepare_latents(image, timestep, ...)

        @functools.wraps(original)
        def prepare_latents(*args, **kwargs):
            if self.plan is None and not from_image:
                # SD3 and FLUX prepare the latent first (their schedule's shift can depend on its size): the starting
                # latent at the first stage's size, which the recipe alone decides
                latents = original(*args, **kwargs)
                self.images = int(latents.shape[0])
                return downsample_noise(latents, first_latent_hw(self.recipe, self.latent_hw, self.spec))
            if self.plan is None:
                raise PlanError("the pipeline prepared latents before setting timesteps; PostDiff cannot plan this call")
            start_t = signature.bind_partial(*args, **kwargs).arguments.get("timestep")
            if start_t is not None and self.begin == 0:
                self._begin_at(start_t)
            self.noised, self.preparing = None, True
            try:
                out = original(*args, **kwargs)
            finally:
                self.preparing = False
            latents, extras = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
            if from_image and tuple(latents.shape[-2:]) != tuple(self.latent_hw):
                self.latent_hw = tuple(int(v) for v in latents.shape[-2:])  # the encoded image sets the size
                self._compile()
            self.images = int(latents.shape[0])
            start = self._starting_latent(latents)
            if not extras:
                return start
            # inpainting: (latents, noise[, image_latents]), used at every step's blending: they follow the stage
            return (start, *(self._follow_stage(t, kind) for t, kind in zip(extras, ("noise", "latent"))))

        return prepare_latents

    def _starting_latent(self, latents):
        """The plan's starting latent from the one the pipeline prepared at full size: the same seed gives one
        starting point for every plan. Noise is area-averaged to unit variance; an img2img start is the encoded image
        area-averaged and noised with the averaged noise; an already-noised latent (a refiner's input) is
        area-averaged and given back the noise variance the averaging took away."""
        step = self.plan.steps[0]
        first = tuple(step.latent_hw)
        if tuple(latents.shape[-2:]) == first:
            return latents
        if self.noised is not None:
            x0, noise, t = self.noised
            return self.scheduler.add_noise(downsample_latent(x0, first), downsample_noise(noise, first), t)
        if self.begin > 0:
            from diffusers.utils.torch_utils import randn_tensor

            fresh = randn_tensor((*latents.shape[:-2], *first), generator=self.generator, device=latents.device, dtype=latents.dtype)
            return downsample_noisy(latents, first, noise_level(self.scheduler, step.scheduler_index, step.timestep), fresh)
        return initial_latents(self.plan, latents)

    def _prepare_mask_latents(self, original):
        @functools.wraps(original)
        def prepare_mask_latents(*args, **kwargs):
            mask, masked_image_latents = original(*args, **kwargs)
            return self._follow_stage(mask, "mask"), self._follow_stage(masked_image_latents, "latent")

        return prepare_mask_latents

    def _follow_stage(self, tensor, kind: str):
        """Register a tensor the pipeline prepared at full size and uses every step; it is resized in place (same
        object, so the pipeline's variable follows) to the current stage's size now and at every switch."""
        if not torch.is_tensor(tensor) or tensor.ndim != 4 or tuple(tensor.shape[-2:]) != tuple(self.latent_hw):
            return tensor
        entry = (tensor, tensor.detach(), kind)
        self.stage_tensors.append(entry)
        self._resize_entry(entry, tuple(self.plan.steps[0].latent_hw))
        return tensor

    @staticmethod
    def _resize_entry(entry, hw: tuple[int, int]) -> None:
        tensor, full, kind = entry
        if tuple(tensor.shape[-2:]) == hw:
            return
        if tuple(full.shape[-2:]) == hw:
            tensor.set_(full)
        else:
            tensor.set_((downsample_noise if kind == "noise" else downsample_latent)(full, hw).contiguous())

    def _resize_stage(self, hw: tuple[int, int]) -> None:
        for entry in self.stage_tensors:
            self._resize_entry(entry, tuple(hw))

    def after_step(self) -> None:
        """Called after each scheduler step: the stage-following tensors take the next step's size (at a switch)."""
        if self.run.index < len(self.plan.steps):
            self._resize_stage(self.run.step.latent_hw)

    def unet_call(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs=None,
        encoder_attention_mask=None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
        **other,
    ):
        transformer = self.spec.is_transformer
        pooled = other.pop("pooled_projections", None)  # SD3's pooled text embedding: the Conditioning's text_embeds
        if not other.get("joint_attention_kwargs"):  # SD3's, None or empty unless an IP-Adapter or LoRA scale is set
            other.pop("joint_attention_kwargs", None)
        unsupported = sorted(k for k, v in other.items() if v is not None and k != "return_dict")
        allowed = {"resolution", "aspect_ratio"} if transformer else {"text_embeds", "time_ids", "image_embeds"}
        extra = sorted(k for k, v in (added_cond_kwargs or {}).items() if k not in allowed and v is not None)
        if encoder_attention_mask is not None and not transformer:
            extra.append("encoder_attention_mask")
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            extra.append("down_block_additional_residuals without mid_block_additional_residual (or the reverse)")
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
            text_embeds=added.get("text_embeds") if pooled is None else pooled,
            time_ids=added.get("time_ids"),
            timestep_cond=timestep_cond,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
            resolution=added.get("resolution"),
            aspect_ratio=added.get("aspect_ratio"),
            down_block_additional_residuals=None if down_block_additional_residuals is None else tuple(down_block_additional_residuals),
            mid_block_additional_residual=mid_block_additional_residual,
            image_embeds=None if added.get("image_embeds") is None else tuple(added["image_embeds"]),
        )
        full_hw = self.plan.latent_hw
        if step.guidance == "cond" and cond.has_uncond:
            # CFG dropped: run the conditional half only and hand the pipeline the same prediction twice, so its
            # uncond + scale * (cond - uncond) is exactly the conditional prediction.
            half = sample.shape[0] // 2
            t = second_half(timestep, sample.shape[0])
            out = self.denoiser(step, sample[half:], t, cond.cond_half().at_size(step.latent_hw, full_hw))
            return torch.cat([out, out])
        return self.denoiser(step, sample, timestep, cond.at_size(step.latent_hw, full_hw))


_HOOKS_LOCK = threading.Lock()


def _hold_hook(module, kind: type[ModelHook]) -> None:
    """Register ``kind`` on ``module`` for one more plan call (the first registers it). The hook serves every call
    that holds it: it asks the running call (``_CALL``) whether the module's call is the plan's, else passes it on."""
    with _HOOKS_LOCK:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        hook = registry.get_hook(_HOOK_NAME)
        if hook is None:
            hook = kind()
            registry.register_hook(hook, _HOOK_NAME)
        hook.holders += 1


def _release_hook(module) -> None:
    with _HOOKS_LOCK:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        hook = registry.get_hook(_HOOK_NAME)
        if hook is not None:
            hook.holders -= 1
            if hook.holders <= 0:
                registry.remove_hook(_HOOK_NAME)


class _DispatchHook(ModelHook):
    """On a network while plan calls use it: the plan call's own calls go to ``plan_forward``; any other call of the
    module (another thread, another pipeline, a step callback) runs the module unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.holders = 0

    def new_forward(self, module, *args, **kwargs):
        session = _CALL.get()
        if session is None or not session.runs(module):
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.plan_forward(session, *args, **kwargs)

    def plan_forward(self, session: _Session, *args, **kwargs):
        raise NotImplementedError


class _UNetHook(_DispatchHook):
    def plan_forward(self, session: _Session, *args, return_dict: bool = True, **kwargs):
        # the first three inputs, by position or by name: the UNet's and PixArt's first is ``sample``, SD3's and
        # SANA's ``hidden_states``
        if "hidden_states" in kwargs:
            kwargs["sample"] = kwargs.pop("hidden_states")
        names = ("sample", "timestep", "encoder_hidden_states")
        given = {**dict(zip(names, args)), **{n: kwargs.pop(n) for n in names if n in kwargs}}
        args = args[len(names) :]
        sample, timestep, encoder_hidden_states = (given.get(n) for n in names)
        if args:
            raise PlanError("PostDiff expects the UNet's optional inputs as keywords, as diffusers pipelines pass them")
        out = session.unet_call(sample, timestep, encoder_hidden_states, **kwargs)
        if not return_dict:
            return (out,)
        if session.spec.is_transformer:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


def _controlnets(pipe) -> list:
    """The ControlNet models a pipeline runs: one, or each of a ``MultiControlNetModel``'s."""
    net = getattr(pipe, "controlnet", None)
    if net is None:
        return []
    nets = list(getattr(net, "nets", [net]))
    unknown = sorted({type(n).__name__ for n in nets if type(n).__name__ != "ControlNetModel"})
    if unknown:
        raise ModelError(f"PostDiff runs ControlNetModel (one, or several in a MultiControlNetModel), not {', '.join(unknown)}")
    return nets


class _ControlNetHook(_DispatchHook):
    """On each ControlNet during a call. At a lower stage size the control image is area-averaged to the stage's size
    (the ControlNet's residuals must match the UNet's skips there). On a step with CFG dropped, only the conditional
    half runs: the UNet uses only that half's residuals, so the other half would be computed for nothing."""

    def plan_forward(self, session: _Session, sample, timestep, encoder_hidden_states=None, controlnet_cond=None, *args, **kwargs):
        if args:
            raise PlanError("PostDiff expects the ControlNet's optional inputs as keywords, as diffusers pipelines pass them")
        stage, full = tuple(sample.shape[-2:]), tuple(session.plan.latent_hw)
        if stage != full and torch.is_tensor(controlnet_cond):
            h, w = controlnet_cond.shape[-2:]
            controlnet_cond = downsample_latent(controlnet_cond, (h * stage[0] // full[0], w * stage[1] // full[1]))
        step = session.run.step if session.run is not None else None
        batch = int(sample.shape[0])
        if step is None or step.guidance != "cond" or session.images is None or batch != 2 * session.images:
            return self.fn_ref.original_forward(sample, timestep, encoder_hidden_states, controlnet_cond, **kwargs)
        half = {k: second_half(v, batch) for k, v in kwargs.items()}
        out = self.fn_ref.original_forward(
            sample[batch // 2 :],
            second_half(timestep, batch),
            second_half(encoder_hidden_states, batch),
            second_half(controlnet_cond, batch),
            **half,
        )
        down, mid = (out[0], out[1]) if isinstance(out, tuple) else (out.down_block_res_samples, out.mid_block_res_sample)
        down, mid = tuple(torch.cat([d, d]) for d in down), torch.cat([mid, mid])
        if isinstance(out, tuple):
            return (down, mid)
        return type(out)(down_block_res_samples=down, mid_block_res_sample=mid)


class _SchedulerProxy:
    """Stands in for the pipeline's scheduler during one call (what ``pipe.scheduler`` is inside the call; it steps the
    call's copy of the scheduler): every attribute is the copy's, except
    ``set_timesteps`` (which also compiles the plan) and ``step`` (which is ``PlanRun.advance``)."""

    def __init__(self, inner, session: _Session) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_session", session)

        @functools.wraps(inner.set_timesteps)
        def set_timesteps(*args, **kwargs):
            out = inner.set_timesteps(*args, **kwargs)
            begin_by_position(inner)
            session.on_set_timesteps(inner, args, kwargs)
            if session.shifted:
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
            session.after_step()
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
        if hasattr(inner, "add_noise"):  # the flow-matching schedulers have none (their scale_noise is SD3 img2img's)

            @functools.wraps(inner.add_noise)
            def add_noise(original_samples, noise, timesteps):
                out = inner.add_noise(original_samples, noise, timesteps)
                if session.preparing:  # the img2img starting latent: kept to make it at the first stage's size
                    session.noised = (original_samples, noise, timesteps)
                return out

            object.__setattr__(self, "add_noise", add_noise)
        if hasattr(inner, "set_begin_index"):  # pipelines test hasattr before they call it

            @functools.wraps(inner.set_begin_index)
            def set_begin_index(begin_index: int = 0):
                inner.set_begin_index(begin_index)
                session.on_set_begin_index(begin_index)

            object.__setattr__(self, "set_begin_index", set_begin_index)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)
