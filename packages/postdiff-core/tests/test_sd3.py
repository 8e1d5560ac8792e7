"""Stable Diffusion 3 (an MMDiT trained on a rectified flow) through postdiff.apply: equivalence with the vanilla
pipeline under its own scheduler and another flow solver, block caching of a span of joint blocks (both token
streams), the text stream's keys and values standing in for cross-attention, the flow-matching resolution switch,
schedulers a flow model can and cannot use, the cost model and ``arch:sd3-medium``."""

import numpy as np
import pytest
import torch
from core_helpers import check_plans_against_vanilla, cost_against_baseline, gen, make_pipe

import postdiff
from postdiff.errors import ModelError, RecipeError
from postdiff.families.model import load_model
from postdiff.loop.conditioning import Conditioning
from postdiff.loop.resolution import check_switchable, noise_level, predict_x0, renoise
from postdiff.plan.cost import plan_cost
from postdiff.pytorch.backbone import split_for
from postdiff.pytorch.diffusers_hook import last_plan

SCHEDULERS = ["flow-euler", "flow-dpmpp-2m"]  # SD3's own, and DPM-Solver++ on flow sigmas (SANA's solver)
SIZE = dict(height=128, width=128)  # a 16x16 latent, 8x8 patches


@pytest.fixture(scope="module")
def pipe():
    return make_pipe("sd3", None)


def run(pipe, seed=1, steps=20, **kw):
    return pipe("a red apple", num_inference_steps=steps, generator=gen(seed), output_type="latent", **SIZE, **kw).images


def test_the_toy_is_sd3_and_recognised(pipe):
    model = load_model("toy-sd3", need_pipeline=True)
    spec = model.spec()
    assert model.family.name == "sd3" and spec.is_transformer and spec.num_layers == 4 and spec.downsample_factor == 2
    assert model.text_len == 77 + 256 and model.pooled_dim == 64
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("scheduler", [*SCHEDULERS, pytest.param("flow-heun", marks=pytest.mark.slow)])
def test_baseline_and_block_caching_at_interval_1_equal_the_vanilla_pipeline(pipe, scheduler):
    original = pipe.scheduler
    pipe.scheduler = load_model("toy-sd3", need_pipeline=True).scheduler(scheduler)
    try:
        exact = (
            "baseline",
            {"deepcache": {"interval": 1}},
            {"deepcache": {"interval": 1, "span": [0, 3]}},
            {"deepcache": {"interval": 1, "span": [2, 4]}},  # the last block (text stream not updated) in the span
            {"low_res": {"scale": 1.0}},
        )
        check_plans_against_vanilla(pipe, run, exact, ("postdiff", "postdiff-sd3", "deepcache", "xattn-gate"))
    finally:
        pipe.scheduler = original


