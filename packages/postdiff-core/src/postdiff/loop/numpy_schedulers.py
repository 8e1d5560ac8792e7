"""The schedulers bundles name, in numpy: a bundle runs without PyTorch or diffusers.

Each class follows its diffusers namesake (diffusers 0.42) step for step, with the same configuration keys, the
same float32 arithmetic, the same timesteps and sigmas, and the same ``step_index``/``set_begin_index`` behaviour
that the resolution switch relies on; ``tests/test_numpy_schedulers.py`` holds each to 1e-5 of diffusers over
20-step runs, restarts included. Options a class does not implement are refused by name when it is built, never
ignored. Noise (ancestral steps, LCM) comes from ``postdiff.loop.torch_random`` generators, so that a seed draws what
PyTorch draws.

    DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler (DPM-Solver++
    2M and 2M SDE, Karras sigmas too), HeunDiscreteScheduler, LCMScheduler, LMSDiscreteScheduler, PNDMScheduler (PLMS),
    UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler (rectified flow: SD3's and FLUX's),
    FlowMatchHeunDiscreteScheduler; DPM-Solver++ on flow sigmas too (SANA's ``flow-dpmpp-2m``)

Why our own and not a library's: diffusers' schedulers are the reference but need PyTorch; the runtime this module
serves is for machines without it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from postdiff.errors import ModelError, brief
from postdiff.loop.torch_random import randn
from postdiff.plan.schedulers import resolve, warn_if_sigmas_explode

F32 = np.float32


def consistency_scalings(scheduler, timestep: float) -> tuple[float, float]:
    """(c_skip, c_out) of LCM's boundary condition at ``timestep``: the consistency function is c_skip x + c_out x0,
    which ``LCMScheduler.step`` returns as ``denoised`` (sigma_data 0.5, the timestep scaled by ``timestep_scaling``)."""
    scaled = float(timestep) * float(scheduler.config.get("timestep_scaling", 10.0))
    return 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5


class SchedulerConfig(dict):
    """A scheduler's configuration: a dict whose keys also read as attributes, like diffusers' ``FrozenDict``."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _betas(config) -> np.ndarray:
    n = int(config.num_train_timesteps)
    if config.get("trained_betas") is not None:
        return np.asarray(config.trained_betas, dtype=F32)
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64).astype(F32)
    if config.beta_schedule == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64).astype(F32) ** 2
    if config.beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=F32)
    raise ModelError(f"beta_schedule {brief(config.beta_schedule)} is not implemented; use linear, scaled_linear or squaredcos_cap_v2")


