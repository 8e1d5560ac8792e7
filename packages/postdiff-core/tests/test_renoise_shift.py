"""low_res.renoise_shift: the switch re-noises to another point of the schedule (repeating or skipping steps)."""

import pytest
import torch
from core_helpers import SCHEDULERS, gen, make_pipe

import postdiff
from postdiff import PlanError, RecipeError, TorchDenoiser, UNetSplit, compile_for_scheduler, model_spec, run_plan
from postdiff.plan.compiler import Plan
from postdiff.plan.recipe import load_recipe

STEPS = 6


def recipe(shift, **more):
    return load_recipe({"steps": STEPS, "low_res": {"scale": 0.5, "until": 0.5, "renoise_shift": shift}, **more})


def conditioning(pipe, prompt="a cat"):
    pos, neg = pipe.encode_prompt(prompt, "cpu", 1, True)
    return postdiff.Conditioning(torch.cat([neg, pos]), has_uncond=True)


def test_recipe_rules():
    assert recipe(0) == load_recipe({"steps": STEPS, "low_res": {}})  # 0 is the paper's switch, the default
    with pytest.raises(RecipeError, match="renoise_shift=1 shifts the switch, and this recipe has none"):
        load_recipe({"steps": STEPS, "low_res": {"scale": 1.0, "renoise_shift": 1}})
    with pytest.raises(RecipeError, match="must be from -2 .* to 3"):
        recipe(4)
    with pytest.raises(RecipeError, match="must be from -2"):
        recipe(-3)
    with pytest.raises(RecipeError, match="renoise_shift must be an integer"):
        load_recipe({"steps": STEPS, "low_res": {"renoise_shift": 0.5}})
    with pytest.raises(RecipeError, match="outside the schedule"):
        recipe(3).with_steps(4)  # the switch moves to step 2: a shift of 3 would start before the schedule


@pytest.mark.parametrize("shift", [-2, -1, 1, 3])
def test_the_steps_after_the_switch_repeat_or_skip_that_many_positions(shift):
    pipe = make_pipe("sd")
    plan = compile_for_scheduler(recipe(shift), pipe.scheduler, (16, 16), model_spec(pipe.unet))
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert len(plan.steps) == STEPS + shift
    low = [s for s in plan.steps if s.latent_hw == (8, 8)]
    full = [s for s in plan.steps if s.latent_hw == (16, 16)]
    assert [s.scheduler_index for s in low] == [0, 1, 2]
    assert [s.scheduler_index for s in full] == list(range(3 - shift, STEPS))
    assert [s.timestep for s in plan.steps] == [timesteps[s.scheduler_index] for s in plan.steps]
    assert full[0].switches_resolution and full[0].unet == "full"
    again = Plan.from_json(plan.to_json())
    assert again == plan and all(s.schedule_index is None for s in low)
    # a jump anywhere but at the switch is refused
    bad = plan.to_dict()
    bad["steps"][1]["schedule_index"] = 0
    with pytest.raises(PlanError, match="plan step 1: schedule_index 0 does not follow"):
        Plan.from_dict(bad)


def test_plans_without_a_shift_are_written_as_before():
    pipe = make_pipe("sd")
    plan = compile_for_scheduler(recipe(0), pipe.scheduler, (16, 16), model_spec(pipe.unet))
    assert all("schedule_index" not in s for s in plan.to_dict()["steps"])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("shift", [-1, 2])
def test_run_plan_and_the_pipeline_hook_agree_on_a_shifted_switch(scheduler, shift):
    """Both loops run the plan's calls at the plan's timesteps, the scheduler restarted at the shifted index."""
    full = recipe(shift, deepcache={"interval": 2}, xattn_gate={"after": 4})
    pipe = make_pipe("sd", scheduler)
    plan = compile_for_scheduler(full, pipe.scheduler, (16, 16), model_spec(pipe.unet))
    with UNetSplit(pipe.unet) as split:
        ours = run_plan(plan, TorchDenoiser(split), pipe.scheduler, conditioning(pipe), generator=gen(2), progress=False)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(float(a[1])), with_kwargs=True)
    hooked = postdiff.apply(pipe, full)("a cat", generator=gen(2), output_type="latent").images
    postdiff.remove(pipe)
    assert seen == plan.timesteps  # the pipeline's own loop ran the plan's calls, repeats and skips included
    assert torch.isfinite(ours).all() and torch.allclose(ours, hooked, atol=1e-5)
    plain = compile_for_scheduler(recipe(0), pipe.scheduler, (16, 16), model_spec(pipe.unet))
    with UNetSplit(pipe.unet) as split:
        unshifted = run_plan(plain, TorchDenoiser(split), pipe.scheduler, conditioning(pipe), generator=gen(2), progress=False)
    assert (unshifted - ours).abs().max() > 1e-3  # the shift changes the result


def test_the_switch_renoises_to_the_shifted_noise_level():
    """DDIM: the first full-resolution call sees x0 re-noised to timesteps[k - shift], that is a latent whose
    predicted x0 (for the same UNet output) is the upsampled low-resolution one."""
    from postdiff.loop.resolution import renoise
    from postdiff.loop.sampling import PlanRun

    pipe = make_pipe("sd")
    plan = compile_for_scheduler(recipe(2), pipe.scheduler, (16, 16), model_spec(pipe.unet))
    run = PlanRun(plan, pipe.scheduler, gen(0))
    run.index = 2  # the last low-resolution step
    x = torch.randn(1, 4, 8, 8, generator=gen(1))
    eps = torch.randn(1, 4, 8, 8, generator=gen(2))
    out = run.advance(eps, plan.steps[2].timestep, x)
    nxt = plan.steps[3]
    assert nxt.scheduler_index == 1 and nxt.timestep == float(pipe.scheduler.timesteps[1])
    x0 = run.denoised
    expected = renoise(pipe.scheduler, x0, torch.randn(1, 4, 16, 16, generator=gen(0)), 1, nxt.timestep)
    assert torch.allclose(out, expected, atol=1e-6)
