"""ControlNet and multi-ControlNet under plans (toy SD and SDXL with random-weight ControlNets)."""

import numpy as np
import pytest
import torch
from core_helpers import gen, make_pipe

import postdiff
from postdiff.pytorch.diffusers_hook import last_plan
from postdiff.pytorch.unet import UNetSplit

STEPS = 8
POSTDIFF = {"steps": STEPS, "low_res": {"scale": 0.5, "until": 0.5}, "deepcache": {"interval": 2}, "xattn_gate": {"after": 4}}
CONTROL = torch.rand(1, 3, 32, 32, generator=gen(3))


def controlnet_pipe(kind: str, multi: bool = False, scheduler: str = "DDIMScheduler", img2img: bool = False):
    from diffusers import (
        MultiControlNetModel,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    from postdiff_lab.toy import toy_controlnet

    base = make_pipe(kind, scheduler)
    net = toy_controlnet(base, 1)
    if multi:
        net = MultiControlNetModel([net, toy_controlnet(base, 2)])
    parts = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor", "image_encoder")}
    if kind == "sd":
        cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
        pipe = cls(**parts, controlnet=net, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLControlNetPipeline(**parts, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    return pipe


DEFAULT_CASES = {("DDIMScheduler", "sd", False), ("DPMSolverMultistepScheduler", "sdxl", True)}


def run(pipe, multi=False, seed=1, **kw):
    image = [CONTROL, CONTROL.flip(-1)] if multi else CONTROL
    kw.setdefault("num_inference_steps", STEPS)
    return pipe("a cat", image=image, generator=gen(seed), output_type="np", **kw).images


# two of the eight combinations by default (SD with one ControlNet and DDIM, SDXL with two and DPM-Solver++); the
# other six with -m slow (about 30 s each here)
CONTROLNET_CASES = [
    pytest.param(s, k, m, marks=[] if (s, k, m) in DEFAULT_CASES else [pytest.mark.slow])
    for s in ("DDIMScheduler", "DPMSolverMultistepScheduler")
    for k in ("sd", "sdxl")
    for m in (False, True)
]


@pytest.mark.parametrize("scheduler, kind, multi", CONTROLNET_CASES)
def test_exact_plans_equal_vanilla_and_postdiff_stays_paired(kind, multi, scheduler):
    pipe = controlnet_pipe(kind, multi, scheduler)
    vanilla = run(pipe, multi)
    scale = [0.0, 0.0] if multi else 0.0
    assert np.abs(run(pipe, multi, controlnet_conditioning_scale=scale) - vanilla).max() > 1e-3  # the ControlNet matters
    for plan in ("baseline", {"steps": STEPS, "deepcache": {"interval": 1}}):
        postdiff.apply(pipe, plan)
        assert np.abs(run(pipe, multi) - vanilla).max() <= 1e-6, plan
    postdiff.apply(pipe, POSTDIFF)
    first = run(pipe, multi)
    assert np.isfinite(first).all() and np.array_equal(run(pipe, multi), first)
    postdiff.remove(pipe)
    assert np.abs(run(pipe, multi) - vanilla).max() <= 1e-6


def test_controlnet_sees_the_stage_size_and_only_the_conditional_half_when_cfg_is_dropped():
    pipe = postdiff.apply(controlnet_pipe("sd"), POSTDIFF)
    samples, images = [], []  # what the ControlNet's layers receive (inside the hook PostDiff puts on it)
    pipe.controlnet.conv_in.register_forward_pre_hook(lambda m, a: samples.append(a[0].shape))
    pipe.controlnet.controlnet_cond_embedding.register_forward_pre_hook(lambda m, a: images.append(a[0].shape))
    run(pipe)
    plan = last_plan(pipe)
    assert len(samples) == len(images) == len(plan.steps)
    for step, sample, image in zip(plan.steps, samples, images):
        assert tuple(sample[-2:]) == step.latent_hw and tuple(image[-2:]) == tuple(2 * v for v in step.latent_hw)
        assert sample[0] == (1 if step.guidance == "cond" else 2)


def test_control_image_is_area_averaged_to_the_stage():
    pipe = postdiff.apply(controlnet_pipe("sd"), POSTDIFF)
    images = []
    pipe.controlnet.controlnet_cond_embedding.register_forward_pre_hook(lambda m, a: images.append(a[0].clone()))
    run(pipe)
    prepared = images[-1][-1:]  # a full-size call: the pipeline's control image (conditional row)
    assert torch.allclose(images[0][-1:], torch.nn.functional.avg_pool2d(prepared, 2), atol=1e-6)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_shallow_pass_uses_exactly_the_residuals_of_the_skips_above_the_cut(kind):
    """UNet2DConditionModel adds ControlNet residual i to skip connection i and the middle residual to the middle
    block's output. A shallow (DeepCache) pass produces skips 0..cut only: it uses those residuals, and given the
    feature its own step's full pass cached, it equals that full pass."""
    unet = make_pipe(kind).unet
    block = 1
    split = UNetSplit(unet, block)
    g = gen(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor(500.0)
    ehs = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if split.is_sdxl:
        extra = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[32.0, 32.0, 0, 0, 32.0, 32.0]] * 2)}
    with torch.no_grad():
        probe = split.forward("full", sample, t, ehs, extra.get("text_embeds"), extra.get("time_ids"))
        skips = [r.shape for r in _skips(split, sample, t, ehs, extra)]
        down = tuple(torch.randn(s, generator=g) * 0.1 for s in skips)
        mid = torch.randn(probe[1].shape[0], unet.config.block_out_channels[-1], 8, 8, generator=g) * 0.1
        vanilla = unet(
            sample, t, ehs, added_cond_kwargs=extra or None, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        args = (sample, t, ehs, extra.get("text_embeds"), extra.get("time_ids"))
        eps, deep = split.forward("full", *args, down_residuals=down, mid_residual=mid)
        assert torch.abs(eps - vanilla).max() <= 1e-5
        shallow = split.forward("shallow", *args, deep, down_residuals=down, mid_residual=mid)[0]
        assert torch.abs(shallow - eps).max() <= 1e-5
        used = split.cut + 1
        changed = tuple(r if i < used else r + 1.0 for i, r in enumerate(down))
        assert torch.equal(split.forward("shallow", *args, deep, down_residuals=changed, mid_residual=mid + 1.0)[0], shallow)
        for i in range(used):
            one = tuple(r + 1.0 if j == i else r for j, r in enumerate(down))
            assert not torch.equal(split.forward("shallow", *args, deep, down_residuals=one, mid_residual=mid)[0], shallow), i
    split.close()


def _skips(split, sample, t, ehs, extra):
    """The skip connections of a full pass (what a ControlNet's residuals are added to), by a forward hook per layer."""
    seen = []
    unet = split.unet
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, o: seen.append(o))]
    for blk in unet.down_blocks:
        hooks.append(blk.register_forward_hook(lambda m, a, o: seen.extend(o[1])))
    with torch.no_grad():
        unet(sample, t, ehs, added_cond_kwargs=extra or None)
    for h in hooks:
        h.remove()
    return seen


def test_controlnet_img2img_runs_plans():
    pipe = controlnet_pipe("sd", img2img=True)
    image = torch.rand(1, 3, 32, 32, generator=gen(5)) * 2 - 1

    def go():
        return pipe(
            "a cat", image=image, control_image=CONTROL, strength=0.7, generator=gen(1), output_type="np", num_inference_steps=STEPS
        ).images

    vanilla = go()
    postdiff.apply(pipe, "baseline")
    assert np.abs(go() - vanilla).max() <= 1e-6
    postdiff.apply(pipe, POSTDIFF)
    first = go()
    assert np.array_equal(go(), first) and len(last_plan(pipe).steps) < STEPS


def test_controlnet_plans_in_half_precision():
    """The control image PostDiff area-averages to the stage follows the pipeline's dtype (bfloat16 here)."""
    pipe = controlnet_pipe("sd").to(dtype=torch.bfloat16)
    vanilla = run(pipe)
    postdiff.apply(pipe, "baseline")
    assert np.array_equal(run(pipe), vanilla)
    postdiff.apply(pipe, POSTDIFF)
    first = run(pipe)
    assert np.isfinite(first).all() and np.array_equal(run(pipe), first) and np.abs(first - vanilla).max() > 0
