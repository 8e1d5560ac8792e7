"""Plans under image-to-image, inpainting (4- and 9-channel UNets) and the SDXL base -> refiner handoff.

Each pipeline is built from a toy's components, as users build img2img pipelines from a text-to-image one."""

import numpy as np
import pytest
import torch
from core_helpers import gen, make_pipe

import postdiff
from postdiff import PlanError
from postdiff.pytorch.diffusers_hook import last_plan

STEPS = 8
POSTDIFF = {"steps": STEPS, "low_res": {"scale": 0.5, "until": 0.5}, "deepcache": {"interval": 2}, "xattn_gate": {"after": 4}}
EXACT = [
    "baseline",
    {"steps": STEPS, "deepcache": {"interval": 1}},
    {"steps": STEPS, "low_res": {"scale": 1.0, "until": 0.5}},
]
IMAGE = torch.rand(1, 3, 32, 32, generator=gen(11)) * 2 - 1
MASK = torch.zeros(1, 1, 32, 32)
MASK[..., 8:24, 4:20] = 1


def pipeline(kind: str, scheduler: str = "DDIMScheduler"):
    """(pipe, call options) for an image-conditioned kind."""
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    if kind == "sd-inpaint9":
        return make_pipe("sd-inpaint", scheduler), {"image": IMAGE, "mask_image": MASK, "strength": 0.8}
    sd = kind.startswith("sd-")
    parts = make_pipe("sd" if sd else "sdxl", scheduler).components
    extra = {"requires_safety_checker": False} if sd else {}
    cls, options = {
        "sd-img2img": (StableDiffusionImg2ImgPipeline, {"strength": 0.6}),
        "sd-inpaint": (StableDiffusionInpaintPipeline, {"mask_image": MASK, "strength": 0.7}),
        "sdxl-img2img": (StableDiffusionXLImg2ImgPipeline, {"strength": 0.6}),
        "sdxl-inpaint": (StableDiffusionXLInpaintPipeline, {"mask_image": MASK, "strength": 0.7}),
    }[kind]
    pipe = cls(**parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"image": IMAGE, **options}


def run(pipe, options, seed=1, prompt="a cat", **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "np")
    return pipe(prompt, generator=gen(seed), **options, **kw).images


KINDS = ["sd-img2img", "sd-inpaint", "sd-inpaint9", "sdxl-img2img", "sdxl-inpaint"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_exact_plans_equal_vanilla_and_postdiff_stays_paired(kind, scheduler):
    pipe, options = pipeline(kind, scheduler)
    vanilla = run(pipe, options)
    for plan in EXACT:
        postdiff.apply(pipe, plan)
        assert np.abs(run(pipe, options) - vanilla).max() <= 1e-6, plan
    postdiff.apply(pipe, POSTDIFF)
    first = run(pipe, options)
    assert np.isfinite(first).all() and np.abs(first - vanilla).max() > 1e-3
    assert np.array_equal(run(pipe, options), first)  # same seed, same image, run after run
    postdiff.remove(pipe)
    assert np.abs(run(pipe, options) - vanilla).max() <= 1e-6


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler"])
@pytest.mark.parametrize("kind", ["sd-img2img", "sd-inpaint9"])
def test_the_plan_is_compiled_for_the_steps_strength_leaves(kind, scheduler):
    """strength cuts the schedule: the plan has one step per UNet call that runs, at the same timesteps as vanilla,
    its first half at the low resolution (9 channels in for the inpainting UNet), its gate a fraction of them."""
    pipe, options = pipeline(kind, scheduler)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append((tuple(a[0].shape[1:]), float(a[1]))))
    run(pipe, options)
    vanilla_t = [t for _, t in seen]
    seen.clear()
    postdiff.apply(pipe, POSTDIFF)
    run(pipe, options)
    plan = last_plan(pipe)
    assert [t for _, t in seen] == vanilla_t == plan.timesteps
    channels = 9 if kind == "sd-inpaint9" else 4
    low = [s for s in plan.steps if s.latent_hw == (8, 8)]
    assert low and plan.steps[-1].latent_hw == (16, 16)
    assert [shape for shape, _ in seen] == [(channels, *s.latent_hw) for s in plan.steps]
    full = pipe.scheduler.timesteps.tolist()
    assert [full[s.scheduler_index] for s in plan.steps] == plan.timesteps  # places in the whole schedule
    assert plan.recipe.steps < STEPS and plan.recipe.xattn_gate.after < plan.recipe.steps


def test_inpainting_keeps_the_unmasked_latent_exactly_after_a_low_resolution_phase():
    """The 4-channel inpaint pipeline blends the known region back every step; PostDiff resizes the image latents,
    noise and mask with the stage, so the final (full-size) latent keeps the image outside the mask exactly."""
    pipe, options = pipeline("sd-inpaint")
    image_latents = torch.randn(1, 4, 16, 16, generator=gen(4))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1
    options = {
        "image": image_latents,
        "mask_image": torch.nn.functional.interpolate(mask, scale_factor=2),
        "masked_image_latents": image_latents * (1 - mask),
        "strength": 0.9,
    }
    postdiff.apply(pipe, POSTDIFF)
    latents = run(pipe, options, output_type="latent")
    assert any(s.latent_hw == (8, 8) for s in last_plan(pipe).steps)
    keep = (mask == 0).expand_as(latents)
    assert torch.equal(latents[keep], image_latents[keep])
    assert not torch.allclose(latents[~keep], image_latents[~keep])


