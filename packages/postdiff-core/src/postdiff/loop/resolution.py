"""The resolution switch: predict the clean sample, upsample it, re-noise it to the next timestep.

    x0     = prediction from the last low-resolution UNet output (epsilon, v or sample parameterisation)
    x_next = renoise(bilinear_upsample(x0), fresh noise, noise level of the next plan step)

The arithmetic depends on the scheduler's sample space: variance-preserving schedulers (DDIM, DPM-Solver, ...)
keep x = sqrt(abar) x0 + sqrt(1 - abar) eps; sigma-space schedulers (Euler, Heun, ...) keep x = x0 + sigma eps
and scale the UNet input themselves; flow-matching schedulers (SD3's and FLUX's FlowMatchEulerDiscreteScheduler,
SANA's DPM-Solver with flow sigmas) keep x = (1 - sigma) x0 + sigma eps and the network predicts the velocity
v = eps - x0, so x0 = x - sigma v. Noise levels are looked up by plan index, never by searching timesteps.
The arithmetic is written once for PyTorch tensors and numpy arrays (``postdiff.loop.arrays``), with diffusers'
schedulers or the numpy ones (``postdiff.loop.numpy_schedulers``), which expose the same attributes.
"""

from __future__ import annotations

from postdiff.errors import PlanError
from postdiff.loop.arrays import ops_for
from postdiff.loop.numpy_schedulers import consistency_scalings
from postdiff.plan.schedulers import is_flow_config

# Schedulers whose history is fully reset by set_timesteps() and that can restart at any step index.
RESTARTABLE_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LMSDiscreteScheduler",
    "LCMScheduler",
    "PNDMScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
)
# Schedulers that start over with warm-up calls after a restart: {class: calls repeated after the restart}. PNDM's
# PLMS evaluates its first step twice (its schedule repeats its second timestep); after a restart at the switch the
# plan repeats the call after the switch the same way (``plan.compile_plan``'s ``restart_repeat``).
RESTART_REPEATS = {"PNDMScheduler": 1}


def restart_repeat(scheduler) -> int:
    """Calls ``scheduler`` repeats after a restart (``RESTART_REPEATS``)."""
    return RESTART_REPEATS.get(type(scheduler).__name__, 0)


def check_switchable(scheduler) -> None:
    name = type(scheduler).__name__
    if name not in RESTARTABLE_SCHEDULERS:
        raise PlanError(
            f"mixed resolution needs a scheduler PostDiff can restart at the switch; {name} is not one. Use one of "
            f"{', '.join(RESTARTABLE_SCHEDULERS)} (e.g. DDIMScheduler.from_config(pipe.scheduler.config)), or a "
            f"plan without low_res"
        )


def init_noise_sigma(scheduler) -> float:
    """The scale of the starting noise: the scheduler's ``init_noise_sigma`` (sigma-space samplers start at x = sigma_max
    eps). The flow-matching schedulers have none: their start is the noise itself (sigma 1 on the flow line)."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0))


def scale_model_input(scheduler, sample, timestep):
    """The network's input at ``timestep``: the scheduler's ``scale_model_input`` (sigma-space samplers divide by
    sqrt(sigma^2 + 1)); the flow-matching schedulers have none and take the sample as it is."""
    scale = getattr(scheduler, "scale_model_input", None)
    return sample if scale is None else scale(sample, timestep)


def _sigma_space(scheduler) -> bool:
    """True when samples live in sigma space (x = x0 + sigma * eps), e.g. Euler and Heun."""
    return hasattr(scheduler, "sigmas") and init_noise_sigma(scheduler) > 1.0


def is_flow_matching(scheduler) -> bool:
    """True for a rectified-flow sampler: x = (1 - sigma) x0 + sigma eps, the network predicts v = eps - x0."""
    return is_flow_config(type(scheduler).__name__, scheduler.config)


def _flow_sigma(scheduler, index: int) -> float:
    return float(scheduler.sigmas[index])


def _vp_coefficients(scheduler, index: int, timestep: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) with x = alpha_t x0 + sigma_t eps, for the noise level of plan step ``index``."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "_sigma_to_alpha_sigma_t") and index < len(sigmas):
        alpha, sigma = scheduler._sigma_to_alpha_sigma_t(sigmas[index])
        return float(alpha), float(sigma)
    abar = float(scheduler.alphas_cumprod[int(round(timestep))])
    return abar**0.5, (1.0 - abar) ** 0.5


def predict_x0(scheduler, sample, model_output, index: int, timestep: float):
    """The clean sample predicted by ``model_output`` at plan step ``index`` (sample in scheduler space)."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    ops = ops_for(sample)
    x, out = ops.float32(sample), ops.float32(model_output)
    if is_flow_matching(scheduler):
        x0 = x - _flow_sigma(scheduler, index) * out
    elif kind == "sample":
        x0 = out
    elif _sigma_space(scheduler):
        sigma = float(scheduler.sigmas[index])
        if kind == "epsilon":
            x0 = x - sigma * out
        elif kind == "v_prediction":
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:
            raise PlanError(f"mixed resolution: unsupported prediction_type {kind!r}")
    else:
        alpha, sigma = _vp_coefficients(scheduler, index, timestep)
        if kind == "epsilon":
            x0 = (x - sigma * out) / alpha
        elif kind == "v_prediction":
            x0 = alpha * x - sigma * out
        else:
            raise PlanError(f"mixed resolution: unsupported prediction_type {kind!r}")
    x0 = _as_the_scheduler_limits(scheduler, x0)
    if is_consistency_scheduler(scheduler):  # its output is the boundary-conditioned x0
        c_skip, c_out = consistency_scalings(scheduler, timestep)
        x0 = c_out * x0 + c_skip * x
    return ops.like(x0, sample)


