"""Published UNet architectures, built from config with random weights (no download).

``arch:sd15``, ``arch:sd21``, ``arch:sdxl`` and ``arch:lcm-sd15`` let costs and timings of the real architectures be
measured on a machine without the weights. The values are those of the public ``unet/config.json`` files of
Stable Diffusion v1.5, v2.1 (768, v-prediction), SDXL base 1.0 and the LCM distillation of SD 1.5
(``SimianLuo/LCM_Dreamshaper_v7``: SD 1.5's UNet plus a 256-wide guidance embedding, ``time_cond_proj_dim``, with
its ``LCMScheduler``). ``toy-sd``/``toy-sdxl``/``toy-lcm`` are tiny configurations of the same families, used by the
tests and the offline demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from postdiff.families.model import SD_SCHEDULER

_SD_SCHEDULER = {k: v for k, v in SD_SCHEDULER.items() if k != "_class_name"}  # SD 1.5's, as the engine knows it
# LCM_Dreamshaper_v7's scheduler_config.json: SD 1.5's noise schedule, the 50-step skipping schedule LCM was
# distilled on (original_inference_steps) and the consistency boundary condition's timestep_scaling
_LCM_SCHEDULER = {
    **_SD_SCHEDULER,
    "set_alpha_to_one": True,
    "original_inference_steps": 50,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
}


@dataclass(frozen=True)
class Architecture:
    name: str
    unet: dict[str, Any]
    text_len: int = 77
    pooled_dim: int | None = None  # SDXL's pooled text embedding (added conditioning)
    vae_scale_factor: int = 8
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(_SD_SCHEDULER))
    scheduler_class: str = "DDIMScheduler"  # the scheduler its pipeline ships with

    @property
    def is_transformer(self) -> bool:
        from postdiff.pytorch.backbone import is_transformer

        return is_transformer(self.unet)

    @property
    def is_sdxl(self) -> bool:
        return self.unet.get("addition_embed_type") == "text_time"

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def default_latent(self) -> int:
        return int(self.unet.get("sample_size", self.unet.get("_sample_size")))


SD15 = Architecture(
    "sd15",
    {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
)

LCM_SD15 = Architecture(
    "lcm-sd15",
    {**SD15.unet, "time_cond_proj_dim": 256},
    scheduler=dict(_LCM_SCHEDULER),
    scheduler_class="LCMScheduler",
)

SD21 = Architecture(
    "sd21",
    {
        "sample_size": 96,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
        "upcast_attention": True,
        "norm_num_groups": 32,
    },
    scheduler={**_SD_SCHEDULER, "prediction_type": "v_prediction"},
)

SDXL = Architecture(
    "sdxl",
    {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
    },
    pooled_dim=1280,
)

# Tiny members of the same families (random weights): for tests and the offline demo.
TOY_SD = Architecture(
    "toy-sd",
    {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    vae_scale_factor=2,
)

TOY_SDXL = Architecture(
    "toy-sdxl",
    {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2],
        "cross_attention_dim": 64,
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,  # pooled 32 + 6 * 8
        "norm_num_groups": 32,
    },
    pooled_dim=32,
    vae_scale_factor=2,
)

# An inpainting UNet (SD-inpainting's layout: latent 4 + mask 1 + masked image latent 4 input channels).
TOY_SD_INPAINT = Architecture("toy-sd-inpaint", {**TOY_SD.unet, "in_channels": 9}, vae_scale_factor=2)

# The SDXL refiner's layout: conditioned on the second text encoder only (its 32-wide tokens), and on five size ids
# (original size, crop, aesthetic score) instead of six.
TOY_SDXL_REFINER = Architecture(
    "toy-sdxl-refiner",
    {**TOY_SDXL.unet, "cross_attention_dim": 32, "projection_class_embeddings_input_dim": 72},  # pooled 32 + 5 * 8
    pooled_dim=32,
    vae_scale_factor=2,
)

TOY_LCM = Architecture(
    "toy-lcm",
    {**TOY_SD.unet, "time_cond_proj_dim": 16},
    vae_scale_factor=2,
    scheduler=dict(_LCM_SCHEDULER),
    scheduler_class="LCMScheduler",
)

# DiT families: the transformer's configuration goes where a UNet's does (``unet``), named by its diffusers class.
# PixArt-XL-2-1024-MS (PixArt-α at 1024 px): 28 blocks of width 1152 (16 heads of 72), patch 2, the T5-XXL caption
# (4096 channels, 120 tokens), the learned variance (8 output channels), the resolution and aspect-ratio
# conditioning of its 1024 px sample size, and its DPM-Solver++ scheduler on the linear beta schedule.
_PIXART_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "steps_offset": 0,
    "use_karras_sigmas": False,
}


def _pixart(name: str, transformer: dict[str, Any], text_len: int = 120) -> Architecture:
    """A PixArt architecture: its transformer, its T5 length (120 for α, 300 for Σ), DPM-Solver++."""
    return Architecture(
        name, transformer, text_len=text_len, scheduler=dict(_PIXART_SCHEDULER), scheduler_class="DPMSolverMultistepScheduler"
    )


PIXART_ALPHA = _pixart(
    "pixart-alpha",
    {
        "_class_name": "PixArtTransformer2DModel",
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 28,
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "cross_attention_dim": 1152,
        "caption_channels": 4096,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "num_embeds_ada_norm": 1000,
    },
)

# A tiny PixArt-α: its 128 sample size keeps the resolution conditioning (the pipeline passes it for that size only);
# a tiny PixArt-Σ: sample size 32, no resolution conditioning, the Σ pipeline's 300-token default.
TOY_PIXART = _pixart(
    "toy-pixart",
    {
        **PIXART_ALPHA.unet,
        "num_layers": 4,
        # width 96: the resolution conditioning takes a third of it per size, and the weights (about 2 MB in fp16)
        # outweigh the Core ML program text of a function, as a real model's do
        "num_attention_heads": 4,
        "attention_head_dim": 24,
        "cross_attention_dim": 96,
        "caption_channels": 32,
    },
)
TOY_PIXART_SIGMA = _pixart("toy-pixart-sigma", {**TOY_PIXART.unet, "sample_size": 32, "interpolation_scale": 1}, text_len=300)

# Stable Diffusion 3 medium (stabilityai/stable-diffusion-3-medium-diffusers): the MMDiT's transformer/config.json and
# scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler, shift 3); 77 CLIP tokens + 256 T5 tokens, the
# pooled CLIP-L and CLIP-G projections (768 + 1280).
_SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
SD3_MEDIUM = Architecture(
    "sd3-medium",
    {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
    },
    text_len=333,
    pooled_dim=2048,
    scheduler=dict(_SD3_SCHEDULER),
    scheduler_class="FlowMatchEulerDiscreteScheduler",
)
# A tiny SD3: 4 joint blocks of width 96 (caption projection = width, as SD3's), the toy CLIP encoders' 2 x 32 padded
# to a 64-wide T5; 16 latent channels and a 32-latent sample size (256 px with the toy 8x VAE).
TOY_SD3 = Architecture(
    "toy-sd3",
    {
        **SD3_MEDIUM.unet,
        "sample_size": 32,
        "num_layers": 4,
        "attention_head_dim": 24,
        "num_attention_heads": 4,
        "joint_attention_dim": 64,
        "caption_projection_dim": 96,
        "pooled_projection_dim": 64,
        "pos_embed_max_size": 32,
    },
    text_len=77 + 256,
    pooled_dim=64,
    scheduler=dict(_SD3_SCHEDULER),
    scheduler_class="FlowMatchEulerDiscreteScheduler",
)

# SANA 1600M at 1024 px (Efficient-Large-Model/Sana_1600M_1024px_diffusers): transformer/config.json (20 blocks of
# width 2240, linear self-attention, patch 1 on the DC-AE's 32x32x32 latent) and its scheduler, DPM-Solver++ on flow
# sigmas with flow_shift 3; 300 Gemma-2 tokens of width 2304.
_SANA_SCHEDULER = {
    "num_train_timesteps": 1000,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
}
SANA_1600M = Architecture(
    "sana-1600m",
    {
        "_class_name": "SanaTransformer2DModel",
        "in_channels": 32,
        "out_channels": 32,
        "num_attention_heads": 70,
        "attention_head_dim": 32,
        "num_layers": 20,
        "num_cross_attention_heads": 20,
        "cross_attention_head_dim": 112,
        "cross_attention_dim": 2240,
        "caption_channels": 2304,
        "mlp_ratio": 2.5,
        "sample_size": 32,
        "patch_size": 1,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "attention_bias": False,
    },
    text_len=300,
    vae_scale_factor=32,
    scheduler=dict(_SANA_SCHEDULER),
    scheduler_class="DPMSolverMultistepScheduler",
)
# A tiny SANA: 4 blocks of width 32 on an 8-channel latent (the toy DC-AE downsamples 32x, as SANA's: 1024 px -> 32x32),
# a tiny Gemma-2 of width 32.
TOY_SANA = Architecture(
    "toy-sana",
    {
        **SANA_1600M.unet,
        "in_channels": 8,
        "out_channels": 8,
        "num_attention_heads": 4,
        "attention_head_dim": 8,
        "num_layers": 4,
        "num_cross_attention_heads": 4,
        "cross_attention_head_dim": 8,
        "cross_attention_dim": 32,
        "caption_channels": 32,
    },
    text_len=300,
    vae_scale_factor=32,
    scheduler=dict(_SANA_SCHEDULER),
    scheduler_class="DPMSolverMultistepScheduler",
)

# FLUX.1-dev (black-forest-labs/FLUX.1-dev): transformer/config.json (19 double- and 38 single-stream blocks of width
# 3072, guidance embedded, 2x2-packed 16-channel latent) and its scheduler (FlowMatch Euler, shift by token count);
# 512 T5 tokens, CLIP-L's pooled 768. Costs and plans only (plan cost / plan show): no FLUX pipeline runs yet.
FLUX_DEV = Architecture(
    "flux-dev",
    {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
        "_sample_size": 128,  # the pipeline's default 1024 px; not a config key of FLUX's (``_`` keys are not built)
    },
    text_len=512,
    pooled_dim=768,
    scheduler={
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    scheduler_class="FlowMatchEulerDiscreteScheduler",
)

ARCHITECTURES = {
    a.name: a
    for a in (
        SD15, SD21, SDXL, LCM_SD15, PIXART_ALPHA, SD3_MEDIUM, SANA_1600M, FLUX_DEV,
        TOY_SD, TOY_SDXL, TOY_LCM, TOY_PIXART, TOY_PIXART_SIGMA, TOY_SD3, TOY_SANA,
    )
}  # fmt: skip
