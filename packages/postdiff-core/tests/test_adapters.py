"""LoRA (fused and unfused, with a scale) and IP-Adapter under plans, on toy pipelines with random-weight adapters
built here and loaded the way users load them (``load_lora_weights`` from a folder, ``load_ip_adapter``)."""

import numpy as np
import pytest
import torch
from core_helpers import gen, make_pipe

import postdiff

pytest.importorskip("peft", reason="LoRA needs peft (installed by scripts/setup.sh)")

STEPS = 6
POSTDIFF = {"steps": STEPS, "low_res": {"scale": 0.5, "until": 0.5}, "deepcache": {"interval": 2}, "xattn_gate": {"after": 3}}
EXACT = ["baseline", {"steps": STEPS, "deepcache": {"interval": 1}}]

# SDXL with -m slow (each of its cases is 1-2 minutes on 2 cores); SD by default
KINDS = ["sd", pytest.param("sdxl", marks=pytest.mark.slow)]


def lora_folder(kind: str, tmp_path):
    """A random LoRA on the UNet's attention projections, saved as a diffusers LoRA folder."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = make_pipe(kind)
    torch.manual_seed(7)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    layers = get_peft_model_state_dict(pipe.unet)
    type(pipe).save_lora_weights(tmp_path, unet_lora_layers=layers, safe_serialization=True)
    return tmp_path


def run(pipe, seed=1, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe("a cat", generator=gen(seed), output_type="np", **kw).images


@pytest.mark.parametrize("kind", KINDS)
def test_lora_unfused_with_a_scale_and_fused(kind, tmp_path):
    pipe = make_pipe(kind)
    plain = run(pipe)
    pipe.load_lora_weights(str(lora_folder(kind, tmp_path)), adapter_name="toy")
    for scale in (0.5, 1.0):
        options = {"cross_attention_kwargs": {"scale": scale}}
        postdiff.remove(pipe)
        vanilla = run(pipe, **options)
        assert np.abs(vanilla - plain).max() > 1e-3  # the LoRA changes the image
        for plan in EXACT:
            postdiff.apply(pipe, plan)
            assert np.abs(run(pipe, **options) - vanilla).max() <= 1e-6, (plan, scale)
        postdiff.apply(pipe, POSTDIFF)
        first = run(pipe, **options)
        assert np.array_equal(run(pipe, **options), first)
    # the scale reaches the LoRA layers: 0.5 and 1.0 give different images under the plan too
    assert not np.array_equal(run(pipe, cross_attention_kwargs={"scale": 0.5}), run(pipe, cross_attention_kwargs={"scale": 1.0}))
    # fused (weights merged into the UNet), then with the LoRA layers unloaded
    postdiff.remove(pipe)
    pipe.fuse_lora(lora_scale=0.7)
    fused = run(pipe)
    for plan in EXACT:
        postdiff.apply(pipe, plan)
        assert np.abs(run(pipe) - fused).max() <= 1e-6
    postdiff.remove(pipe)
    pipe.unload_lora_weights()
    unloaded = run(pipe)
    assert np.abs(unloaded - fused).max() <= 1e-4 and np.abs(unloaded - plain).max() > 1e-3
    postdiff.apply(pipe, "baseline")
    assert np.abs(run(pipe) - unloaded).max() <= 1e-6


def load_toy_ip_adapter(pipe, clip_dim: int = 16, seed: int = 9):
    """A random plain IP-Adapter (image projection to 4 tokens, key/value projections per cross-attention layer),
    given to ``load_ip_adapter`` as a state dict; the image embeddings are passed to the call, so no image encoder."""
    g = gen(seed)
    unet = pipe.unet
    cross = int(unet.config.cross_attention_dim)
    image_proj = {
        "proj.weight": torch.randn(4 * cross, clip_dim, generator=g) * 0.2,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.rsplit(".", 1)[0]).to_k.weight.shape[0]
            ip[f"{key}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.2
            ip[f"{key}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.2
            key += 2
    pipe.load_ip_adapter(
        {"image_proj": image_proj, "ip_adapter": ip}, subfolder="", weight_name="toy-ip-adapter.bin", image_encoder_folder=None
    )
    pipe.set_ip_adapter_scale(0.8)
    return torch.randn(2, 1, clip_dim, generator=g)  # negative then positive image embedding, as pipelines take them


@pytest.mark.parametrize("kind", KINDS)
def test_ip_adapter_tokens_are_used_on_computed_steps_and_cached_on_gated_ones(kind):
    pipe = make_pipe(kind)
    plain = run(pipe)
    embeds = load_toy_ip_adapter(pipe)
    options = {"ip_adapter_image_embeds": [embeds]}
    vanilla = run(pipe, **options)
    assert np.abs(vanilla - plain).max() > 1e-3  # the adapter's image tokens change the image
    for plan in EXACT:
        postdiff.apply(pipe, plan)
        assert np.abs(run(pipe, **options) - vanilla).max() <= 1e-6, plan
    # cross-attention caching on gated steps replays the attention outputs, image tokens included: a gated plan that
    # ignored them would equal the same plan run with the image embedding zeroed
    postdiff.apply(pipe, POSTDIFF)
    first = run(pipe, **options)
    assert np.array_equal(run(pipe, **options), first)
    other = run(pipe, ip_adapter_image_embeds=[torch.flip(embeds, [0])])
    assert np.abs(first - other).max() > 1e-3
    postdiff.remove(pipe)
    assert np.abs(run(pipe, **options) - vanilla).max() <= 1e-6


def test_captured_cross_attention_carries_the_ip_adapter_tokens():
    """What a gated step replays is the attn2 output captured on the last CFG step, IP-Adapter part included:
    captures made with two image embeddings differ, and a cached pass replaying a capture equals the full pass."""
    from postdiff.pytorch.unet import UNetSplit

    pipe = make_pipe("sd")
    embeds = load_toy_ip_adapter(pipe)
    unet = pipe.unet
    g = gen(2)
    sample, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor(400.0)
    ehs = torch.randn(1, 8, unet.config.cross_attention_dim, generator=g)
    with UNetSplit(unet, 0) as split, torch.no_grad():

        def capture(e):
            return split.forward("full_capture", sample, t, ehs, image_embeds=[e])

        a, b = capture(embeds[1:]), capture(embeds[:1])
        assert all(not torch.allclose(x, y) for x, y in zip(a[2:], b[2:]))
        vanilla = unet(sample, t, ehs, added_cond_kwargs={"image_embeds": [embeds[1:]]}).sample
        assert torch.abs(a[0] - vanilla).max() <= 1e-5
        cached = split.forward("full_cached", sample, t, ehs, None, None, None, tuple(a[2:]), image_embeds=[embeds[:1]])[0]
        assert torch.allclose(cached, a[0], atol=1e-5)  # the replayed outputs win over the call's own image tokens
