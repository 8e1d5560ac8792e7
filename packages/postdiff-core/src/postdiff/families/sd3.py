"""The Stable Diffusion 3 family: an MMDiT (``SD3Transformer2DModel``) trained on a rectified flow, three text encoders."""

from __future__ import annotations

import numpy as np

from postdiff.families.base import flow_bundle_refusal, register_family
from postdiff.families.text_to_image import TextToImage
from postdiff.loop.conditioning import Conditioning

CLIP_TOKENS = 77  # both CLIP tokenizers' length (the pipeline's tokenizer_max_length)


@register_family
class StableDiffusion3(TextToImage):
    """SD3 and SD3.5 (``StableDiffusion3Pipeline``): two CLIP encoders (penultimate layer and projected pooled output)
    and T5, their tokens on one axis (the CLIP pair concatenated on the feature axis and zero-padded to T5's width,
    then T5's 256 tokens after CLIP's 77), the pooled embeddings concatenated; the negative prompt is the empty one,
    encoded. The transformer predicts the flow velocity v = noise - x0 and samples with
    ``FlowMatchEulerDiscreteScheduler`` (shift 3); only flow-matching schedulers can sample it (``Family.scheduler``).
    ONNX bundles hold the three encoders, the MMDiT variants and the VAE decoder; ONNX Runtime and OpenVINO run
    them; Core ML packages of it are not built yet (``bundle_refusal``)."""

    name = "sd3"
    default_guidance = 7.0  # StableDiffusion3Pipeline's default
    roles = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")

    def matches(self, model) -> bool:
        net = getattr(model.pipeline, "transformer", None)
        return net is not None and type(net).__name__ == "SD3Transformer2DModel"

    def bundle_refusal(self, model, backend: str | None = None) -> str | None:
        return flow_bundle_refusal(model, backend, "SD3 (flow-matching MMDiT)")

    def pipeline_graphs(self, model) -> list:
        from postdiff.pytorch.graphs import text_encoder_graph, vae_decoder_graph  # lazy: imports torch

        pipe = model.pipeline
        return [
            text_encoder_graph("text_encoder", pipe.text_encoder, pipe.tokenizer, penultimate=True, pooled=True, length=CLIP_TOKENS),
            text_encoder_graph("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2, penultimate=True, pooled=True, length=CLIP_TOKENS),
            text_encoder_graph(
                "text_encoder_3", pipe.text_encoder_3, pipe.tokenizer_3, penultimate=False, pooled=False, length=self.t5_len(model.text_len)
            ),
            vae_decoder_graph(pipe.vae),
        ]

    @staticmethod
    def t5_len(text_len: int) -> int:
        """T5's share of the joint text length (the pipeline's ``max_sequence_length``)."""
        return int(text_len) - CLIP_TOKENS

    def conditioning(self, pipe, prompt, guidance: float, ops):
        def encode(text: str):
            clip, pooled = pipe.encode_prompt(text, self.roles[:2], self.tokenizers[:2])  # CLIP's own 77 tokens
            t5 = pipe.encode_ids(text, self.roles[2], self.tokenizers[2], self.t5_len(pipe.info["text_len"]))["hidden_states"]
            clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
            return ops.asarray(np.concatenate([clip, t5], axis=1)), ops.asarray(pooled)

        ehs, pooled = encode(str(prompt))
        if guidance <= 1.0:
            return Conditioning(ehs, has_uncond=False, text_embeds=pooled)
        neg, neg_pooled = encode("")
        return Conditioning(ops.cat([neg, ehs]), has_uncond=True, text_embeds=ops.cat([neg_pooled, pooled]))
