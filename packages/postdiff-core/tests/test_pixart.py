"""PixArt-α / PixArt-Σ (a DiT) through postdiff.apply: equivalence with the vanilla pipelines, block caching (the
Δ-cache of a span of transformer blocks), the low-resolution phase's patches and resolution conditioning, the
recipe's span, the cost model and ``arch:pixart-alpha``."""

import numpy as np
import pytest
import torch
from core_helpers import check_plans_against_vanilla, gen, make_pipe

import postdiff
import postdiff.pytorch.transformer
from postdiff.errors import RecipeError
from postdiff.families.model import load_model
from postdiff.loop.conditioning import Conditioning
from postdiff.plan.compiler import block_span
from postdiff.plan.recipe import Recipe, load_recipe
from postdiff.pytorch.backbone import split_for
from postdiff.pytorch.diffusers_hook import last_plan

KINDS = {"pixart": dict(height=128, width=128, use_resolution_binning=False), "pixart-sigma": {}}
SCHEDULERS = ["DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler"]


@pytest.fixture(scope="module", params=list(KINDS))
def toy(request):
    return request.param, make_pipe(request.param, "DPMSolverMultistepScheduler")


def run(pipe, kind, seed=1, steps=20, **kw):
    return pipe(
        "A Red Apple ", num_inference_steps=steps, generator=gen(seed), output_type="np", clean_caption=False, **KINDS[kind], **kw
    ).images


def test_the_toys_are_pixart_and_recognised(toy):
    kind, pipe = toy
    assert type(pipe).__name__ == ("PixArtSigmaPipeline" if kind == "pixart-sigma" else "PixArtAlphaPipeline")
    model = load_model("toy-" + kind, need_pipeline=True)
    spec = model.spec()
    assert model.family.name == "pixart" and spec.is_transformer and spec.num_layers == 4 and spec.downsample_factor == 2
    assert model.text_len == (300 if kind == "pixart-sigma" else 120)
    # the α toy keeps PixArt-α 1024's resolution conditioning, the Σ toy has none
    assert pipe.transformer.use_additional_conditions == (kind == "pixart")


@pytest.mark.parametrize("scheduler", [SCHEDULERS[0], *(pytest.param(s, marks=pytest.mark.slow) for s in SCHEDULERS[1:])])
def test_baseline_equals_vanilla_diffusers(toy, scheduler):
    kind, pipe = toy
    original = pipe.scheduler
    pipe.scheduler = load_model("toy-" + kind, need_pipeline=True).scheduler(scheduler)
    try:
        exact = ("baseline", {"deepcache": {"interval": 1}}, {"deepcache": {"interval": 1, "span": [0, 3]}}, {"low_res": {"scale": 1.0}})
        check_plans_against_vanilla(pipe, lambda p: run(p, kind), exact, ["postdiff-dit"])
    finally:
        pipe.scheduler = original


def _inputs(pipe, hw=(16, 16), batch=2, seed=0):
    g = gen(seed)
    cfg = pipe.transformer.config
    mask = torch.ones(batch, 7)
    mask[:, 5:] = 0
    resolution = torch.tensor([[8.0 * hw[0], 8.0 * hw[1]]] * batch) if pipe.transformer.use_additional_conditions else None
    aspect = torch.tensor([[1.0]] * batch) if resolution is not None else None
    return (
        torch.randn(batch, cfg.in_channels, *hw, generator=g),
        torch.full((batch,), 321.0),
        Conditioning(
            torch.randn(batch, 7, cfg.caption_channels, generator=g),
            has_uncond=False,
            encoder_attention_mask=mask,
            resolution=resolution,
            aspect_ratio=aspect,
        ),
    )


@pytest.mark.parametrize("span", [None, (1, 2), (0, 3), (2, 4)])
def test_a_cached_step_given_its_own_residual_equals_the_full_step(toy, span):
    _, pipe = toy
    x, t, cond = _inputs(pipe)
    vanilla = pipe.transformer(
        x,
        encoder_hidden_states=cond.encoder_hidden_states,
        timestep=t,
        encoder_attention_mask=cond.encoder_attention_mask,
        added_cond_kwargs={"resolution": cond.resolution, "aspect_ratio": cond.aspect_ratio},
        return_dict=False,
    )[0]
    with torch.no_grad(), split_for(pipe.transformer, span=span) as split:
        eps, deep, *xattn = split.step("full_capture", x, t, cond)
        assert torch.equal(eps, vanilla)  # the split computes what the transformer does
        assert deep.shape == (2, 8, 8, pipe.transformer.inner_dim)  # (batch, h / patch, w / patch, width)
        (shallow,) = split.step("shallow", x, t, cond, deep)
        assert torch.allclose(shallow, vanilla, atol=1e-5, rtol=0)
        kept = [xattn[i] for i in split.xattn_indices("shallow_cached")]
        (cached,) = split.step("shallow_cached", x, t, cond, deep, kept)
        assert torch.allclose(cached, vanilla, atol=1e-5, rtol=0)
        (other,) = split.step("shallow", x, t, cond, torch.zeros_like(deep))
        assert (other - vanilla).abs().max() > 1e-3  # the residual matters


def test_a_shallow_step_runs_exactly_the_blocks_outside_the_span(toy):
    _, pipe = toy
    x, t, cond = _inputs(pipe)
    ran: list[int] = []
    handles = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(pipe.transformer.transformer_blocks)]
    try:
        with torch.no_grad(), split_for(pipe.transformer, span=(1, 3)) as split:
            deep = split.step("full", x, t, cond)[1]
            assert ran == [0, 1, 2, 3]
            ran.clear()
            split.step("shallow", x, t, cond, deep)
            assert ran == [0, 3]
            assert split.xattn_indices("shallow_cached") == [0, 3]
    finally:
        for h in handles:
            h.remove()


