"""The SANA family: a linear-attention DiT (``SanaTransformer2DModel``) trained on a rectified flow, Gemma-2 text."""

from __future__ import annotations

from typing import Any

from postdiff.families.base import register_family
from postdiff.families.text_to_image import TextToImage


@register_family
class Sana(TextToImage):
    """SANA (``SanaPipeline``): Gemma-2 prompt embeddings with their attention mask (the pipeline prepends its
    "complex human instruction" and keeps the last 300 tokens), a DC-AE with a 32x downsampling VAE, a transformer of
    linear self-attention, cross-attention and convolutional MLPs that predicts the flow velocity, sampled with
    DPM-Solver++ on flow sigmas (``flow-dpmpp-2m``, shift 3). Only flow-matching schedulers can sample it
    (``Family.scheduler``). PostDiff runs it on PyTorch; bundles of it are not built yet, and exporting or
    benchmarking one says so (``bundle_refusal``)."""

    name = "sana"
    default_guidance = 4.5  # SanaPipeline's default
    roles = ("text_encoder", "vae_decoder")
    tokenizers = ("tokenizer",)

    def matches(self, model) -> bool:
        net = getattr(model.pipeline, "transformer", None)
        return net is not None and type(net).__name__ == "SanaTransformer2DModel"

    def call_options(self) -> dict[str, Any]:
        """The size asked for, not the nearest aspect-ratio bin, as for PixArt (a bundle runs the size it was exported at)."""
        return {"use_resolution_binning": False, "clean_caption": False}

    def bundle_refusal(self, model) -> str | None:
        return (
            f"{model.name}: bundles of SANA (flow-matching linear-attention DiT) models are not built yet; run it on PyTorch "
            "(postdiff generate --backend torch, or postdiff.apply in Python)"
        )
