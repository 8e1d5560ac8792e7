"""The cost model: MACs counted on meta modules agree with a real forward, and add up over plans."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from postdiff import UNetSplit, compile_plan, load_recipe
from postdiff.plan.compiler import ModelSpec
from postdiff.plan.cost import plan_cost
from postdiff.pytorch.macs import MacCounter
from postdiff_lab.architectures import SD15, TOY_SD, TOY_SDXL
from postdiff_lab.toy import build_unet


@pytest.mark.parametrize("arch", [TOY_SD, TOY_SDXL], ids=lambda a: a.name)
def test_meta_count_equals_a_real_forward(arch):
    counter = MacCounter(arch.unet, pooled_dim=arch.pooled_dim)
    unet = build_unet(arch)
    kw = {
        "sample": torch.randn(2, 4, 16, 16),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(2, 77, arch.cross_attention_dim),
    }
    if arch.is_sdxl:
        kw |= {"text_embeds": torch.randn(2, arch.pooled_dim), "time_ids": torch.ones(2, 6)}
    with torch.no_grad(), UNetSplit(unet) as split:
        eps, deep = split.forward("full", **kw)
        for variant, extra in (("full", {}), ("shallow", {"deep": deep})):
            # the math SDPA backend spells attention as matmuls, which the counter sees (as on meta)
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                split.forward(variant, **kw, **extra)
            real = fc.get_total_flops() // 2
            assert counter.macs(variant, (16, 16), 2) == pytest.approx(real, rel=0.02)


def test_costs_scale_as_expected_for_sd15():
    c = MacCounter(SD15.unet)
    full64, full32 = c.macs("full", (64, 64), 2), c.macs("full", (32, 32), 2)
    assert 0.15 < full32 / full64 < 0.3  # a quarter of the pixels, attention shrinks quadratically
    assert c.macs("full", (64, 64), 1) * 2 == pytest.approx(full64, rel=1e-6)
    assert c.macs("shallow", (64, 64), 2) < 0.3 * full64
    assert c.macs("full_cached", (64, 64), 1) < c.macs("full", (64, 64), 1)


def test_postdiff_plan_cost_on_sd15_matches_the_paper_order_of_magnitude():
    spec = ModelSpec("sd15", 8, 4, True)
    ts = [999 - 50 * i for i in range(20)]
    plan = compile_plan(load_recipe("postdiff"), timesteps=ts, latent_hw=(64, 64), model=spec)
    base = compile_plan(load_recipe("baseline"), timesteps=ts, latent_hw=(64, 64), model=spec)
    cost = plan_cost(plan, MacCounter(SD15.unet), base)
    assert cost.reduction >= 0.60  # the paper: 63.4%
    steps8 = compile_plan(load_recipe("steps:8"), timesteps=ts[:8], latent_hw=(64, 64), model=spec)
    assert plan_cost(steps8, MacCounter(SD15.unet), base).ratio == pytest.approx(0.4, rel=1e-9)
    assert plan_cost(base, MacCounter(SD15.unet), base).ratio == 1.0
