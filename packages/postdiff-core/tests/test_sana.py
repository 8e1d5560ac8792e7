"""SANA (a linear-attention DiT trained on a rectified flow) through postdiff.apply: equivalence with the vanilla
pipeline under its own scheduler (DPM-Solver++ on flow sigmas) and flow-matching Euler, block caching of a span of
blocks, cross-attention caching, the flow switch, the pipeline's resolution bins and 1024 px default, schedulers
it cannot use, and ``arch:sana-1600m``."""

import pytest
import torch
from core_helpers import check_plans_against_vanilla, cost_against_baseline, gen, make_pipe

import postdiff
from postdiff.errors import ModelError
from postdiff.families.model import load_model
from postdiff.loop.conditioning import Conditioning
from postdiff.pytorch.backbone import split_for
from postdiff.pytorch.diffusers_hook import last_plan

SIZE = dict(height=256, width=256, use_resolution_binning=False)  # an 8x8 latent (SANA's DC-AE downsamples 32x)


@pytest.fixture(scope="module")
def pipe():
    return make_pipe("sana", None)


def run(pipe, seed=1, steps=20, **kw):
    return pipe("a red apple", num_inference_steps=steps, generator=gen(seed), output_type="latent", **{**SIZE, **kw}).images


def test_the_toy_is_sana_and_recognised(pipe):
    model = load_model("toy-sana", need_pipeline=True)
    spec = model.spec()
    assert model.family.name == "sana" and spec.is_transformer and spec.num_layers == 4 and spec.downsample_factor == 1
    assert model.text_len == 300 and model.vae_scale_factor == 32
    sch = pipe.scheduler
    assert type(sch).__name__ == "DPMSolverMultistepScheduler" and sch.config.prediction_type == "flow_prediction"


@pytest.mark.parametrize("scheduler", [None, "flow-euler"])
def test_baseline_and_block_caching_at_interval_1_equal_the_vanilla_pipeline(pipe, scheduler):
    original = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = load_model("toy-sana", need_pipeline=True).scheduler(scheduler)
    try:
        exact = ("baseline", {"deepcache": {"interval": 1}}, {"deepcache": {"interval": 1, "span": [0, 3]}}, {"low_res": {"scale": 1.0}})
        check_plans_against_vanilla(pipe, run, exact, ("postdiff-sana", "postdiff-dit", "postdiff", "xattn-gate"))
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("span", [None, (1, 2), (0, 3), (2, 4)])
def test_a_cached_step_given_its_own_residual_and_cross_attention_equals_the_full_step(pipe, span):
    g = gen(0)
    cfg = pipe.transformer.config
    x, t = torch.randn(2, cfg.in_channels, 6, 10, generator=g), torch.full((2,), 321.0)
    mask = torch.ones(2, 7)
    mask[:, 5:] = 0
    cond = Conditioning(torch.randn(2, 7, cfg.caption_channels, generator=g), has_uncond=False, encoder_attention_mask=mask)
    vanilla = pipe.transformer(
        x, encoder_hidden_states=cond.encoder_hidden_states, timestep=t, encoder_attention_mask=mask, return_dict=False
    )[0]
    with torch.no_grad(), split_for(pipe.transformer, span=span) as split:
        out, deep, *xattn = split.step("full_capture", x, t, cond)
        assert torch.equal(out, vanilla)  # the split computes what the transformer does (its conv MLP on the 6x10 grid)
        (shallow,) = split.step("shallow", x, t, cond, deep)
        assert torch.allclose(shallow, vanilla, atol=1e-5, rtol=0)
        kept = [xattn[i] for i in split.xattn_indices("shallow_cached")]
        (cached,) = split.step("shallow_cached", x, t, cond, deep, kept)
        assert torch.allclose(cached, vanilla, atol=1e-5, rtol=0)
        (other,) = split.step("shallow_cached", x, t, cond, deep, [torch.zeros_like(k) for k in kept])
        assert (other - vanilla).abs().max() > 1e-3


def test_the_pipelines_1024_px_default_and_its_bins_are_planned(pipe):
    postdiff.apply(pipe, "postdiff-sana")
    try:
        pipe("a red apple", num_inference_steps=20, generator=gen(1), output_type="latent")  # SANA's own 1024 px
        assert last_plan(pipe).latent_sizes == [(24, 24), (32, 32)]
        pipe("a red apple", num_inference_steps=20, generator=gen(1), output_type="latent", height=600, width=1000)
        assert last_plan(pipe).latent_hw == (24, 40)  # the nearest 1024-px bin, 768x1280, as the pipeline generates
    finally:
        postdiff.remove(pipe)


def test_schedulers_a_flow_model_cannot_use_are_refused_and_flow_euler_takes_its_shift():
    sana = load_model("toy-sana")
    # dpmpp-2m-karras is SANA's own class with settings that would leave its flow sigmas: refused all the same
    for name in ("ddim", "euler-a", "dpmpp-2m-karras", "dpmpp-2m"):
        with pytest.raises(ModelError, match="rectified flow"):
            sana.compile("postdiff-sana", scheduler=name)
    assert sana.compile("postdiff-sana", scheduler="DPMSolverMultistepScheduler").scheduler == "flow-dpmpp-2m"  # its own
    euler = sana.scheduler("flow-euler")
    assert euler.config.shift == 3.0  # SANA's flow_shift, under the key FlowMatch schedulers read
    own = sana.scheduler(None)
    euler.set_timesteps(20)
    own.set_timesteps(20)
    assert abs(float(euler.sigmas[10]) - float(own.sigmas[10])) < 0.05  # the same shifted noise levels, give or take


def test_arch_sana_1600m_and_the_family_plan_cost():
    model = load_model("arch:sana-1600m")
    spec = model.spec()
    assert spec.num_layers == 20 and spec.downsample_factor == 1 and model.text_len == 300 and model.vae_scale_factor == 32
    plan, cost = cost_against_baseline(model, "postdiff-sana", height=1024, width=1024)
    assert plan.latent_sizes == [(24, 24), (32, 32)]
    per_branch = cost.baseline_macs / 40
    assert 1.3e12 < per_branch < 1.7e12  # ~1.6B parameters on 1,024 patches (linear attention: no quadratic term)
    assert cost.reduction >= 0.45


def test_the_cli_source_leaves_the_size_to_the_pipeline_when_none_is_asked():
    """postdiff generate/eval without --height: SANA's pipeline default (1024 px), not a None it refuses."""
    from postdiff_lab.generation import source_for

    source = source_for(load_model("toy-sana", need_pipeline=True))
    batch = source.generate("postdiff-sana", 1, seed=2)
    assert batch.images.shape == (1, 1024, 1024, 3)
    assert source.compile("postdiff-sana").latent_hw == (32, 32)