def _spaced_timesteps(config, n: int, dtype) -> np.ndarray:
    """The inference timesteps of the Euler-family schedulers for ``timestep_spacing``."""
    train = int(config.num_train_timesteps)
    spacing = config.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, train - 1, n, dtype=np.float32)[::-1].copy().astype(dtype)
    if spacing == "leading":
        t = (np.arange(0, n) * (train // n)).round()[::-1].copy().astype(dtype)
        return t + dtype(config.steps_offset)
    if spacing == "trailing":
        return np.arange(train, 0, -train / n).round().copy().astype(dtype) - dtype(1)
    raise ModelError(f"timestep_spacing {brief(spacing)} is not supported; use linspace, leading or trailing")


def _sigma_space_x0(prediction_type: str, sample, model_output, sigma):
    """The clean sample a sigma-space scheduler (Euler, Heun, LMS) predicts from the model output at ``sigma``."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output  # "sample"


def _multistep_timesteps(config, n: int) -> np.ndarray:
    """The inference timesteps of the multistep solvers (DPM-Solver, UniPC) for ``timestep_spacing``: n + 1 points,
    the last dropped, as diffusers spaces them."""
    train = int(config.num_train_timesteps)
    spacing = config.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, train - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n + 1) * (train // (n + 1))).round()[::-1][:-1].copy().astype(np.int64) + int(config.steps_offset)
    if spacing == "trailing":
        return np.arange(train, 0, -train / n).round().copy().astype(np.int64) - 1
    raise ModelError(f"timestep_spacing {brief(spacing)} is not supported; use linspace, leading or trailing")


def _sigma_to_t(sigma, log_sigmas: np.ndarray):
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(np.shape(sigma))


def _karras(config, in_sigmas: np.ndarray, n: int) -> np.ndarray:
    sigma_min = config.get("sigma_min") if config.get("sigma_min") is not None else float(in_sigmas[-1])
    sigma_max = config.get("sigma_max") if config.get("sigma_max") is not None else float(in_sigmas[0])
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


class NumpyScheduler:
    """What the schedulers share: configuration, betas and ``alphas_cumprod``, and the step index."""

    name = "base"
    order = 1
    uses_betas = True  # False: a flow-matching scheduler, whose noise levels are sigmas, not a beta schedule
    defaults: dict[str, Any] = {}
    # configuration values this implementation does not follow, refused when the scheduler is built: {key: allowed}
    unsupported: dict[str, Any] = {
        "rescale_betas_zero_snr": False,
        "thresholding": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }

    def __init__(self, **config) -> None:
        # diffusers' from_config gives a key the new class's default when the source config only held its own
        # class's default for it (``_use_default_values``): a DDIM config's "leading" spacing is not Euler's
        defaulted = set(config.get("_use_default_values") or ())
        given = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}
        self.config = SchedulerConfig({**self.defaults, **given})
        for key, allowed in self.unsupported.items():
            value = self.config.get(key, allowed)
            if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                raise ModelError(
                    f"{self.name}: {key}={value!r} is not implemented by PostDiff's numpy schedulers; run this bundle with "
                    f"the PyTorch-backed runtime (install postdiff-core[torch]) or export it with another scheduler"
                )
        if self.uses_betas:
            self.betas = _betas(self.config)
            self.alphas = F32(1.0) - self.betas
            # torch.cumprod accumulates float32 in double on CPU; so does this, to the same float32 values
            self.alphas_cumprod = np.cumprod(self.alphas.astype(np.float64)).astype(F32)
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def from_config(cls, config: dict, **overrides) -> NumpyScheduler:
        return cls(**{**dict(config), **overrides})

    # -- the step index, as diffusers keeps it -------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep) -> int:
        indices = np.nonzero(self.timesteps == timestep)[0]
        if len(indices) == 0:
            raise ModelError(f"{self.name}: timestep {timestep} is not one of this run's timesteps")
        return int(indices[1 if len(indices) > 1 else 0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _reset(self) -> None:
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def _check_prediction(self, kinds=("epsilon", "sample", "v_prediction")) -> str:
        kind = self.config.prediction_type
        if kind not in kinds:
            raise ModelError(f"{self.name}: prediction_type {brief(kind)} is not supported; use one of {', '.join(kinds)}")
        return kind


class DDIMScheduler(NumpyScheduler):
    name = "DDIMScheduler"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None, clip_sample=True,
        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False, clip_sample_range=1.0,
        timestep_spacing="leading", rescale_betas_zero_snr=False,
    )  # fmt: skip
    init_noise_sigma = 1.0

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.final_alpha_cumprod = F32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self._check_prediction()

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n, train = int(num_inference_steps), int(self.config.num_train_timesteps)
        if n > train:
            raise ModelError(f"{n} steps is more than the {train} timesteps {self.name} was trained with")
        self.num_inference_steps = n
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            t = np.linspace(0, train - 1, n).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n) * (train // n)).round()[::-1].copy().astype(np.int64) + int(self.config.steps_offset)
        elif spacing == "trailing":
            t = np.round(np.arange(train, 0, -train / n)).astype(np.int64) - 1
        else:
            raise ModelError(f"timestep_spacing {brief(spacing)} is not supported; use linspace, leading or trailing")
        self.timesteps = t

    def _variance(self, t: int, prev: int):
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        return ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)

    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None, return_dict: bool = False):
        if self.num_inference_steps is None:
            raise ModelError("set_timesteps must be called before step")
        t = int(timestep)
        prev = t - int(self.config.num_train_timesteps) // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - b_t ** (0.5) * model_output) / a_t ** (0.5)
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - a_t ** (0.5) * x0) / b_t ** (0.5)
        else:
            x0 = (a_t**0.5) * sample - (b_t**0.5) * model_output
            eps = (a_t**0.5) * model_output + (b_t**0.5) * sample
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            x0 = np.clip(x0, -limit, limit)
        std = eta * self._variance(t, prev) ** (0.5)
        prev_sample = a_prev ** (0.5) * x0 + (1 - a_prev - std**2) ** (0.5) * eps
        if eta > 0:
            prev_sample = prev_sample + std * randn(model_output.shape, generator)
        return prev_sample, x0


class _SigmaScheduler(NumpyScheduler):
    """Euler, Euler ancestral and Heun: samples in sigma space, the UNet input scaled by 1/sqrt(sigma^2 + 1)."""

    predictions = ("epsilon", "sample", "v_prediction")

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self._check_prediction(self.predictions)
        self.sigmas = np.concatenate([self._train_sigmas()[::-1], [0.0]]).astype(F32)

    def _inference_sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) of an ``n``-step run: spaced timesteps, sigmas interpolated at them, or Karras sigmas
        and the timesteps they fall at."""
        timesteps = _spaced_timesteps(self.config, n, np.float32)
        sigmas = self._train_sigmas()
        log_sigmas = np.log(sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if self.config.get("use_karras_sigmas"):
            sigmas = _karras(self.config, sigmas, n)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        return timesteps, sigmas

    @property
    def init_noise_sigma(self):
        top = self.sigmas.max()
        return top if self.config.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def _train_sigmas(self) -> np.ndarray:
        return np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)

    def scale_model_input(self, sample, timestep=None):
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / (sigma**2 + 1) ** 0.5


class EulerDiscreteScheduler(_SigmaScheduler):
    name = "EulerDiscreteScheduler"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
        steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero",
    )  # fmt: skip
    unsupported = {**NumpyScheduler.unsupported, "timestep_type": "discrete", "interpolation_type": "linear"}

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self.num_inference_steps = int(num_inference_steps)
        timesteps, sigmas = self._inference_sigmas(n)
        last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5 if self.config.final_sigmas_type == "sigma_min" else 0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = timesteps.astype(np.float32)
        self._reset()

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = False):
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.astype(F32, copy=False)
        sigma = self.sigmas[self._step_index]
        x0 = _sigma_space_x0(self.config.prediction_type, sample, model_output, sigma)
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (self.sigmas[self._step_index + 1] - sigma)
        self._step_index += 1
        return prev_sample.astype(model_output.dtype, copy=False), x0


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    name = "EulerAncestralDiscreteScheduler"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    )  # fmt: skip

    predictions = ("epsilon", "v_prediction")

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self.num_inference_steps = int(num_inference_steps)
        timesteps, sigmas = self._inference_sigmas(n)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = timesteps
        self._reset()

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = False):
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        sample = sample.astype(F32, copy=False)
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        sigma_to = self.sigmas[self._step_index + 1]
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev_sample = sample + (sample - x0) / sigma * (sigma_down - sigma)
        prev_sample = prev_sample + randn(model_output.shape, generator) * sigma_up
        self._step_index += 1
        return prev_sample.astype(model_output.dtype, copy=False), x0