def test_sdxl_img2img_gets_full_size_conditioning_at_a_low_resolution_start():
    """SDXL img2img/inpaint take time_ids from the prepared latent's size; PostDiff makes that latent at the first
    stage's size, so it hands the pipeline the full size and the UNet sees it scaled to the stage."""
    pipe, options = pipeline("sdxl-img2img")
    ids = []
    pipe.unet.register_forward_pre_hook(lambda m, a, k: ids.append(k["added_cond_kwargs"]["time_ids"][0].tolist()), with_kwargs=True)
    run(pipe, options)
    vanilla = ids[0]
    ids.clear()
    postdiff.apply(pipe, POSTDIFF)
    run(pipe, options)
    assert vanilla == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0] and ids[0] == vanilla


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"])
def test_sdxl_base_to_refiner_handoff_runs_plans_on_both_halves(scheduler):
    base, refiner = make_pipe("sdxl", scheduler), make_pipe("sdxl-refiner", scheduler)
    steps = 10
    plan = {**POSTDIFF, "steps": steps, "xattn_gate": {"after": 5}}

    def handoff():
        latent = base("a cat", generator=gen(1), num_inference_steps=steps, denoising_end=0.8, output_type="latent").images
        image = refiner("a cat", image=latent, generator=gen(2), num_inference_steps=steps, denoising_start=0.8, output_type="np").images
        return latent, image

    vanilla_latent, vanilla = handoff()
    for p in ("baseline", {"steps": steps, "deepcache": {"interval": 1}}):
        postdiff.apply(base, p), postdiff.apply(refiner, p)
        latent, image = handoff()
        assert torch.abs(latent - vanilla_latent).max() <= 1e-6 and np.abs(image - vanilla).max() <= 1e-6
    postdiff.apply(base, plan), postdiff.apply(refiner, plan)
    first = handoff()
    base_plan, refiner_plan = last_plan(base), last_plan(refiner)
    # the base stops at denoising_end at full size; the refiner continues the schedule where the base stopped
    assert base_plan.steps[0].latent_hw == (8, 8) and base_plan.steps[-1].latent_hw == (16, 16)
    assert refiner_plan.steps[0].scheduler_index >= base_plan.steps[-1].scheduler_index
    assert np.isfinite(first[1]).all()
    second = handoff()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_no_state_leaks_between_text_to_image_and_img2img_on_shared_components():
    from diffusers import StableDiffusionImg2ImgPipeline

    def pair():
        t2i = make_pipe("sd")
        i2i = StableDiffusionImg2ImgPipeline(**t2i.components, requires_safety_checker=False)
        i2i.set_progress_bar_config(disable=True)
        return postdiff.apply(t2i, POSTDIFF), postdiff.apply(i2i, POSTDIFF)

    t2i, i2i = pair()
    options = {"image": IMAGE, "strength": 0.6}
    a = run(t2i, {})
    b = run(i2i, options)
    c = run(t2i, {})
    d = run(i2i, options)
    fresh_t2i, fresh_i2i = pair()
    assert np.array_equal(a, c) and np.array_equal(b, d)
    assert np.array_equal(a, run(fresh_t2i, {})) and np.array_equal(b, run(fresh_i2i, options))
    assert not hasattr(i2i.unet, "_diffusers_hook") or not i2i.unet._diffusers_hook.hooks


def test_levers_that_cannot_apply_to_a_partial_run_say_why():
    pipe, options = pipeline("sd-img2img")
    postdiff.apply(pipe, {"steps": STEPS, "low_res": {"scale": 0.5, "until": 0.5, "renoise_shift": 1}})
    with pytest.raises(PlanError, match="renoise_shift.*partial runs"):
        run(pipe, options)
    # a gate that leaves no CFG step in a one-step run is dropped, not an error
    postdiff.apply(pipe, {"steps": STEPS, "xattn_gate": {"after": 4}})
    run(pipe, {**options, "strength": 0.15})
    assert last_plan(pipe).recipe.xattn_gate is None and len(last_plan(pipe).steps) == 1


@pytest.mark.parametrize("kind", ["sd-inpaint9", "sdxl-img2img"])
def test_half_precision_image_conditioned_plans(kind):
    """The tensors PostDiff resizes to the stage (encoded image, noise, mask, masked image) keep the pipeline's dtype:
    baseline equals vanilla exactly in bfloat16 and the full plan runs, finite and deterministic."""
    pipe, options = pipeline(kind)
    pipe.to(dtype=torch.bfloat16)
    options = {**options, "image": options["image"].to(torch.bfloat16)}
    vanilla = run(pipe, options)
    postdiff.apply(pipe, "baseline")
    assert np.array_equal(run(pipe, options), vanilla)
    postdiff.apply(pipe, POSTDIFF)
    first = run(pipe, options)
    assert np.isfinite(first).all() and np.array_equal(run(pipe, options), first) and np.abs(first - vanilla).max() > 0
