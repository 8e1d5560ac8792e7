"""LCM (guidance-distilled UNet + LCMScheduler) through postdiff.apply: equivalence with the vanilla pipeline, the
guidance embedding through every UNet variant, the scheduler's restart at the resolution switch, plans of 4-8 steps."""

import numpy as np
import pytest
import torch
from core_helpers import gen, make_pipe

import postdiff
from postdiff.families.model import load_model
from postdiff.loop.conditioning import guidance_embedding
from postdiff.plan.cost import plan_cost
from postdiff.plan.recipe import load_recipe
from postdiff.pytorch.diffusers_hook import last_plan
from postdiff.pytorch.macs import MacCounter
from postdiff.pytorch.unet import UNetSplit

STEPS = 4
LOW_RES = {"steps": STEPS, "low_res": {"scale": 0.5, "until": 0.5}}


@pytest.fixture(scope="module")
def pipe():
    return make_pipe("lcm", "LCMScheduler")


def run(pipe, seed=1, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe("a cat", generator=gen(seed), output_type="np", **kw).images


def test_the_toy_is_an_lcm_and_recognised_as_one(pipe):
    assert type(pipe).__name__ == "LatentConsistencyModelPipeline"
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.unet.config.time_cond_proj_dim
    model = load_model("toy-lcm", need_pipeline=True)
    assert model.family.name == "lcm" and model.spec().guidance_embedded
    assert load_model("toy-sd", need_pipeline=True).family.name == "sd"  # the SD toy stays SD


def test_baseline_equals_vanilla_diffusers(pipe):
    postdiff.remove(pipe)
    vanilla = run(pipe)
    try:
        for recipe in ("baseline", {"steps": STEPS, "deepcache": {"interval": 1}}, {**LOW_RES, "low_res": {"scale": 1.0, "until": 0.5}}):
            postdiff.apply(pipe, load_recipe(recipe).with_steps(STEPS))
            assert np.abs(run(pipe) - vanilla).max() <= 1e-6, recipe
        postdiff.apply(pipe, "postdiff-lcm")
        accelerated = run(pipe)
        assert np.isfinite(accelerated).all() and np.abs(accelerated - vanilla).max() > 1e-3
    finally:
        postdiff.remove(pipe)
    assert np.abs(run(pipe) - vanilla).max() <= 1e-6


def test_guidance_embedding_is_the_pipelines(pipe):
    # sines of up to 1000 w radians: one float32 ulp of a frequency (numpy's exp vs torch's) moves them by ~1e-4 w
    for w in (0.0, 1.5, 7.5):
        expected = pipe.get_guidance_scale_embedding(torch.tensor([w]), embedding_dim=16)
        assert np.abs(guidance_embedding(w, 16) - expected.numpy()).max() <= 1e-4 * max(w, 1.0)
    assert guidance_embedding(2.0, 17, batch=3).shape == (3, 17)


@pytest.mark.parametrize("variant", ["full", "shallow", "full_capture", "full_cached", "shallow_cached"])
def test_the_guidance_embedding_reaches_every_variant(pipe, variant):
    # the toy's first block has one channel per norm group, where a GroupNorm removes any per-channel shift the time
    # embedding adds: the same UNet with 8 groups, so that the embedding can show in the shallow part
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "norm_num_groups": 8}).eval()
    with UNetSplit(unet, block=0) as split:
        module = split.module(variant)
        assert "timestep_cond" in module.input_names()
        ins = module.example_inputs((16, 16), 1, text_len=77)
        with torch.no_grad():
            a = module(*ins.values())[0]
            ins["timestep_cond"] = ins["timestep_cond"] + 1.0
            b = module(*ins.values())[0]
    assert (a - b).abs().max() > 1e-4, "the variant ignores timestep_cond"


def test_lcm_restarts_at_the_switch_and_ends_on_its_clean_sample(pipe):
    """After the switch the scheduler continues at the plan's index: the last step injects no noise, so the final
    latent is the last step's denoised sample (a scheduler restarted at index 0 would add noise there)."""
    seen = []

    def on_step(p, i, t, kw):
        seen.append((i, tuple(kw["latents"].shape[-2:]), kw["latents"].clone(), kw["denoised"].clone()))
        return {}

    postdiff.apply(pipe, LOW_RES)
    try:
        latent = pipe(
            "a cat",
            generator=gen(3),
            num_inference_steps=STEPS,
            output_type="latent",
            callback_on_step_end=on_step,
            callback_on_step_end_tensor_inputs=["latents", "denoised"],
        ).images
        plan = last_plan(pipe)
    finally:
        postdiff.remove(pipe)
    assert [s.latent_hw for s in plan.steps] == [(8, 8), (8, 8), (16, 16), (16, 16)]
    assert [hw for _, hw, _, _ in seen] == [(8, 8), (16, 16), (16, 16), (16, 16)]  # latents after each step
    i, _, last_latents, last_denoised = seen[-1]
    assert i == STEPS - 1 and torch.equal(last_latents, last_denoised) and torch.equal(latent, last_denoised)
    # the steps before the last are re-noised: their latents are not their clean samples
    assert all((lat - den).abs().max() > 1e-3 for _, _, lat, den in seen[:-1])


@pytest.mark.parametrize("steps", [4, 5, 6, 7, 8])
def test_the_lcm_plan_compiles_at_4_to_8_steps_and_saves_macs(steps):
    model = load_model("arch:lcm-sd15")
    plan = model.compile("postdiff-lcm", steps, height=512, width=512)
    assert plan.scheduler == "LCMScheduler" and len(plan.steps) == steps
    assert plan.steps[0].latent_hw == (32, 32) and plan.steps[-1].latent_hw == (64, 64)
    base = model.compile("baseline", steps, height=512, width=512)
    counter = MacCounter(model.unet_config, block=0, text_len=model.text_len)
    cost = plan_cost(plan, counter, base)
    # one branch per step (guidance is embedded): the baseline's MACs are steps x one batch-1 full pass
    assert cost.baseline_macs == steps * counter.macs("full", (64, 64), 1)
    assert cost.ratio < 0.7


def test_lcm_models_take_their_own_scheduler_only():
    model = load_model("toy-lcm", need_pipeline=True)
    with pytest.raises(postdiff.ModelError, match="LCM models sample with LCMScheduler \\(lcm\\) only, not 'EulerDiscreteScheduler'"):
        model.scheduler("EulerDiscreteScheduler")
    assert type(model.scheduler("LCMScheduler")).__name__ == "LCMScheduler"
    assert type(load_model("arch:lcm-sd15").scheduler()).__name__ == "LCMScheduler"
