"""The diffusers text-to-image families: Stable Diffusion 1.x/2.x, SDXL and Latent Consistency models."""

from __future__ import annotations

from typing import Any

import numpy as np

from postdiff.errors import BundleError, ModelError, brief
from postdiff.families.base import Family, register_family
from postdiff.loop.conditioning import Conditioning, guidance_embedding
from postdiff.loop.resolution import init_noise_sigma
from postdiff.loop.sampling import run_plan
from postdiff.plan.compiler import guidance_dim
from postdiff.plan.schedulers import resolve


class TextToImage(Family):
    """What the diffusers text-to-image families share: one prompt per image, the prompt's conditioning from the
    bundle's text encoder graphs (``conditioning``), a VAE decoder at the end."""

    def conditioning(self, pipe, prompt: str, guidance: float, ops):
        """The ``Conditioning`` of one prompt at ``guidance`` (the negative half first when that is a CFG batch), in
        ``ops``' arrays."""
        raise NotImplementedError

    def generate_bundle(self, pipe, conditions, plan, denoiser, *, seed, guidance, scheduler, batch_size, progress, ops):

        if pipe.static and pipe.static_batch != 1:
            raise BundleError(
                f"SD bundles run one prompt per call; this one was exported for {pipe.static_batch} (re-export with --batch 1)"
            )
        vae = pipe.manifest.graph("vae_decoder")
        images, finals = [], []
        for i, prompt in enumerate(conditions):
            cond = self.conditioning(pipe, prompt, guidance, ops)
            gen = self.generator(seed, i, ops)
            sch = pipe.scheduler(scheduler, ops)
            sch.set_timesteps(plan.recipe.steps)
            latents = ops.randn((1, pipe.info["in_channels"], *pipe.latent_hw), gen) * init_noise_sigma(sch)
            latents = run_plan(plan, denoiser, sch, cond, guidance_scale=guidance, generator=gen, latents=latents, progress=progress)
            finals.append(np.asarray(ops.numpy(latents), dtype=np.float32))
            image = pipe.run(vae, {"latents": finals[-1]})["image"]
            images.append(np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)[0])
        pipe.final_latents = np.concatenate(finals) if finals else None
        return np.stack(images).astype(np.float32)


@register_family
class StableDiffusionXL(TextToImage):
    """SDXL: two text encoders (the penultimate layer of each, concatenated; the second's pooled projection) and
    the size conditioning ``time_ids``."""

    name = "sdxl"
    roles = ("text_encoder", "text_encoder_2", "vae_decoder")
    tokenizers = ("tokenizer", "tokenizer_2")

    def matches(self, model) -> bool:
        pipe = model.pipeline
        return getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "unet", None) is not None

    def pipeline_graphs(self, model) -> list:
        from postdiff.pytorch.graphs import text_encoder_graph, vae_decoder_graph  # lazy: imports torch

        pipe = model.pipeline
        return [
            text_encoder_graph("text_encoder", pipe.text_encoder, pipe.tokenizer, penultimate=True, pooled=False),
            text_encoder_graph("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2, penultimate=True, pooled=True),
            vae_decoder_graph(pipe.vae),
        ]

    def bundle_info(self, model) -> dict[str, Any]:
        return {
            "guidance": self.default_guidance,
            "force_zeros_for_empty_prompt": bool(model.pipeline.config.get("force_zeros_for_empty_prompt", True)),
        }

    def conditioning(self, pipe, prompt: str, guidance: float, ops):

        cfg = guidance > 1.0
        ehs, pooled = (ops.asarray(x) for x in pipe.encode_prompt(prompt, self.roles[:-1], self.tokenizers))
        h, w = pipe.image_hw
        time_ids = ops.like(ops.asarray([[h, w, 0, 0, h, w]]), ehs)
        if not cfg:
            return Conditioning(ehs, has_uncond=False, text_embeds=pooled, time_ids=time_ids)
        if pipe.info.get("force_zeros_for_empty_prompt", True):
            neg, neg_pooled = ops.zeros_like(ehs), ops.zeros_like(pooled)
        else:
            neg, neg_pooled = (ops.asarray(x) for x in pipe.encode_prompt("", self.roles[:-1], self.tokenizers))
        return Conditioning(
            ops.cat([neg, ehs]), has_uncond=True, text_embeds=ops.cat([neg_pooled, pooled]), time_ids=ops.cat([time_ids, time_ids])
        )


@register_family
class StableDiffusion(TextToImage):
    """SD 1.x / 2.x: one text encoder (its last layer), no pooled embedding or size conditioning."""

    name = "sd"
    roles = ("text_encoder", "vae_decoder")
    tokenizers = ("tokenizer",)

    def matches(self, model) -> bool:
        pipe = model.pipeline
        return hasattr(pipe, "text_encoder") and hasattr(pipe, "vae") and getattr(pipe, "unet", None) is not None

    def pipeline_graphs(self, model) -> list:
        from postdiff.pytorch.graphs import text_encoder_graph, vae_decoder_graph  # lazy: imports torch

        pipe = model.pipeline
        return [
            text_encoder_graph("text_encoder", pipe.text_encoder, pipe.tokenizer, penultimate=False, pooled=False),
            vae_decoder_graph(pipe.vae),
        ]

    def bundle_info(self, model) -> dict[str, Any]:
        return {"guidance": self.default_guidance}

    def conditioning(self, pipe, prompt: str, guidance: float, ops):

        ehs = ops.asarray(pipe.encode_prompt(prompt, self.roles[:-1], self.tokenizers)[0])
        if guidance <= 1.0:
            return Conditioning(ehs, has_uncond=False)
        neg = ops.asarray(pipe.encode_prompt("", self.roles[:-1], self.tokenizers)[0])
        return Conditioning(ops.cat([neg, ehs]), has_uncond=True)


@register_family
class LatentConsistency(StableDiffusion):
    """LCM distillations of SD 1.x/2.x (``LatentConsistencyModelPipeline``, ``LCMScheduler``): guidance is not a CFG
    batch but a UNet input, the sinusoidal embedding of w = guidance - 1 (``timestep_cond``, as the pipeline makes it):
    one UNet branch per image and step, no negative prompt."""

    name = "lcm"
    default_guidance = 8.5  # LatentConsistencyModelPipeline's default

    def matches(self, model) -> bool:
        return super().matches(model) and guidance_dim(model.unet_config) is not None

    def bundle_info(self, model) -> dict[str, Any]:
        return {"guidance": self.default_guidance, "time_cond_proj_dim": guidance_dim(model.unet_config)}

    def scheduler(self, name, config, ops=None):
        """LCMScheduler only: the model was distilled for its consistency steps (and the diffusers pipeline passes
        ``original_inference_steps``, which other schedulers refuse)."""

        if name is not None and resolve(name)[0] != "LCMScheduler":
            raise ModelError(f"LCM models sample with LCMScheduler (lcm) only, not {brief(name)}; drop --scheduler")
        return super().scheduler("LCMScheduler", config, ops)

    def check_scheduler(self, name: str) -> None:
        pass

    def conditioning(self, pipe, prompt: str, guidance: float, ops):

        ehs = ops.asarray(pipe.encode_prompt(prompt, self.roles[:-1], self.tokenizers)[0])
        w = guidance_embedding(guidance - 1.0, int(pipe.info["time_cond_proj_dim"]), batch=int(ehs.shape[0]))
        return Conditioning(ehs, has_uncond=False, timestep_cond=ops.like(ops.asarray(w), ehs))