class HeunDiscreteScheduler(_SigmaScheduler):
    name = "HeunDiscreteScheduler"
    order = 2
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0,
    )  # fmt: skip

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.dt = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self.num_inference_steps = int(num_inference_steps)
        timesteps, sigmas = self._inference_sigmas(n)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        timesteps = np.asarray(timesteps, dtype=np.float32)
        self.timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        self.prev_derivative = self.dt = self.sample = None
        self._reset()

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def step(self, model_output, timestep, sample, return_dict: bool = False):
        if self._step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        i = self._step_index
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        sigma_input = sigma if first else sigma_next
        x0 = _sigma_space_x0(self.config.prediction_type, sample, model_output, sigma_input)
        if self.config.clip_sample:
            x0 = np.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            derivative = (sample - x0) / sigma
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            derivative = (self.prev_derivative + (sample - x0) / sigma_next) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None
        self._step_index += 1
        return sample + derivative * dt, x0


class DPMSolverMultistepScheduler(NumpyScheduler):
    """DPM-Solver++ of order 1 or 2 (the "2M" sampler), with Karras sigmas as an option; ``sde-dpmsolver++`` (the
    "2M SDE" sampler) draws noise on every step, as diffusers does, from the step's generator."""

    name = "DPMSolverMultistepScheduler"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None, solver_order=2,
        prediction_type="epsilon", thresholding=False, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, flow_shift=1.0,
    )  # fmt: skip
    unsupported = {
        **NumpyScheduler.unsupported,
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
        "solver_order": (1, 2),
        "use_lu_lambdas": False,
        "variance_type": None,
        "lambda_min_clipped": -float("inf"),
        "use_dynamic_shifting": False,
    }
    init_noise_sigma = 1.0

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self._check_prediction(("epsilon", "sample", "v_prediction", "flow_prediction"))
        self.order = int(self.config.solver_order)
        self.sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = int(num_inference_steps)
        t = _multistep_timesteps(self.config, n)
        sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        log_sigmas = np.log(sigmas)
        if self.config.use_karras_sigmas:
            sigmas = _karras(self.config, np.flip(sigmas).copy(), n)
            t = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if self.config.beta_schedule != "squaredcos_cap_v2":
                t = t.round()
        elif self.config.use_flow_sigmas:  # SANA's: a shifted line from 1 to 1/N, the timestep N sigma (truncated)
            train, shift = int(self.config.num_train_timesteps), self.config.flow_shift
            flow = 1.0 - np.linspace(1, 1 / train, n + 1)
            sigmas = np.flip(shift * flow / (1 + (shift - 1) * flow))[:-1].copy()
            t = sigmas * train
        else:
            sigmas = np.interp(t, np.arange(0, len(sigmas)), sigmas)
        last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5 if self.config.final_sigmas_type == "sigma_min" else 0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = np.asarray(t).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * self.order
        self.lower_order_nums = 0
        self._reset()

    def _sigma_to_alpha_sigma_t(self, sigma):
        if self.config.use_flow_sigmas:  # x = (1 - sigma) x0 + sigma noise
            return 1 - sigma, sigma
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        return alpha_t, sigma * alpha_t

    def _lambda(self, i: int):
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[i])
        with np.errstate(divide="ignore"):  # the final sigma is 0: lambda is +inf and the step returns x0, as in torch
            return alpha, sigma, np.log(alpha) - np.log(sigma)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = False):
        if self.num_inference_steps is None:
            raise ModelError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i, last = self._step_index, len(self.timesteps)
        lower_final = i == last - 1 and (
            self.config.euler_at_final or (self.config.lower_order_final and last < 15) or self.config.final_sigmas_type == "zero"
        )
        # the data prediction (DPM-Solver++ works on x0)
        kind = self.config.prediction_type
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(i)
        if kind == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        elif kind == "flow_prediction":  # the velocity noise - x0
            x0 = sample - sigma_s0 * model_output
        elif kind == "sample":
            x0 = model_output
        else:
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        self.model_outputs = [*self.model_outputs[1:], x0]
        sample = sample.astype(F32, copy=False)
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        noise = randn(model_output.shape, generator) if sde else None  # drawn on every step, the last included
        alpha_t, sigma_t, lambda_t = self._lambda(i + 1)
        h = lambda_t - lambda_s0
        first = self.order == 1 or self.lower_order_nums < 1 or lower_final
        if first:
            m0, d1 = x0, None
        else:
            _, _, lambda_s1 = self._lambda(i - 1)
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = 1.0 / r0 * (m0 - m1)
        if sde:
            with np.errstate(invalid="ignore"):  # the last step: h is +inf, its terms 0 or 1 as in torch
                decay, grow = sigma_t / sigma_s0 * np.exp(-h), alpha_t * (1 - np.exp(-2.0 * h))
            prev_sample = decay * sample + grow * m0 + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
            if d1 is not None:
                if self.config.solver_type == "midpoint":
                    prev_sample = prev_sample + 0.5 * grow * d1
                else:
                    prev_sample = prev_sample + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
        elif first:
            prev_sample = sigma_t / sigma_s0 * sample - alpha_t * (np.exp(-h) - 1.0) * x0
        elif self.config.solver_type == "midpoint":
            prev_sample = sigma_t / sigma_s0 * sample - alpha_t * (np.exp(-h) - 1.0) * m0 - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
        else:
            prev_sample = sigma_t / sigma_s0 * sample - alpha_t * (np.exp(-h) - 1.0) * m0 + alpha_t * ((np.exp(-h) - 1.0) / h + 1.0) * d1
        if self.lower_order_nums < self.order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample.astype(model_output.dtype, copy=False), x0


