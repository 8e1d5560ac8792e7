"""PostDiff against the official DeepCache package, and the bug classes caching tools most often ship
(research/users_and_peers.md): state carried into the next call, interrupted calls, batch changes, custom attention
processors, and step counting under repeated timesteps."""

import numpy as np
import pytest
import torch
from core_helpers import gen, make_pipe

import postdiff

STEPS = 6


def latents(pipe, prompt="a cat", seed=1, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe(prompt, generator=gen(seed), output_type="latent", **kw).images


# -- the official deepcache 0.1.1 (installed with --no-deps by scripts/setup.sh) --------------------------------------
@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("block", [0, 1])
def test_deepcache_plan_equals_the_official_deepcache_helper(block, interval):
    from DeepCache import DeepCacheSDHelper

    pipe = make_pipe("sd")
    vanilla = latents(pipe)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=3 * block + 1)
    helper.enable()
    try:
        theirs = latents(pipe)
    finally:
        helper.disable()
    postdiff.apply(pipe, {"steps": STEPS, "deepcache": {"interval": interval, "block": block}})
    ours = latents(pipe)
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert (ours - vanilla).abs().max().item() > 1e-4  # the cache changed something: the comparison is not vacuous
    # the helper's own key, for users coming from DeepCache, is the same plan
    postdiff.apply(pipe, {"steps": STEPS, "deepcache": {"interval": interval, "cache_branch_id": 3 * block + 1}})
    assert torch.equal(latents(pipe), ours)


# -- state carried between calls ---------------------------------------------------------------------------------------
PLAN = {"steps": STEPS, "low_res": {"scale": 0.5, "until": 0.5}, "deepcache": {"interval": 2}, "xattn_gate": {"after": 2}}


def fresh(**kw):
    return latents(postdiff.apply(make_pipe("sd"), PLAN), **kw)


@pytest.mark.parametrize(
    "first, second",
    [
        ({}, {"height": 48, "width": 40}),  # another size
        ({}, {"num_images_per_prompt": 2}),  # another batch
        ({"num_images_per_prompt": 3}, {}),  # a smaller batch after a larger one: no cache broadcast across batches
        ({}, {"num_inference_steps": 8}),  # another step count
        ({"prompt": ["a cat", "a dog"]}, {"prompt": "a bird"}),  # another prompt batch
    ],
    ids=["size", "batch-up", "batch-down", "steps", "prompts"],
)
def test_a_call_after_another_equals_a_fresh_pipeline(first, second):
    pipe = postdiff.apply(make_pipe("sd"), PLAN)
    latents(pipe, **first)
    assert torch.equal(latents(pipe, **second), fresh(**second))


def test_a_call_after_a_scheduler_change_equals_a_fresh_pipeline():
    from diffusers import EulerDiscreteScheduler

    pipe = postdiff.apply(make_pipe("sd"), PLAN)
    latents(pipe)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    other = postdiff.apply(make_pipe("sd", "EulerDiscreteScheduler"), PLAN)
    assert torch.equal(latents(pipe), latents(other))


def test_a_call_interrupted_by_its_callback_leaves_no_state_behind():
    pipe = postdiff.apply(make_pipe("sd"), PLAN)

    def boom(pipeline, i, t, kwargs):
        if i == 3:
            raise RuntimeError("user callback failed")
        return kwargs

    with pytest.raises(RuntimeError, match="user callback failed"):
        latents(pipe, callback_on_step_end=boom)
    assert torch.equal(latents(pipe), fresh())
    postdiff.remove(pipe)
    assert torch.equal(latents(pipe), latents(make_pipe("sd")))  # and removal still restores vanilla


# -- custom attention processors ---------------------------------------------------------------------------------------
class CountingProcessor:
    """A user's processor: diffusers' default arithmetic, plus a count of the calls it served."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner, self.calls = AttnProcessor2_0(), 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.calls += 1
        return self.inner(attn, hidden_states, *args, **kwargs)


def test_a_custom_attention_processor_keeps_running_on_computed_steps():
    pipe = make_pipe("sd")
    vanilla = latents(pipe)
    counting = CountingProcessor()
    pipe.unet.set_attn_processor(counting)
    assert torch.equal(latents(pipe), vanilla)
    per_call = counting.calls / STEPS  # attention calls in one full UNet pass (CFG batched)
    counting.calls = 0
    postdiff.apply(pipe, {"steps": STEPS, "deepcache": {"interval": 2}})
    latents(pipe)
    full_steps = len(range(0, STEPS, 2))
    assert counting.calls >= full_steps * per_call  # every full pass ran the user's processor
    assert 0 < counting.calls < STEPS * per_call  # and shallow passes ran it where they computed attention, not more
    assert all(p is counting for p in pipe.unet.attn_processors.values())  # the processor was never replaced


# -- step counting under repeated timesteps ----------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["HeunDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_steps_are_counted_by_plan_index_not_by_timestep_value(scheduler):
    """Heun evaluates every timestep twice, and a DPM-Solver with a final sigma of zero can repeat timesteps: the plan
    is followed call by call, so full and shallow passes alternate as planned. (DeepCache's helper looks steps up by
    timestep value, ``list(timesteps).index(t)``, and so gets repeated timesteps wrong.)"""
    pipe = make_pipe("sd", scheduler)
    if scheduler == "DPMSolverMultistepScheduler":
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_karras_sigmas=True, final_sigmas_type="zero")
    postdiff.apply(pipe, {"steps": STEPS, "deepcache": {"interval": 2}})
    deep_ran = []
    handle = pipe.unet.mid_block.register_forward_hook(lambda *a: deep_ran.append(len(calls)))
    calls = []
    pre = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = latents(pipe)
    finally:
        handle.remove()
        pre.remove()
    plan = postdiff.pytorch.diffusers_hook.last_plan(pipe)
    assert len(calls) == len(plan.steps)  # one UNet call per planned step, repeated timesteps included
    assert [i + 1 for i, s in enumerate(plan.steps) if s.unet == "full"] == deep_ran
    assert np.isfinite(out.numpy()).all()


# -- sizes vanilla diffusers runs ---------------------------------------------------------------------------------------
def _deep_toy_sd():
    """The toy SD pipeline with a UNet that downsamples three times (factor 8, like SD 1.x), so that image sizes
    diffusers accepts (multiples of 8 px, latent = px / 2 here) give latents that are not multiples of the factor."""
    from diffusers import UNet2DConditionModel

    pipe = make_pipe("sd")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=[32, 32, 32, 32],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    return pipe


def test_baseline_equals_vanilla_where_the_latent_is_not_a_multiple_of_the_unet_factor():
    pipe = _deep_toy_sd()
    size = {"height": 40, "width": 56}  # latent 20x28; the UNet's factor is 8
    vanilla = latents(pipe, **size)
    postdiff.apply(pipe, "baseline")
    assert (latents(pipe, **size) - vanilla).abs().max().item() <= 1e-6
    for plan in ({"steps": STEPS, "deepcache": {"interval": 2, "block": 1}}, PLAN):  # caching, and mixed resolution
        postdiff.apply(pipe, plan)
        out = latents(pipe, **size)
        assert out.shape == vanilla.shape and torch.isfinite(out).all()
    assert {s.latent_hw for s in postdiff.pytorch.diffusers_hook.last_plan(pipe).steps} == {(8, 16), (20, 28)}  # 10x14 -> 8x16