def test_low_resolution_steps_run_fewer_patches_with_scaled_resolution_conditioning():
    pipe = make_pipe("pixart", "DPMSolverMultistepScheduler")
    seen: list[tuple] = []
    original = postdiff.pytorch.transformer.TransformerSplit.forward

    def spy(self, variant, sample, timestep, ehs, mask=None, resolution=None, aspect_ratio=None, *rest):
        seen.append((tuple(sample.shape[-2:]), resolution[0].tolist(), aspect_ratio[0].tolist()))
        return original(self, variant, sample, timestep, ehs, mask, resolution, aspect_ratio, *rest)

    postdiff.pytorch.transformer.TransformerSplit.forward = spy
    try:
        postdiff.apply(pipe, {"steps": 8, "low_res": {"scale": 0.75, "until": 0.5}, "xattn_gate": {"after": 6}})
        pipe("a cat", num_inference_steps=8, generator=gen(0), output_type="np", height=128, width=192, use_resolution_binning=False)
        plan = last_plan(pipe)
    finally:
        postdiff.pytorch.transformer.TransformerSplit.forward = original
        postdiff.remove(pipe)
    assert plan.latent_hw == (16, 24) and plan.steps[0].latent_hw == (12, 18)
    assert seen[0] == ((12, 18), [96.0, 144.0], [np.float32(128 / 192)]) and seen[-1] == ((16, 24), [128.0, 192.0], [np.float32(128 / 192)])


def test_resolution_binning_is_planned_at_the_binned_size():
    pipe = make_pipe("pixart-sigma", "DPMSolverMultistepScheduler")  # 256 px sample size: ASPECT_RATIO_256_BIN
    postdiff.apply(pipe, {"steps": 4, "low_res": {"scale": 0.75, "until": 0.5}})
    try:
        out = pipe("a cat", num_inference_steps=4, generator=gen(0), output_type="np", height=200, width=300).images
        plan = last_plan(pipe)
    finally:
        postdiff.remove(pipe)
    assert out.shape == (1, 200, 300, 3)  # resized back by the pipeline
    assert plan.latent_hw[0] % 2 == 0 and plan.latent_hw[1] % 2 == 0 and tuple(plan.latent_hw) != (25, 37)  # the bin's size


def test_span_in_recipes_and_its_errors():
    r = Recipe.from_dict({"deepcache": {"interval": 2, "span": [4, 24]}})
    assert r.cache_span == (4, 24) and Recipe.from_dict(r.to_dict()) == r and r.to_dict()["deepcache"]["span"] == [4, 24]
    assert "span" not in load_recipe("deepcache").to_dict()["deepcache"]  # recipes without a span read as before
    for bad in ([3], [5, 2], [-1, 2], "4-24", [1.5, 3]):
        with pytest.raises(RecipeError, match="span"):
            Recipe.from_dict({"deepcache": {"span": bad}})
    sd = load_model("toy-sd")
    with pytest.raises(RecipeError, match="UNet; use deepcache.block"):
        sd.compile({"deepcache": {"span": [1, 2]}})
    pixart = load_model("toy-pixart")
    for bad in ({"span": [0, 4]}, {"span": [2, 5]}, {"block": 1}):
        with pytest.raises(RecipeError, match="transformer of 4 blocks"):
            pixart.compile({"deepcache": bad}, height=128, width=128)
    assert block_span(28, 0) == (1, 27) and block_span(28, 3) == (4, 24) and block_span(4, 0, [0, 2]) == (0, 2)


def test_arch_pixart_alpha_and_the_postdiff_dit_cost():
    model = load_model("arch:pixart-alpha")
    spec = model.spec()
    assert spec.num_layers == 28 and spec.downsample_factor == 2 and model.text_len == 120
    plan = model.compile("postdiff-dit", 20, height=1024, width=1024)
    assert plan.latent_sizes == [(96, 96), (128, 128)]
    base = model.compile("baseline", 20, height=1024, width=1024)
    from postdiff.plan.cost import plan_cost

    cost = plan_cost(plan, model.mac_counter(plan.recipe), base)
    per_branch = cost.baseline_macs / 40  # 20 steps, CFG batch 2
    assert 3.0e12 < per_branch < 3.5e12  # linear layers (~2.1T) and attention matmuls (~1.1T) of 28 blocks on 4096 patches
    assert cost.reduction >= 0.361  # the paper's -36.1% on PixArt-α


def test_a_recipe_the_transformer_cannot_run_is_refused_at_apply(toy):
    kind, pipe = toy
    for bad, fragment in (
        ({"deepcache": {"span": [0, 4]}}, "transformer of 4 blocks"),  # nothing left computed
        ({"deepcache": {"span": [2, 9]}}, "transformer of 4 blocks"),
        ({"deepcache": {"block": 3}}, "out of range"),
        ({"steps": 10, "deepcache": {"interval": 2, "schedule": "nonuniform", "center": 0.5, "power": 1.02}}, "nonuniform"),
    ):
        with pytest.raises((RecipeError, postdiff.PlanError), match=fragment):
            postdiff.apply(pipe, bad)
        assert postdiff.applied_recipe(pipe) is None  # refused: the pipeline is left as it was
    for bad in ({"span": [-1, 2]}, {"span": [2, 2]}):  # negative and empty spans: refused as the recipe is read
        with pytest.raises(RecipeError, match="span"):
            postdiff.apply(pipe, {"deepcache": bad})