class LCMScheduler(NumpyScheduler):
    name = "LCMScheduler"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", trained_betas=None,
        original_inference_steps=50, clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
        prediction_type="epsilon", thresholding=False, timestep_spacing="leading", timestep_scaling=10.0,
        rescale_betas_zero_snr=False,
    )  # fmt: skip
    init_noise_sigma = 1.0

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self._check_prediction()
        self.final_alpha_cumprod = F32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n, train = int(num_inference_steps), int(self.config.num_train_timesteps)
        original = int(self.config.original_inference_steps)
        if original > train or n > original:
            raise ModelError(f"{self.name}: {n} steps needs at most {original} steps (original_inference_steps) of {train}")
        origin = (np.asarray(list(range(1, original + 1))) * (train // original) - 1)[::-1].copy()
        indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = origin[indices].astype(np.int64)
        self.num_inference_steps = n
        self._reset()

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = False):
        if self.num_inference_steps is None:
            raise ModelError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        t = int(timestep)
        nxt = self._step_index + 1
        prev_t = int(self.timesteps[nxt]) if nxt < len(self.timesteps) else t
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        c_skip, c_out = consistency_scalings(self, t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - np.sqrt(b_t) * model_output) / np.sqrt(a_t)
        elif kind == "sample":
            x0 = model_output
        else:
            x0 = np.sqrt(a_t) * sample - np.sqrt(b_t) * model_output
        if self.config.clip_sample:
            x0 = np.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        denoised = c_out * x0 + c_skip * sample
        if self._step_index != self.num_inference_steps - 1:
            prev_sample = np.sqrt(a_prev) * denoised + np.sqrt(1 - a_prev) * randn(model_output.shape, generator)
        else:
            prev_sample = denoised
        self._step_index += 1
        return prev_sample.astype(np.float32, copy=False), denoised


class LMSDiscreteScheduler(_SigmaScheduler):
    """Linear multistep (order 4) in sigma space. diffusers integrates each Lagrange coefficient with
    ``scipy.integrate.quad``; the integrand is a polynomial of degree under 4, so Gauss-Legendre quadrature with 4
    points is exact here and needs no scipy."""

    name = "LMSDiscreteScheduler"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, prediction_type="epsilon",
        timestep_spacing="linspace", steps_offset=0,
    )  # fmt: skip
    _nodes, _weights = np.polynomial.legendre.leggauss(4)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self.num_inference_steps = int(num_inference_steps)
        timesteps, sigmas = self._inference_sigmas(n)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = np.asarray(timesteps, dtype=np.float32)
        self.derivatives: list = []
        self._reset()

    def _coefficient(self, order: int, t: int, current: int) -> float:
        a, b = float(self.sigmas[t]), float(self.sigmas[t + 1])
        tau = (b - a) / 2 * self._nodes + (a + b) / 2
        prod = np.ones_like(tau)
        for k in range(order):
            if k != current:
                prod *= (tau - float(self.sigmas[t - k])) / (float(self.sigmas[t - current]) - float(self.sigmas[t - k]))
        return float((b - a) / 2 * np.dot(self._weights, prod))

    def step(self, model_output, timestep, sample, order: int = 4, return_dict: bool = False):
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        x0 = _sigma_space_x0(self.config.prediction_type, sample, model_output, sigma)
        self.derivatives.append((sample - x0) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        order = min(self._step_index + 1, order)
        coeffs = [self._coefficient(order, self._step_index, k) for k in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index += 1
        return prev_sample.astype(model_output.dtype, copy=False), x0


class PNDMScheduler(NumpyScheduler):
    """PLMS (``skip_prk_steps``, what Stable Diffusion's pipelines use): its first step is evaluated twice (the
    schedule repeats that timestep), then Adams-Bashforth steps of growing order on the kept model outputs. It keeps
    no step index; a restart (``set_timesteps``) starts over with the double first step."""

    name = "PNDMScheduler"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0,
    )  # fmt: skip
    unsupported = {**NumpyScheduler.unsupported, "skip_prk_steps": True}
    init_noise_sigma = 1.0

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self._check_prediction(("epsilon", "v_prediction"))
        self.final_alpha_cumprod = F32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n, train = int(num_inference_steps), int(self.config.num_train_timesteps)
        self.num_inference_steps = n
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            t = np.linspace(0, train - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n) * (train // n)).round() + int(self.config.steps_offset)
        elif spacing == "trailing":
            t = np.round(np.arange(train, 0, -train / n))[::-1].astype(np.int64) - 1
        else:
            raise ModelError(f"timestep_spacing {brief(spacing)} is not supported; use linspace, leading or trailing")
        self.timesteps = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].copy().astype(np.int64)
        self.ets: list = []
        self.counter = 0
        self.cur_sample = None

    def step(self, model_output, timestep, sample, return_dict: bool = False):
        if self.num_inference_steps is None:
            raise ModelError("set_timesteps must be called before step")
        ratio = int(self.config.num_train_timesteps) // self.num_inference_steps
        timestep = int(timestep)
        prev_timestep = timestep - ratio
        if self.counter != 1:
            self.ets = [*self.ets[-3:], model_output]
        else:
            prev_timestep, timestep = timestep, timestep + ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        a_t = self.alphas_cumprod[timestep]
        a_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config.prediction_type == "v_prediction":
            model_output = (a_t**0.5) * model_output + (b_t**0.5) * sample
        denom = a_t * b_prev ** (0.5) + (a_t * b_t * a_prev) ** (0.5)
        prev_sample = (a_prev / a_t) ** (0.5) * sample - (a_prev - a_t) * model_output / denom
        self.counter += 1
        return (prev_sample,)


class UniPCMultistepScheduler(NumpyScheduler):
    """UniPC (predictor-corrector, ``bh1``/``bh2``, data prediction), as diffusers implements it."""

    name = "UniPCMultistepScheduler"
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None, solver_order=2,
        prediction_type="epsilon", thresholding=False, predict_x0=True, solver_type="bh2", lower_order_final=True,
        disable_corrector=[], solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_flow_sigmas=False, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, flow_shift=1.0,
    )  # fmt: skip
    unsupported = {
        **NumpyScheduler.unsupported,
        "predict_x0": True,
        "solver_p": None,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "solver_type": ("bh1", "bh2"),
    }
    init_noise_sigma = 1.0

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self._check_prediction()
        self.disable_corrector = list(self.config.disable_corrector or [])

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = int(num_inference_steps)
        t = _multistep_timesteps(self.config, n)
        train_sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        if self.config.use_karras_sigmas:
            log_sigmas = np.log(train_sigmas)
            sigmas = _karras(self.config, np.flip(train_sigmas).copy(), n)
            t = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas]).round()
            last = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0
        else:
            sigmas = np.interp(t, np.arange(0, len(train_sigmas)), train_sigmas)
            last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5 if self.config.final_sigmas_type == "sigma_min" else 0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = np.asarray(t).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        order = int(self.config.solver_order)
        self.model_outputs: list = [None] * order
        self.timestep_list: list = [None] * order
        self.lower_order_nums = 0
        self.last_sample = None
        self.this_order = 1
        self._reset()

    def _alpha_sigma(self, sigma):
        alpha_t = F32(1) / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def _lam(self, i: int):
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        with np.errstate(divide="ignore"):  # the final sigma is 0: lambda is +inf, as in torch
            return alpha, sigma, np.log(alpha) - np.log(sigma)

    def _terms(self, h, rks):
        """(R, b, h_phi_1, B_h) of UniPC's linear system, in float32 as torch computes them."""
        hh = -h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        b_h = hh if self.config.solver_type == "bh1" else np.expm1(hh)
        rows, b = [], []
        for i in range(1, len(rks) + 1):
            rows.append(np.power(rks, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return np.stack(rows).astype(F32), np.asarray(b, dtype=F32), h_phi_1, b_h

    def _differences(self, i0: int, base: int, order: int, m0, h, lambda_s0):
        rks, d1s = [], []
        for i in range(1, order):
            _, _, lambda_si = self._lam(base - i)
            rk = (lambda_si - lambda_s0) / h
            rks.append(rk)
            d1s.append((self.model_outputs[-(i + 1)] - m0) / rk)
        rks.append(F32(1.0))
        return np.asarray(rks, dtype=F32), d1s

    def _predict(self, sample, order: int):
        i = self._step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, lambda_t = self._lam(i + 1)
        _, sigma_s0, lambda_s0 = self._lam(i)
        h = lambda_t - lambda_s0
        rks, d1s = self._differences(i, i, order, m0, h, lambda_s0)
        rmat, b, h_phi_1, b_h = self._terms(h, rks)
        x_t = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0
        if d1s:
            rhos = np.ones(1, F32) * 0.5 if order == 2 else np.linalg.solve(rmat[:-1, :-1], b[:-1]).astype(F32)
            x_t = x_t - alpha_t * b_h * sum(r * d for r, d in zip(rhos, d1s))
        return x_t.astype(sample.dtype, copy=False)

    def _correct(self, model_t, last_sample, this_sample, order: int):
        i = self._step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, lambda_t = self._lam(i)
        _, sigma_s0, lambda_s0 = self._lam(i - 1)
        h = lambda_t - lambda_s0
        rks, d1s = self._differences(i, i - 1, order, m0, h, lambda_s0)
        rmat, b, h_phi_1, b_h = self._terms(h, rks)
        rhos = np.ones(1, F32) * 0.5 if order == 1 else np.linalg.solve(rmat, b).astype(F32)
        x_t = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m0
        corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
        x_t = x_t - alpha_t * b_h * (corr + rhos[-1] * (model_t - m0))
        return x_t.astype(this_sample.dtype, copy=False)

    def step(self, model_output, timestep, sample, return_dict: bool = False):
        if self.num_inference_steps is None:
            raise ModelError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        alpha_t, sigma_t, _ = self._lam(i)
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - sigma_t * model_output) / alpha_t
        elif kind == "sample":
            x0 = model_output
        else:
            x0 = alpha_t * sample - sigma_t * model_output
        if use_corrector:
            sample = self._correct(x0, self.last_sample, sample, self.this_order)
        order = int(self.config.solver_order)
        self.model_outputs = [*self.model_outputs[1:], x0]
        self.timestep_list = [*self.timestep_list[1:], timestep]
        this_order = min(order, len(self.timesteps) - i) if self.config.lower_order_final else order
        self.this_order = min(this_order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev_sample = self._predict(sample, self.this_order)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index += 1
        return (prev_sample,)


class FlowMatchEulerDiscreteScheduler(NumpyScheduler):
    """The rectified-flow Euler sampler of SD3 and FLUX: x_next = x + (sigma_next - sigma) v, sigmas shifted by ``shift``
    (or, with ``use_dynamic_shifting``, by the ``mu`` the pipeline computes from the image's token count)."""

    name = "FlowMatchEulerDiscreteScheduler"
    uses_betas = False
    defaults = dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False,
    )  # fmt: skip
    unsupported = {
        **NumpyScheduler.unsupported,
        "use_karras_sigmas": False,
        "invert_sigmas": False,
        "shift_terminal": None,
        "stochastic_sampling": False,
    }

    def __init__(self, **config) -> None:
        super().__init__(**config)
        train = int(self.config.num_train_timesteps)
        # the training sigmas as diffusers builds them, in float32: their ends bound every inference schedule
        sigmas = np.linspace(1, train, train, dtype=F32)[::-1] / F32(train)
        if not self.config.use_dynamic_shifting:
            sigmas = self._shifted(sigmas.astype(F32))
        self.sigma_min, self.sigma_max = float(sigmas[-1]), float(sigmas[0])

    def _shifted(self, sigmas):
        shift = self.config.shift
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def set_timesteps(self, num_inference_steps: int, device=None, mu: float | None = None) -> None:
        if self.config.use_dynamic_shifting and mu is None:
            raise ModelError(f"{self.name}: use_dynamic_shifting needs mu (the shift for the image's token count)")
        n = self.num_inference_steps = int(num_inference_steps)
        train = int(self.config.num_train_timesteps)
        sigmas = np.linspace(self.sigma_max * train, self.sigma_min * train, n) / train
        if self.config.use_dynamic_shifting:
            if self.config.time_shift_type == "exponential":
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
            else:
                sigmas = mu / (mu + (1 / sigmas - 1))
        else:
            sigmas = self._shifted(sigmas)
        sigmas = sigmas.astype(F32)
        self.timesteps = sigmas * F32(train)
        self.sigmas = np.concatenate([sigmas, [F32(0.0)]]).astype(F32)
        self._reset()

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = False):
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.astype(F32, copy=False)
        dt = self.sigmas[self._step_index + 1] - self.sigmas[self._step_index]
        prev_sample = sample + dt * model_output
        self._step_index += 1
        return (prev_sample.astype(model_output.dtype, copy=False),)


