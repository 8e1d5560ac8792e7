"""The PixArt family: a DiT denoiser with T5 prompt embeddings and their attention mask."""

from __future__ import annotations

from typing import Any

from postdiff.errors import BundleError
from postdiff.families.base import register_family
from postdiff.families.text_to_image import TextToImage
from postdiff.loop.conditioning import Conditioning, PromptEmbeddings


@register_family
class PixArt(TextToImage):
    """PixArt-α and PixArt-Σ (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``): a DiT (``PixArtTransformer2DModel``)
    conditioned on T5 tokens with their attention mask; PixArt-α at 1024 px also on the image's resolution and aspect
    ratio. The negative prompt is the empty one, encoded (the pipelines' default); prompts are lower-cased and
    stripped, as the pipelines preprocess them without the optional caption cleaner (beautifulsoup4 and ftfy)."""

    name = "pixart"
    default_guidance = 4.5  # the PixArt pipelines' default
    roles = ("text_encoder", "vae_decoder")
    optional_roles = ("text_encoder",)  # T5-XXL: an app may encode prompts elsewhere (PromptEmbeddings)
    tokenizers = ("tokenizer",)

    def matches(self, model) -> bool:
        return (
            getattr(model.pipeline, "transformer", None) is not None
            and type(model.pipeline.transformer).__name__ == "PixArtTransformer2DModel"
        )

    def call_options(self) -> dict[str, Any]:
        """The size asked for, not the nearest aspect-ratio bin (a bundle runs the size it was exported at), and the
        prompt preprocessing a bundle does (lower case, stripped) without the optional caption cleaner."""
        return {"use_resolution_binning": False, "clean_caption": False}

    def pipeline_graphs(self, model) -> list:
        from postdiff.pytorch.graphs import masked_text_encoder_graph, vae_decoder_graph  # lazy: imports torch

        pipe = model.pipeline
        return [masked_text_encoder_graph("text_encoder", pipe.text_encoder, pipe.tokenizer, model.text_len), vae_decoder_graph(pipe.vae)]

    def bundle_info(self, model) -> dict[str, Any]:
        return {
            "guidance": self.default_guidance,
            "resolution_conditioned": bool(model.pipeline.transformer.use_additional_conditions),
        }

    def encode_text(self, pipe, text: str, negative: bool, length: int):
        """(hidden states, attention mask) of one prompt, preprocessed as the pipelines do without the caption cleaner
        (lower case, stripped), padded to ``length`` tokens."""
        return pipe.encode_masked(text.lower().strip(), self.roles[0], self.tokenizers[0], length)

    def conditioning(self, pipe, prompt, guidance: float, ops):
        """``prompt``: text, or a ``PromptEmbeddings`` (the only kind a bundle exported without its T5 encoder takes)."""

        length = int(pipe.info["text_len"])
        given = prompt if isinstance(prompt, PromptEmbeddings) else None
        if given is None and "text_encoder" in pipe.info.get("without", ()):
            raise BundleError(
                "this bundle was exported without its T5 text encoder (--no-text-encoder): give the prompt as embeddings "
                "(--prompt-embeds FILE.npz with prompt_embeds and prompt_attention_mask, and the negative pair for guidance)"
            )

        def encode(negative: bool):
            if given is None:
                ehs, mask = self.encode_text(pipe, "" if negative else str(prompt), negative, length)
            elif negative:
                ehs, mask = given.negative_prompt_embeds, given.negative_prompt_attention_mask
                if ehs is None:
                    raise BundleError(
                        f"guidance {guidance:g} needs negative_prompt_embeds and negative_prompt_attention_mask; add them, or use --guidance 1"
                    )
            else:
                ehs, mask = given.prompt_embeds, given.prompt_attention_mask
            return ops.asarray(ehs), ops.like(ops.asarray(mask), ops.asarray(ehs))

        ehs, mask = encode(negative=False)
        resolution = aspect = None
        if pipe.info.get("resolution_conditioned"):
            h, w = pipe.image_hw
            resolution, aspect = (ops.like(ops.asarray(x), ehs) for x in ([[h, w]], [[h / w]]))
        if guidance <= 1.0:
            return Conditioning(ehs, has_uncond=False, encoder_attention_mask=mask, resolution=resolution, aspect_ratio=aspect)
        neg, neg_mask = encode(negative=True)

        def both(x):
            return None if x is None else ops.cat([x, x])

        return Conditioning(
            ops.cat([neg, ehs]),
            has_uncond=True,
            encoder_attention_mask=ops.cat([neg_mask, mask]),
            resolution=both(resolution),
            aspect_ratio=both(aspect),
        )