def _inputs(pipe, hw=(16, 16), batch=2, seed=0):
    g = gen(seed)
    cfg = pipe.transformer.config
    x = torch.randn(batch, cfg.in_channels, *hw, generator=g)
    ehs = torch.randn(batch, 9, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    return x, torch.full((batch,), 321.0), Conditioning(ehs, has_uncond=False, text_embeds=pooled)


@pytest.mark.parametrize("span", [None, (1, 2), (0, 3), (2, 4)])
def test_a_cached_step_given_its_own_residual_and_text_keys_equals_the_full_step(pipe, span):
    x, t, cond = _inputs(pipe)
    vanilla = pipe.transformer(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=cond.encoder_hidden_states,
        pooled_projections=cond.text_embeds,
        return_dict=False,
    )[0]
    with torch.no_grad(), split_for(pipe.transformer, span=span) as split:
        out, deep, *text_kv = split.step("full_capture", x, t, cond)
        assert torch.equal(out, vanilla)  # the split computes what the transformer does
        heads, dim = pipe.transformer.config.num_attention_heads, pipe.transformer.config.attention_head_dim
        assert deep.shape == (2, 64 + 9, heads * dim)  # both streams' residuals: 8x8 patches, then 9 text tokens
        assert len(text_kv) == 4 and text_kv[0].shape == (2, heads, 9, 2 * dim)
        (shallow,) = split.step("shallow", x, t, cond, deep)
        assert torch.allclose(shallow, vanilla, atol=1e-5, rtol=0)
        # the image stream alone, with the text's keys and values given, is the joint computation's image half
        cached, _ = split.step("full_cached", x, t, cond, None, text_kv)
        assert torch.allclose(cached, vanilla, atol=1e-5, rtol=0)
        kept = [text_kv[i] for i in split.xattn_indices("shallow_cached")]
        (both,) = split.step("shallow_cached", x, t, cond, deep, kept)
        assert torch.allclose(both, vanilla, atol=1e-5, rtol=0)
        (other,) = split.step("shallow", x, t, cond, torch.zeros_like(deep))
        assert (other - vanilla).abs().max() > 1e-3  # the residual matters
        (stale,) = split.step("shallow_cached", x, t, cond, deep, [torch.zeros_like(k) for k in kept])
        assert (stale - vanilla).abs().max() > 1e-3  # and so do the text keys and values


def test_a_cached_pass_runs_no_text_stream(pipe):
    """After the gate the text stream costs nothing: no context embedding, no text projections or MLP."""
    x, t, cond = _inputs(pipe)
    ran: list[str] = []
    model = pipe.transformer
    watched = {"context_embedder": model.context_embedder}
    watched.update({f"ff_context_{k}": b.ff_context for k, b in enumerate(model.transformer_blocks) if b.ff_context is not None})
    watched.update({f"add_q_{k}": b.attn.add_q_proj for k, b in enumerate(model.transformer_blocks)})
    handles = [m.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, m in watched.items()]
    try:
        with torch.no_grad(), split_for(model) as split:
            _, deep, *text_kv = split.step("full_capture", x, t, cond)
            assert "context_embedder" in ran and "add_q_0" in ran
            ran.clear()
            split.step("full_cached", x, t, cond, None, text_kv)
            split.step("shallow_cached", x, t, cond, deep, [text_kv[i] for i in split.xattn_indices("shallow_cached")])
            assert ran == []
    finally:
        for h in handles:
            h.remove()


def test_the_flow_switch_predicts_x0_and_renoises_on_the_flow_line():
    """x = (1 - sigma) x0 + sigma n and v = n - x0: the switch recovers x0 from v exactly and re-noises to the
    next step's sigma on the same line, for SD3's own scheduler and DPM-Solver on flow sigmas."""
    model = load_model("toy-sd3")
    g = gen(3)
    x0, n = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    for name in SCHEDULERS:
        sch = model.scheduler(name)
        check_switchable(sch)
        sch.set_timesteps(20)
        for i in (0, 7, 19):
            sigma = float(sch.sigmas[i])
            x = (1 - sigma) * x0 + sigma * n
            assert torch.allclose(predict_x0(sch, x, n - x0, i, float(sch.timesteps[i])), x0, atol=1e-5)
            assert torch.allclose(renoise(sch, x0, n, i, float(sch.timesteps[i])), x, atol=1e-6)
            assert noise_level(sch, i, float(sch.timesteps[i])) == pytest.approx(sigma)


def test_mixed_resolution_starts_at_the_low_size_and_switches_at_full_size(pipe):
    postdiff.apply(pipe, "postdiff-sd3")
    try:
        shapes = []
        pipe("a red apple", num_inference_steps=20, generator=gen(1), output_type="latent", **SIZE,
             callback_on_step_end=lambda p, i, t, kw: shapes.append(tuple(kw["latents"].shape[-2:])) or {})  # fmt: skip
        plan = last_plan(pipe)
        assert plan.latent_sizes == [(12, 12), (16, 16)]
        assert shapes[:9] == [(12, 12)] * 9 and shapes[9:] == [(16, 16)] * 11
        assert [s.guidance for s in plan.steps].count("cond") == 10
    finally:
        postdiff.remove(pipe)


def test_schedulers_a_flow_model_cannot_use_are_refused_before_work():
    sd3, sd = load_model("toy-sd3"), load_model("toy-sd")
    for name in ("ddim", "euler", "dpmpp-2m-karras", "DDIMScheduler"):
        with pytest.raises(ModelError, match="rectified flow.*flow-euler"):
            sd3.scheduler(name)
        with pytest.raises(ModelError, match="rectified flow"):
            sd3.compile("postdiff", scheduler=name)
    for name in ("flow-euler", "flow-dpmpp-2m", "FlowMatchEulerDiscreteScheduler"):
        with pytest.raises(ModelError, match="predicts noise"):
            sd.scheduler(name)
    dpm = sd3.scheduler("flow-dpmpp-2m")
    assert dpm.config.flow_shift == 3.0 and dpm.config.use_flow_sigmas  # the model's shift, as its own scheduler's
    dpm.set_timesteps(20)
    sigma = float(dpm.sigmas[10])
    unshifted = sigma / (3.0 - 2.0 * sigma)  # shift s maps t to s t / (1 + (s - 1) t)
    assert 0.3 < unshifted < 0.6 < sigma  # halfway through, the shifted schedule is still mostly noise


def test_arch_sd3_medium_and_the_family_plan_cost():
    model = load_model("arch:sd3-medium")
    spec = model.spec()
    assert spec.num_layers == 24 and spec.downsample_factor == 2 and model.text_len == 333 and model.pooled_dim == 2048
    plan, cost = cost_against_baseline(model, "postdiff-sd3", height=1024, width=1024)
    assert plan.latent_sizes == [(96, 96), (128, 128)]
    per_branch = cost.baseline_macs / 40  # 20 steps, CFG batch 2
    # 24 joint blocks on 4096 patches + 333 text tokens: linear layers (~2.1T) and attention (~0.6T), the published
    # ~2B parameters at ~4.4k tokens
    assert 4.0e12 < per_branch < 5.0e12
    assert cost.reduction >= 0.40


def test_a_recipe_the_mmdit_cannot_run_is_refused_at_apply(pipe):
    for bad, fragment in (
        ({"deepcache": {"span": [0, 4]}}, "transformer of 4 blocks"),
        ({"deepcache": {"block": 3}}, "out of range"),
        ({"low_res": {"scale": 0.5}, "steps": 10}, None),  # fits: 16x16 -> 8x8 latent, 4x4 patches
    ):
        if fragment is None:
            postdiff.apply(pipe, bad)
            postdiff.remove(pipe)
            continue
        with pytest.raises((RecipeError, postdiff.PlanError), match=fragment):
            postdiff.apply(pipe, bad)
        assert postdiff.applied_recipe(pipe) is None


def test_images_decode_through_the_16_channel_vae(pipe):
    postdiff.apply(pipe, "postdiff-sd3")
    try:
        image = pipe("a red apple", num_inference_steps=20, generator=gen(2), output_type="np", **SIZE).images
        assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all()
    finally:
        postdiff.remove(pipe)


def test_arch_flux_dev_costs_plans_and_the_gate_it_cannot_use():
    """FLUX.1-dev for plan cost and plan show: 19 double and 38 single blocks in one span list, 2x2 packing, guidance
    embedded (no CFG batch), the schedule shifted by the token count (mu), and xattn_gate refused in one line."""
    model = load_model("arch:flux-dev")
    spec = model.spec()
    assert spec.num_layers == 57 and spec.downsample_factor == 2 and spec.guidance_embedded and not spec.has_cross_attention
    base = model.compile("baseline", 20)  # the pipeline's 1024 px default
    assert base.latent_hw == (128, 128)
    # FLUX's shift for 4096 tokens (mu 1.15): the second sigma is higher than the static shift 3 gives
    assert base.steps[1].timestep > 982.0
    plan = model.compile("postdiff-flux", 20)
    cost = plan_cost(plan, model.mac_counter(plan.recipe), base)
    assert cost.steps[0].batch == 1  # one branch per step: guidance is an input
    assert 30e12 < cost.baseline_macs / 20 < 45e12  # ~12B parameters on 4,096 patches and 512 text tokens
    assert 0.40 < cost.ratio < 0.50
    with pytest.raises(RecipeError, match=r"xattn_gate needs cross-attention, and arch:flux-dev has none \(nor a CFG branch"):
        model.compile("postdiff", 20)
