"""postdiff.apply on diffusers SD and SDXL pipelines: equivalence, isolation between calls, clean removal."""

import numpy as np
import pytest
import torch
from core_helpers import SCHEDULERS, gen, make_pipe

import postdiff
from postdiff import ModelError, PlanError, RecipeError

STEPS = 6
POSTDIFF = {"steps": STEPS, "low_res": {"scale": 0.5, "until": 0.5}, "deepcache": {"interval": 2}, "xattn_gate": {"after": 2}}


def run(pipe, prompt="a cat", seed=1, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe(prompt, generator=gen(seed), output_type="np", **kw).images


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_baseline_equals_vanilla_diffusers(kind, scheduler):
    pipe = make_pipe(kind, scheduler)
    vanilla = run(pipe)
    postdiff.apply(pipe, "baseline")
    ours = run(pipe)
    assert np.abs(ours - vanilla).max() <= 1e-6
    # DeepCache with interval 1 and mixed resolution with beta = 1 are the baseline too
    postdiff.apply(pipe, {"steps": STEPS, "deepcache": {"interval": 1}})
    assert np.abs(run(pipe) - vanilla).max() <= 1e-6
    postdiff.apply(pipe, {"steps": STEPS, "low_res": {"scale": 1.0, "until": 0.5}})
    assert np.abs(run(pipe) - vanilla).max() <= 1e-6
    # the full plan runs and changes the image
    postdiff.apply(pipe, POSTDIFF)
    accelerated = run(pipe)
    assert np.isfinite(accelerated).all() and np.abs(accelerated - vanilla).max() > 1e-3
    postdiff.remove(pipe)
    assert np.abs(run(pipe) - vanilla).max() <= 1e-6


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_calls_do_not_leak_into_each_other(kind):
    pipe = postdiff.apply(make_pipe(kind), POSTDIFF)
    first = run(pipe, "a red apple", seed=3)
    second = run(pipe, "a lighthouse at dusk", seed=7)
    fresh_first = run(postdiff.apply(make_pipe(kind), POSTDIFF), "a red apple", seed=3)
    fresh_second = run(postdiff.apply(make_pipe(kind), POSTDIFF), "a lighthouse at dusk", seed=7)
    assert np.array_equal(first, fresh_first)
    assert np.array_equal(second, fresh_second)
    assert np.array_equal(run(pipe, "a red apple", seed=3), first)  # same seed, same image, run after run
    assert not np.array_equal(first, second)


def test_plan_steps_are_the_default_and_an_explicit_count_recompiles():
    pipe = make_pipe("sd")
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
    postdiff.apply(pipe, {"steps": 4, "low_res": {"scale": 0.5, "until": 0.5}})
    pipe("a cat", generator=gen(0), output_type="np")
    assert seen == [8, 8, 16, 16]
    seen.clear()
    pipe("a cat", num_inference_steps=6, generator=gen(0), output_type="np")
    assert seen == [8, 8, 8, 16, 16, 16]


def test_remove_restores_the_vanilla_pipeline():
    pipe = make_pipe("sd")
    cls = type(pipe)
    postdiff.apply(pipe, "deepcache")
    assert type(pipe).__name__ == cls.__name__ and postdiff.applied_recipe(pipe).name == "deepcache"
    postdiff.remove(pipe)
    assert type(pipe) is cls and postdiff.applied_recipe(pipe) is None
    assert not hasattr(pipe.unet, "_diffusers_hook") or not pipe.unet._diffusers_hook.hooks


def test_errors_surface_before_the_unet_runs():
    pipe = make_pipe("sd")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(RecipeError, match="unknown key"):
        postdiff.apply(pipe, {"deep_cache": {}})
    with pytest.raises(RecipeError, match="down blocks; use 0 to"):  # a cut the UNet does not have: refused at apply
        postdiff.apply(pipe, {"deepcache": {"block": 7}})
    with pytest.raises(RecipeError, match="is a UNet; use deepcache.block"):
        postdiff.apply(pipe, {"deepcache": {"span": [1, 2]}})
    postdiff.apply(pipe, {"steps": 4, "low_res": {"scale": 0.75}})  # 16 * 0.75 = 12: not a multiple of 8? factor is 2 here
    pipe("a cat", generator=gen(0), output_type="np")  # 12 is fine for the toy UNet (factor 2)
    calls.clear()
    with pytest.raises(RecipeError, match="gives no lower resolution"):  # at the pipeline's own size: refused at apply
        postdiff.apply(pipe, {"steps": 4, "low_res": {"scale": 0.97}})  # 15.5 rounds to 16, the full size
    with pytest.raises(PlanError, match="more than the 1000 timesteps"):  # the default call is compiled at apply
        postdiff.apply(pipe, {"steps": 2000})
    postdiff.apply(pipe, {"steps": 4, "low_res": {"scale": 0.9}})  # 14.4 -> 14 at the default 16x16 latent
    with pytest.raises(RecipeError, match="gives no lower resolution"):  # another size: refused when the call starts
        pipe("a cat", height=16, width=16, generator=gen(0), output_type="np")  # 8x8 latent: 7.2 rounds to 8, the full size
    with pytest.raises(RecipeError, match="beyond the last step"):
        postdiff.apply(pipe, "xattn-gate")
        pipe("a cat", num_inference_steps=8, generator=gen(0), output_type="np")
    assert calls == []


def test_gating_a_unet_without_cross_attention_is_refused():
    import dataclasses

    from diffusers import StableDiffusionPipeline

    from postdiff_lab.architectures import TOY_SD
    from postdiff_lab.toy import build_unet

    arch = dataclasses.replace(
        TOY_SD,
        unet={
            **TOY_SD.unet,
            "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"],
            "mid_block_type": "UNetMidBlock2D",
        },
    )
    pipe = make_pipe("sd")
    pipe = StableDiffusionPipeline(**{**pipe.components, "unet": build_unet(arch)}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(RecipeError, match="needs cross-attention"):  # refused at apply, not at every later call
        postdiff.apply(pipe, {"steps": 4, "xattn_gate": {"after": 2}})
    assert postdiff.applied_recipe(pipe) is None
    postdiff.apply(pipe, {"steps": 4, "deepcache": {}})
    assert np.isfinite(run(pipe, num_inference_steps=4)).all()


def test_unsupported_pipeline_and_scheduler():
    with pytest.raises(ModelError, match="supports"):
        postdiff.apply(object(), "baseline")
    pipe = make_pipe("sd", "PNDMScheduler")
    postdiff.apply(pipe, {"steps": 4, "low_res": {}})
    with pytest.raises(PlanError, match="PNDMScheduler"):
        pipe("a cat", generator=gen(0), output_type="np")
    postdiff.apply(pipe, {"steps": 4, "deepcache": {}})  # no switch: any scheduler works
    assert np.isfinite(run(pipe, num_inference_steps=4)).all()


def test_wrong_size_latents_are_refused():
    pipe = postdiff.apply(make_pipe("sd"), {"steps": 4, "low_res": {}})
    with pytest.raises(PlanError, match="needs 16x16 \\(full size\\) or 8x8"):
        pipe("a cat", latents=torch.randn(1, 4, 12, 12), output_type="np")


def test_low_res_noise_is_derived_from_the_full_size_noise_of_the_seed():
    """Mixed resolution starts from the seed's full-size noise, area-averaged: runs stay paired with baseline."""
    from postdiff.loop.resolution import downsample_noise

    pipe = postdiff.apply(make_pipe("sd"), {"steps": 4, "low_res": {}})
    first = []
    pipe.unet.register_forward_pre_hook(lambda m, a: first.append(a[0][1:].clone()) if not first else None)
    pipe("a cat", generator=gen(5), output_type="np")
    full = torch.randn(1, 4, 16, 16, generator=gen(5)) * pipe.scheduler.init_noise_sigma
    expected = pipe.scheduler.scale_model_input(downsample_noise(full, (8, 8)), pipe.scheduler.timesteps[0])
    assert torch.allclose(first[0], expected, atol=1e-6)
    # passing the full-size noise as latents= gives the same image as the seed
    a = pipe("a cat", generator=gen(5), output_type="np").images
    g = gen(5)
    noise = torch.randn(1, 4, 16, 16, generator=g)  # the generator then continues with the switch noise, as in `a`
    b = pipe("a cat", latents=noise, generator=g, output_type="np").images
    assert np.allclose(a, b, atol=1e-6)
    noise = torch.randn(64, 4, 32, 32, generator=gen(0))
    assert downsample_noise(noise, (16, 16)).std().item() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("name", ["dpmpp-2m-karras", "heun"])
def test_plans_run_on_repeated_timesteps_and_baseline_equals_vanilla(name):
    """Plans name steps by position: DPM++ 2M Karras on a cosine schedule calls the UNet at t=998 nine times over 20
    steps (the issue's PlanError), Heun twice per timestep; baseline still equals the vanilla loop, postdiff runs."""
    from diffusers import DPMSolverMultistepScheduler

    from postdiff.loop.arrays import scheduler_from_config

    pipe = make_pipe("sd")
    config = {**dict(pipe.scheduler.config), "beta_schedule": "squaredcos_cap_v2"}
    with pytest.warns() if name in ("heun", "lms", "euler-a") else _quiet():  # sigma 20,291: PostDiffWarning
        pipe.scheduler = scheduler_from_config(name, config)
    steps = 20
    if isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        probe = scheduler_from_config(name, config)
        probe.set_timesteps(steps)
        assert len(set(probe.timesteps.tolist())) < steps  # repeated timesteps, the case under test
    repeated = isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    if repeated:  # diffusers' own loop looks the first step up by value, lands on the second 998 and runs off the end
        with pytest.raises(IndexError):
            run(pipe, num_inference_steps=steps)
        pipe.scheduler.set_begin_index(0)
        vanilla = None
    else:
        vanilla = run(pipe, num_inference_steps=steps)
    postdiff.apply(pipe, "baseline")
    ours = run(pipe, num_inference_steps=steps)
    assert np.isfinite(ours).all()
    if vanilla is not None:
        assert np.abs(ours - vanilla).max() <= 1e-6
    postdiff.apply(pipe, {**POSTDIFF, "steps": steps, "xattn_gate": {"after": 10}, "low_res": {"scale": 1.0, "until": 0.5}})
    assert np.isfinite(run(pipe, num_inference_steps=steps)).all()


def _quiet():
    import contextlib

    return contextlib.nullcontext()
