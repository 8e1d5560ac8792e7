"""Tiny Stable Diffusion / SDXL / LCM / PixArt-α / PixArt-Σ / SD3 / SANA pipelines with random weights, built offline.

Tests and the offline demo need real diffusers pipelines (tokenizer, text encoder, UNet, VAE, scheduler)
without a download. diffusers' own tests fetch tiny models from the Hub; here every part is built from a
config, and the CLIP tokenizer from a byte-level vocabulary written below (no merges: one token per byte),
because no tokenizer files can be fetched offline. PixArt's T5 tokenizer is built the same way with the
``tokenizers`` package (one token per byte, ``</s>`` appended, ``<pad>`` = 0), its T5 encoder from a tiny config.
"""

from __future__ import annotations

import torch

from .architectures import (
    TOY_LCM,
    TOY_PIXART,
    TOY_PIXART_SIGMA,
    TOY_SANA,
    TOY_SD,
    TOY_SD3,
    TOY_SD_INPAINT,
    TOY_SDXL,
    TOY_SDXL_REFINER,
    Architecture,
)

TEXT_HIDDEN = 32


def _byte_vocab() -> dict[str, int]:
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to code points from 256 up.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for b in range(256):
            vocab[chars[b] + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def toy_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=_byte_vocab(), merges=[])
    tok.model_max_length = max_length
    return tok