def is_consistency_scheduler(scheduler) -> bool:
    """LCMScheduler and its numpy twin: a step returns (prev_sample, denoised), x0 under the boundary condition."""
    return "timestep_scaling" in scheduler.config


def _as_the_scheduler_limits(scheduler, x0):
    """The scheduler's own treatment of its x0 prediction: dynamic thresholding (``thresholding``, Imagen's) or
    clipping to ``clip_sample_range`` (``clip_sample``), as DDIM, DDPM and the DPM-Solvers apply them in ``step``;
    schedulers without these options (Euler, Heun, ...) have neither in their config."""
    config = scheduler.config
    if config.get("thresholding", False) and hasattr(scheduler, "_threshold_sample"):
        return scheduler._threshold_sample(x0)
    if config.get("clip_sample", False):
        limit = float(config.get("clip_sample_range", 1.0))
        return ops_for(x0).clip(x0, -limit, limit)
    return x0


def renoise(scheduler, x0, noise, index: int, timestep: float):
    """Forward-diffuse ``x0`` to the noise level of plan step ``index`` with the given fresh ``noise``."""
    if is_flow_matching(scheduler):
        sigma = _flow_sigma(scheduler, index)
        return (1.0 - sigma) * x0 + sigma * noise
    if _sigma_space(scheduler):
        return x0 + float(scheduler.sigmas[index]) * noise
    alpha, sigma = _vp_coefficients(scheduler, index, timestep)
    return alpha * x0 + sigma * noise


def noise_level(scheduler, index: int, timestep: float) -> float:
    """The standard deviation of the noise in a sample at plan step ``index`` (in the scheduler's sample space)."""
    if is_flow_matching(scheduler):
        return _flow_sigma(scheduler, index)
    if _sigma_space(scheduler):
        return float(scheduler.sigmas[index])
    return _vp_coefficients(scheduler, index, timestep)[1]


def downsample_latent(x, latent_hw: tuple[int, int]):
    """A clean latent (an encoded image, an inpainting mask) at a lower stage size: area averaging."""
    if tuple(x.shape[-2:]) == tuple(latent_hw):
        return x
    return ops_for(x).resize(x, tuple(latent_hw), "area")


def downsample_noisy(sample, latent_hw: tuple[int, int], sigma: float, fresh_noise):
    """An already-noised sample (x = a x0 + sigma eps, e.g. the SDXL base's output handed to its refiner) at a
    lower stage size. Area averaging keeps the signal but divides the noise's variance by the area ratio r;
    ``sigma * sqrt(1 - 1/r) * fresh_noise`` (unit-variance noise at the low size) puts the missing variance back, so
    the result is a sample of the same noise level (exactly for integer factors, on average otherwise)."""
    h, w = sample.shape[-2:]
    if (h, w) == tuple(latent_hw):
        return sample
    ratio = (h * w) / (latent_hw[0] * latent_hw[1])
    return downsample_latent(sample, latent_hw) + (sigma * max(0.0, 1.0 - 1.0 / ratio) ** 0.5) * fresh_noise


def upsample(x0, latent_hw: tuple[int, int]):
    """Bilinear upsampling of the predicted clean latent (the paper's choice; ``align_corners=False``)."""
    return ops_for(x0).resize(x0, tuple(latent_hw), "bilinear")


def downsample_noise(noise, latent_hw: tuple[int, int]):
    """Initial noise for a plan that starts at a lower resolution, derived from the full-resolution noise
    of the same seed (so a mixed-resolution image shares its baseline's low frequencies and stays paired with it).

    Area averaging over k x k cells divides the standard deviation of i.i.d. noise by k; multiplying by
    sqrt(area ratio) restores unit variance (exactly for integer factors, on average otherwise)."""
    h, w = noise.shape[-2:]
    if (h, w) == tuple(latent_hw):
        return noise
    return downsample_latent(noise, latent_hw) * ((h * w) / (latent_hw[0] * latent_hw[1])) ** 0.5