class FlowMatchHeunDiscreteScheduler(FlowMatchEulerDiscreteScheduler):
    """Heun's method on the rectified flow: two calls a step (every sigma after the first listed twice), the second
    averaging the two velocities; deterministic (``s_churn`` 0, as the pipelines call it)."""

    name = "FlowMatchHeunDiscreteScheduler"
    order = 2
    defaults = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    unsupported = dict(NumpyScheduler.unsupported)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        super().set_timesteps(num_inference_steps)
        t, sigmas = self.timesteps, self.sigmas
        self.timesteps = np.concatenate([t[:1], np.repeat(t[1:], 2)])
        self.sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        self.prev_derivative = self.dt = self.sample = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = False):
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.astype(F32, copy=False)
        i = self._step_index
        if self.state_in_first_order:
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            derivative = (sample - (sample - model_output * sigma)) / sigma
            self.prev_derivative, self.dt, self.sample = derivative, sigma_next - sigma, sample
            dt = self.dt
        else:
            sigma_next = self.sigmas[i]
            derivative = 0.5 * (self.prev_derivative + (sample - (sample - model_output * sigma_next)) / sigma_next)
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None
        self._step_index += 1
        return ((sample + derivative * dt).astype(model_output.dtype, copy=False),)


SCHEDULERS: dict[str, type[NumpyScheduler]] = {
    cls.name: cls
    for cls in (
        DDIMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
        HeunDiscreteScheduler,
        LCMScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
    )
}


def numpy_scheduler(name: str, config: dict) -> NumpyScheduler:
    """The numpy scheduler ``name`` (a short name of ``postdiff.plan.schedulers`` or a diffusers class name), from a
    diffusers scheduler configuration with the name's settings over it."""
    class_name, settings = resolve(name)
    cls = SCHEDULERS.get(class_name)
    if cls is None:
        raise ModelError(
            f"scheduler {brief(name)} has no numpy implementation; the runtime without PyTorch has {', '.join(SCHEDULERS)}. "
            f"Export with one of them, or run with the PyTorch-backed runtime (install postdiff-core[torch])"
        )
    scheduler = cls.from_config({**dict(config), **settings})
    warn_if_sigmas_explode(scheduler, str(name))
    return scheduler