def _text_encoder(seed: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(_byte_vocab()),
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=len(_byte_vocab()) - 2,
        eos_token_id=len(_byte_vocab()) - 1,
        pad_token_id=len(_byte_vocab()) - 1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def save_toy_clip(folder, seed: int = 0):
    """A tiny random-weight CLIP model and its processor (32 px images, the byte tokenizer) saved in ``folder``, as a
    user's ``--clip DIR`` would be: for tests of CLIP score offline (its scores mean nothing). Returns the folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    n = len(_byte_vocab())
    text = dict(hidden_size=TEXT_HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=n)
    text.update(max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval().save_pretrained(str(folder))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=toy_tokenizer()).save_pretrained(str(folder))
    return folder


def toy_t5_tokenizer(max_length: int = 120):
    """A T5-style tokenizer without files: one token per byte (after ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), ``</s>``
    appended, padded with ``<pad>``: what PixArt's pipelines need from a tokenizer (padding, truncation, the mask)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for token in _byte_vocab():
        if not token.endswith("</w>") and not token.startswith("<|"):
            vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _t5_encoder(seed: int, width: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(toy_t5_tokenizer().get_vocab()),
        d_model=width,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def _vae(seed: int, blocks: int = 2, latent_channels: int = 4, **scaling):
    """A tiny VAE with ``blocks`` resolution levels (scale factor 2 ** (blocks - 1)); ``scaling``: SD3's
    ``scaling_factor`` and ``shift_factor``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64] if blocks == 2 else [32] * blocks,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=32,
        **scaling,
    ).eval()


def build_unet(arch: Architecture, seed: int = 0, device: str | torch.device = "cpu"):
    """The denoising network (UNet or transformer) of ``arch`` with random weights (``device="meta"`` builds it
    without memory, for counting)."""
    from postdiff.pytorch.backbone import build_network

    torch.manual_seed(seed)
    with torch.device(device):
        net = build_network(dict(arch.unet))
    if arch.is_transformer and str(device) != "meta":
        # diffusers initialises PixArt's output projection and adaLN modulation to zero (a trained model has
        # neither): random weights there, so the toy's blocks and caches change its output
        with torch.no_grad():
            for p in net.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0.0, 0.05)
    return net


def build_scheduler(arch: Architecture, kind: str | None = None):
    """The scheduler ``kind`` (a diffusers class name; the one ``arch`` ships with when None) on ``arch``'s schedule."""
    from postdiff.loop.arrays import scheduler_from_config

    return scheduler_from_config(kind or arch.scheduler_class, arch.scheduler)


def toy_pipeline(kind: str = "sd", seed: int = 0, scheduler: str | None = None):
    """A complete tiny ``StableDiffusionPipeline`` (kind="sd"), ``StableDiffusionXLPipeline`` (kind="sdxl"),
    ``LatentConsistencyModelPipeline`` (kind="lcm": a UNet with a guidance embedding, ``LCMScheduler``),
    ``PixArtAlphaPipeline`` (kind="pixart": resolution-conditioned, 1024 px sample size, VAE factor 8) or
    ``PixArtSigmaPipeline`` (kind="pixart-sigma": 256 px sample size), ``StableDiffusionInpaintPipeline`` with a
    9-channel inpainting UNet (kind="sd-inpaint") or an SDXL refiner (kind="sdxl-refiner": ``StableDiffusionXLImg2ImgPipeline``
    with the second text encoder only and an aesthetic score). The scheduler is the kind's own (DDIM for sd and
    sdxl, LCM for lcm, DPM-Solver++ for PixArt) unless named."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    def sd(cls=StableDiffusionPipeline, arch=TOY_SD):  # SD 1.x layout; LCM's pipeline takes the same parts
        return cls(
            vae=_vae(seed + 1),
            text_encoder=_text_encoder(seed + 2, with_projection=False),
            tokenizer=toy_tokenizer(),
            unet=build_unet(arch, seed),
            scheduler=build_scheduler(arch, scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def sdxl():
        return StableDiffusionXLPipeline(
            vae=_vae(seed + 1),
            text_encoder=_text_encoder(seed + 2, with_projection=False),
            text_encoder_2=_text_encoder(seed + 3, with_projection=True),
            tokenizer=toy_tokenizer(),
            tokenizer_2=toy_tokenizer(),
            unet=build_unet(TOY_SDXL, seed),
            scheduler=build_scheduler(TOY_SDXL, scheduler),
            force_zeros_for_empty_prompt=False,
        )

    def lcm():
        return sd(LatentConsistencyModelPipeline, TOY_LCM)

    def sd_inpaint():
        from diffusers import StableDiffusionInpaintPipeline

        return sd(StableDiffusionInpaintPipeline, TOY_SD_INPAINT)

    def sdxl_refiner():
        from diffusers import StableDiffusionXLImg2ImgPipeline

        return StableDiffusionXLImg2ImgPipeline(
            vae=_vae(seed + 1),
            text_encoder=None,
            text_encoder_2=_text_encoder(seed + 3, with_projection=True),
            tokenizer=None,
            tokenizer_2=toy_tokenizer(),
            unet=build_unet(TOY_SDXL_REFINER, seed + 4),
            scheduler=build_scheduler(TOY_SDXL_REFINER, scheduler),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )

    def pixart(sigma: bool = False):
        from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

        arch = TOY_PIXART_SIGMA if sigma else TOY_PIXART
        return (PixArtSigmaPipeline if sigma else PixArtAlphaPipeline)(
            tokenizer=toy_t5_tokenizer(arch.text_len),
            text_encoder=_t5_encoder(seed + 2, int(arch.unet["caption_channels"])),
            vae=_vae(seed + 1, blocks=4),
            transformer=build_unet(arch, seed),
            scheduler=build_scheduler(arch, scheduler),
        )

    def sd3():
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=build_unet(TOY_SD3, seed),
            scheduler=build_scheduler(TOY_SD3, scheduler),
            vae=_vae(seed + 1, blocks=4, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),  # SD3's VAE's
            text_encoder=_text_encoder(seed + 2, with_projection=True),
            tokenizer=toy_tokenizer(),
            text_encoder_2=_text_encoder(seed + 3, with_projection=True),
            tokenizer_2=toy_tokenizer(),
            text_encoder_3=_t5_encoder(seed + 5, int(TOY_SD3.unet["joint_attention_dim"])),
            tokenizer_3=toy_t5_tokenizer(256),
        )

    def sana():
        from diffusers import AutoencoderDC, SanaPipeline
        from transformers import Gemma2Config, Gemma2Model

        torch.manual_seed(seed + 1)
        levels = 6  # SANA's DC-AE downsamples 32x (the pipeline's 1024 px default is a 32x32 latent): so does this one
        vae = AutoencoderDC(
            latent_channels=8, attention_head_dim=8, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
            encoder_block_out_channels=(8,) * levels, decoder_block_out_channels=(8,) * levels, encoder_layers_per_block=(1,) * levels,
            decoder_layers_per_block=(1,) * levels, encoder_qkv_multiscales=((),) * levels, decoder_qkv_multiscales=((),) * levels,
            decoder_norm_types="rms_norm", decoder_act_fns="silu",
        ).eval()  # fmt: skip
        tokenizer = toy_t5_tokenizer(300)
        torch.manual_seed(seed + 2)
        gemma = Gemma2Config(
            vocab_size=len(tokenizer.get_vocab()), hidden_size=int(TOY_SANA.unet["caption_channels"]), intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
            pad_token_id=0, eos_token_id=1, bos_token_id=1,
        )  # fmt: skip
        return SanaPipeline(
            tokenizer=tokenizer,
            text_encoder=Gemma2Model(gemma).eval(),
            vae=vae,
            transformer=build_unet(TOY_SANA, seed),
            scheduler=build_scheduler(TOY_SANA, scheduler),
        )

    builders = {
        "sd": sd,
        "sdxl": sdxl,
        "lcm": lcm,
        "pixart": pixart,
        "pixart-sigma": lambda: pixart(sigma=True),
        "sd-inpaint": sd_inpaint,
        "sdxl-refiner": sdxl_refiner,
        "sd3": sd3,
        "sana": sana,
    }
    if kind not in builders:
        raise ValueError(f"toy pipeline kind must be one of {', '.join(builders)}, got {kind!r}")
    pipe = builders[kind]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_controlnet(pipe, seed: int = 0):
    """A ControlNet for a toy SD or SDXL pipeline (``ControlNetModel.from_unet``: the UNet's down path and layout)
    whose control-image encoder downsamples by the toy VAE's factor 2. diffusers initialises the zero convolutions
    (and the conditioning encoder's last convolution) to zero, which a trained ControlNet is not: they get random
    weights so the residuals change the UNet's output."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32)).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.05)
    return net
