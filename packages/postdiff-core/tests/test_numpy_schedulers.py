"""The numpy schedulers of the runtime without PyTorch against their diffusers namesakes: every step of 20-step runs
within 1e-5, including a restart at a plan index (``set_timesteps`` + ``set_begin_index``, the resolution switch)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from postdiff.errors import ModelError
from postdiff.loop.numpy_schedulers import SCHEDULERS, numpy_scheduler
from postdiff.loop.resolution import init_noise_sigma, scale_model_input
from postdiff.loop.torch_random import TorchGenerator
from postdiff.plan.schedulers import NAMES, name_of, resolve

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False, set_alpha_to_one=False)
CASES = [
    ("DDIMScheduler", SD),
    ("DDIMScheduler", dict(SD, prediction_type="v_prediction", timestep_spacing="trailing")),
    ("DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", clip_sample=True)),
    ("EulerDiscreteScheduler", SD),
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction")),
    ("EulerDiscreteScheduler", dict(SD, timestep_spacing="leading")),
    ("EulerAncestralDiscreteScheduler", SD),
    ("EulerAncestralDiscreteScheduler", dict(SD, timestep_spacing="trailing")),
    ("DPMSolverMultistepScheduler", SD),
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(SD, prediction_type="v_prediction", solver_type="heun", timestep_spacing="trailing")),
    ("HeunDiscreteScheduler", SD),
    ("HeunDiscreteScheduler", dict(SD, use_karras_sigmas=True)),
    ("LCMScheduler", dict(SD, timestep_spacing="leading")),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),  # DPM++ 2M SDE Karras
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_type="heun")),
    ("UniPCMultistepScheduler", SD),
    ("UniPCMultistepScheduler", dict(SD, use_karras_sigmas=True)),
    # bh1 ends in NaN in diffusers when the last sigma is 0 (-inf * 0 in its predictor): tested with sigma_min
    ("UniPCMultistepScheduler", dict(SD, solver_type="bh1", final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", dict(SD, solver_order=3, prediction_type="v_prediction")),
    ("LMSDiscreteScheduler", SD),
    ("LMSDiscreteScheduler", dict(SD, use_karras_sigmas=True)),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True)),
    ("DDIMScheduler", dict(SD, beta_schedule="squaredcos_cap_v2")),
    ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),  # SD3's
    ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 1.0}),  # reference-flow's
    ("FlowMatchHeunDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
    # SANA's: DPM-Solver++ 2M on flow sigmas, shift 3
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}),
]


def fake_unet(x: np.ndarray, t: float) -> np.ndarray:
    """A smooth function of the sample and the timestep, standing in for a UNet (the same for both sides)."""
    return np.tanh(0.7 * x + np.float32(t / 1000.0)).astype(np.float32)


def run(scheduler, steps: int, restart: int | None, generator, to_array, from_array):
    scheduler.set_timesteps(steps)
    n = len(scheduler.timesteps)
    x = to_array(np.linspace(-2, 2, 2 * 4 * 6 * 6, dtype=np.float32).reshape(2, 4, 6, 6)) * init_noise_sigma(scheduler)
    out = []
    for i in range(n):
        if restart is not None and i == restart:
            scheduler.set_timesteps(steps)
            if hasattr(scheduler, "set_begin_index"):  # as PlanRun restarts (DDIM steps by timestep and has none)
                scheduler.set_begin_index(i)
        t = scheduler.timesteps[i]
        model_in = scale_model_input(scheduler, x, t)
        eps = to_array(fake_unet(from_array(model_in), float(t)))
        kwargs = {"generator": generator} if "generator" in scheduler.step.__code__.co_varnames else {}
        x = scheduler.step(eps, t, x, **kwargs, return_dict=False)[0]
        out.append(from_array(x).copy())
    return out


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("restart", [None, 7])
def test_numpy_scheduler_matches_diffusers(name, config, restart):
    ref = getattr(diffusers, name).from_config(config)
    ours = numpy_scheduler(name, dict(ref.config))
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    # torch.linspace (the betas) rounds a few float32 values the other way: timesteps derived from sigmas (Karras)
    # agree to about 5e-6 relative, the rest exactly
    np.testing.assert_allclose(ours.timesteps.astype(np.float64), ref.timesteps.numpy().astype(np.float64), rtol=1e-5)
    if hasattr(ref, "sigmas") and hasattr(ours, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5)
    assert init_noise_sigma(ours) == pytest.approx(init_noise_sigma(ref), rel=1e-5)  # the flow schedulers have none
    a = run(ref, 20, restart, torch.Generator().manual_seed(3), torch.from_numpy, lambda x: x.numpy())
    b = run(ours, 20, restart, TorchGenerator(3), lambda x: x, lambda x: x)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        scale = max(1.0, float(np.abs(x).max()))
        assert np.abs(x - y).max() <= 1e-5 * scale, f"{name} step {i}: {np.abs(x - y).max()}"


def test_every_named_scheduler_is_tested():
    assert {name for name, _ in CASES} == set(SCHEDULERS)


def test_unknown_and_unsupported_schedulers_are_refused_by_name():
    with pytest.raises(ModelError, match="DDPMScheduler.*no numpy implementation"):
        numpy_scheduler("DDPMScheduler", {})
    with pytest.raises(ModelError, match="skip_prk_steps"):
        numpy_scheduler("PNDMScheduler", {})  # the Runge-Kutta warm-up Stable Diffusion's pipelines skip
    with pytest.raises(ModelError, match="thresholding"):
        numpy_scheduler("DDIMScheduler", {"thresholding": True})
    with pytest.raises(ModelError, match="algorithm_type"):
        numpy_scheduler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"})


def test_torch_generator_draws_what_torch_draws():
    for seed in (0, 7, 5_000_015, 2**33 + 5):
        g, h = torch.Generator().manual_seed(seed), TorchGenerator(seed)
        for shape in ((1, 4, 8, 8), (3, 5, 7), (2, 1, 13, 9)):
            np.testing.assert_allclose(h.randn(shape), torch.randn(shape, generator=g).numpy(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_config_saved_by_another_scheduler_class_reads_as_diffusers_reads_it(name):
    """A bundle stores its pipeline's scheduler config (DDIM's, say); switching to another class must give the
    keys that config only held as DDIM defaults (``_use_default_values``) the new class's defaults, as diffusers does."""
    saved = dict(diffusers.DDIMScheduler(**SD).config)
    saved["_use_default_values"] = ["timestep_spacing", "clip_sample_range"]
    saved["timestep_spacing"] = "leading"
    if name == "PNDMScheduler":  # PLMS, the only PNDM form the numpy runtime has
        saved["skip_prk_steps"] = True
    ref, ours = getattr(diffusers, name).from_config(saved), numpy_scheduler(name, saved)
    assert ours.config.get("timestep_spacing") == ref.config.get("timestep_spacing")
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    np.testing.assert_allclose(ours.timesteps.astype(np.float64), ref.timesteps.numpy().astype(np.float64), rtol=1e-5)


