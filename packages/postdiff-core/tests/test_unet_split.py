"""The UNet split: every variant against the vanilla forward, on SD- and SDXL-shaped UNets."""

import pytest
import torch

from postdiff import ModelError, UNetSplit, model_spec
from postdiff_lab.architectures import TOY_SD, TOY_SDXL
from postdiff_lab.toy import build_unet


def inputs(arch, batch=2, hw=(16, 16)):
    torch.manual_seed(1)
    kw = {
        "sample": torch.randn(batch, 4, *hw),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 77, arch.cross_attention_dim),
    }
    added = None
    if arch.is_sdxl:
        kw["text_embeds"] = torch.randn(batch, arch.pooled_dim)
        kw["time_ids"] = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * batch)
        added = {"text_embeds": kw["text_embeds"], "time_ids": kw["time_ids"]}
    return kw, added


@pytest.mark.parametrize("arch", [TOY_SD, TOY_SDXL], ids=lambda a: a.name)
@pytest.mark.parametrize("hw", [(16, 16), (8, 12)])
def test_every_variant_matches_the_vanilla_unet_exactly(arch, hw):
    unet = build_unet(arch)
    kw, added = inputs(arch, hw=hw)
    with torch.no_grad():
        ref = unet(kw["sample"], kw["timestep"], kw["encoder_hidden_states"], added_cond_kwargs=added).sample
        with UNetSplit(unet) as split:
            eps, deep = split.forward("full", **kw)
            assert torch.equal(eps, ref)
            # a shallow step given the cache from the same step equals the full step exactly
            (shallow,) = split.forward("shallow", **kw, deep=deep)
            assert torch.equal(shallow, ref)
            captured = split.forward("full_capture", **kw)
            assert torch.equal(captured[0], ref) and len(captured) == 2 + split.num_xattn
            eps_cached, _ = split.forward("full_cached", **kw, xattn=captured[2:])
            assert torch.equal(eps_cached, ref)
            sub = [captured[2 + i] for i in split.xattn_indices("shallow_cached")]
            (eps_sc,) = split.forward("shallow_cached", **kw, deep=deep, xattn=sub)
            assert torch.equal(eps_sc, ref)
        # the wrappers are gone afterwards and the UNet is untouched
        assert torch.equal(unet(kw["sample"], kw["timestep"], kw["encoder_hidden_states"], added_cond_kwargs=added).sample, ref)
    assert not any(type(m.processor).__name__ == "_XAttnProcessor" for m in unet.modules() if hasattr(m, "processor"))


def test_stale_cache_changes_the_output():
    """Guards against a shallow pass that silently ignores its cache."""
    unet = build_unet(TOY_SD)
    kw, _ = inputs(TOY_SD)
    with torch.no_grad(), UNetSplit(unet) as split:
        eps, deep = split.forward("full", **kw)
        (other,) = split.forward("shallow", **kw, deep=deep * 0.5)
    assert not torch.allclose(eps, other)


def test_shallow_pass_is_cheaper_and_cuts_where_deepcache_does():
    unet = build_unet(TOY_SD)
    with UNetSplit(unet, block=0) as split:
        # conv_in and the first (resnet, attention) layer of down block 0; the mirrored up layers
        assert split.cut == 1
        assert len(split.shallow_up) == 2
        assert split.shallow_xattn == [0, 4, 5]


def test_variant_modules_export_with_torch_export():
    unet = build_unet(TOY_SD)
    kw, _ = inputs(TOY_SD)
    with torch.no_grad(), UNetSplit(unet) as split:
        eps, deep = split.forward("full", **kw)
        module = split.module("shallow")
        assert module.input_names() == ["sample", "timestep", "encoder_hidden_states", "deep"]
        ep = torch.export.export(module, (kw["sample"], kw["timestep"], kw["encoder_hidden_states"], deep))
        (out,) = ep.module()(kw["sample"], kw["timestep"], kw["encoder_hidden_states"], deep)
    assert torch.allclose(out, eps, atol=1e-5)


def test_model_spec_and_unsupported_models():
    spec = model_spec(build_unet(TOY_SD))
    assert spec.downsample_factor == 2 and spec.has_cross_attention and spec.num_down_blocks == 2
    from diffusers import UNet2DModel

    with pytest.raises(ModelError, match="UNet2DConditionModel"):
        UNetSplit(
            UNet2DModel(
                block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=32
            )
        )
    with pytest.raises(ModelError, match="out of range"):
        UNetSplit(build_unet(TOY_SD), block=5)


def test_cpu_convolution_paths_agree_and_auto_keeps_one_choice_per_shape(monkeypatch):
    from postdiff.errors import PostDiffError
    from postdiff.pytorch.cpu_conv import ConvPath

    unet = build_unet(TOY_SD)
    kw, _ = inputs(TOY_SD)
    outs = {}
    for mode in ("onednn", "native", "auto"):
        with UNetSplit(unet, cpu_conv=mode) as split, torch.no_grad():
            outs[mode] = split.forward("full", **kw)[0]
            if mode == "auto":
                assert list(split.conv_path.chosen) == [("full", (2, 4, 16, 16))]
    for mode in ("native", "auto"):
        torch.testing.assert_close(outs[mode], outs["onednn"], rtol=1e-4, atol=1e-5)
    calls = []
    path = ConvPath("auto")
    assert path.run("k", True, lambda: calls.append(1) or len(calls)) == 5  # 4 timed tries, then the call itself
    assert path.run("k", True, lambda: calls.append(1) or len(calls)) == 6  # decided: one call
    monkeypatch.setenv("POSTDIFF_CPU_CONV", "fast")
    with pytest.raises(PostDiffError, match="POSTDIFF_CPU_CONV must be one of onednn, native, auto"):
        UNetSplit(unet)


def test_full_is_cut_out_of_full_capture_only_when_it_comes_first():
    """``unet_graphs``: a plan with both variants lets an exporter cut ``full`` out of ``full_capture``'s traced graph
    (the same inputs, its outputs first); when ``full_capture`` came first it would be finished (quantized) before
    ``full``'s turn, so ``full`` is traced on its own then."""
    from types import SimpleNamespace

    from postdiff.bundle.export import prepare_export, split_for
    from postdiff.pytorch.graphs import unet_graphs

    job = prepare_export("reference", "postdiff")
    with split_for(job.model.network(), job.plan.recipe) as split:
        sources = {s.variant: s for s in unet_graphs(split, job.plan, text_len=job.model.text_len, pooled_dim=job.model.pooled_dim)}
        full, capture = sources["full"], sources["full_capture"]
        assert full.outputs_of is capture and capture.outputs_of is None
        assert full.input_names == capture.input_names and capture.output_names[:2] == full.output_names == ["eps", "deep"]
        assert all(s.outputs_of is None for v, s in sources.items() if v != "full")
        hw = tuple(job.latent_hw)
        reordered = SimpleNamespace(variants=lambda: [("full_capture", hw), ("full", hw)])
        again = unet_graphs(split, reordered, text_len=job.model.text_len, pooled_dim=job.model.pooled_dim)
        assert [s.variant for s in again] == ["full_capture", "full"] and all(s.outputs_of is None for s in again)