# -- short names (postdiff.plan.schedulers) ------------------------------------------------------------------------------------
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
COSINE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


@pytest.mark.parametrize("name", [n for n in NAMES if n != "lcm"])
def test_every_short_name_is_one_diffusers_configuration_and_its_numpy_twin_follows_it(name):
    """Each UI name builds its diffusers class with its settings over the model's schedule, reads back as the same name,
    and the numpy scheduler of that name gives diffusers' timesteps and first step (1e-5)."""
    from postdiff.loop.arrays import scheduler_from_config

    ref = scheduler_from_config(name, SD_SCHEDULE)
    assert type(ref).__name__ == NAMES[name][0] and name_of(type(ref).__name__, dict(ref.config)) == name
    mine = numpy_scheduler(name, SD_SCHEDULE)
    ref.set_timesteps(12)
    mine.set_timesteps(12)
    np.testing.assert_allclose(mine.timesteps.astype(np.float64), ref.timesteps.numpy().astype(np.float64), rtol=1e-5)
    a = run(ref, 12, None, torch.Generator().manual_seed(3), torch.from_numpy, lambda x: x.numpy())
    b = run(mine, 12, None, TorchGenerator(3), lambda x: x, lambda x: x)
    for x, y in zip(a, b):
        assert np.abs(x - y).max() <= 1e-5 * max(1.0, float(np.abs(x).max()))


@pytest.mark.parametrize("text", ["DPM++ 2M Karras", "dpmpp_2m_karras", "DPMPP-2M-KARRAS"])
def test_ui_spellings_read_as_the_short_name(text):
    assert resolve(text) == resolve("dpmpp-2m-karras")


@pytest.mark.parametrize("bad", ["", "  ", "euler_b", "dpm3", "ddim;rm -rf", "x" * 500, "ddimscheduler"])
def test_an_unknown_scheduler_name_is_one_line_listing_the_names(bad):
    with pytest.raises(ModelError) as info:
        resolve(bad)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400 and all(n in message for n in ("dpmpp-2m-karras", "euler-a", "unipc"))


def test_sigma_space_samplers_on_a_cosine_schedule_warn_once_in_one_line():
    """Euler, Heun and LMS scale the start latent by sigma_max: 20,291 on squaredcos_cap_v2 (noise out), 14.6 on SD's."""
    import warnings

    from postdiff.errors import PostDiffWarning
    from postdiff.loop.arrays import scheduler_from_config

    for name in ("euler", "heun", "lms", "EulerAncestralDiscreteScheduler"):
        for build in (scheduler_from_config, numpy_scheduler):
            with pytest.warns(PostDiffWarning, match=r"sigma 20,291 .* use ddim"):
                build(name, COSINE)
            with warnings.catch_warnings():
                warnings.simplefilter("error", PostDiffWarning)
                build(name, SD_SCHEDULE)  # about 14.6: quiet
    with warnings.catch_warnings():
        warnings.simplefilter("error", PostDiffWarning)
        scheduler_from_config("ddim", COSINE)  # DDIM starts at unit variance whatever the schedule


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_flow_matching_euler_with_the_shift_of_the_image_size(kind):
    """FLUX's use_dynamic_shifting: the pipeline passes mu (from the image's token count) to set_timesteps; without it
    the numpy scheduler refuses, as diffusers does."""
    config = {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "time_shift_type": kind, "shift": 3.0}
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    ours = numpy_scheduler("flow-euler", dict(ref.config))
    with pytest.raises(ModelError, match="needs mu"):
        ours.set_timesteps(20)
    for mu in (0.5, 1.15):
        ref.set_timesteps(20, mu=mu)
        ours.set_timesteps(20, mu=mu)
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5)
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-5)
