"""The SANA family: a linear-attention DiT (``SanaTransformer2DModel``) trained on a rectified flow, Gemma-2 text."""

from __future__ import annotations

from typing import Any

import numpy as np

from postdiff.families.base import flow_bundle_refusal, register_family
from postdiff.families.pixart import PixArt


@register_family
class Sana(PixArt):
    """SANA (``SanaPipeline``): Gemma-2 prompt embeddings with their attention mask, a DC-AE with a 32x downsampling VAE,
    a transformer of linear self-attention, cross-attention and convolutional MLPs that predicts the flow velocity,
    sampled with DPM-Solver++ on flow sigmas (``flow-dpmpp-2m``, shift 3). Only flow-matching schedulers can sample it
    (``Family.scheduler``). What it shares with PixArt is the conditioning's form (text tokens with their mask, the
    empty prompt as the negative, lower case and stripped); what differs is the prompt's encoding: the pipeline
    prepends its "complex human instruction" to the prompt (not to the negative one), pads to the instruction's
    tokens plus 300 - 2, runs Gemma-2 as a causal decoder, and keeps the first token and the last 299. A bundle records
    the instruction at export (``bundle_info``) and does the same. ONNX Runtime and OpenVINO run them;
    Core ML packages of it are not built yet (``bundle_refusal``)."""

    name = "sana"
    default_guidance = 4.5  # SanaPipeline's default
    optional_roles = ()

    def matches(self, model) -> bool:
        net = getattr(model.pipeline, "transformer", None)
        return net is not None and type(net).__name__ == "SanaTransformer2DModel"

    def bundle_refusal(self, model, backend: str | None = None) -> str | None:
        return flow_bundle_refusal(model, backend, "SANA (flow-matching linear-attention DiT)")

    def pipeline_graphs(self, model) -> list:
        from postdiff.pytorch.graphs import masked_text_encoder_graph, vae_decoder_graph  # lazy: imports torch

        pipe = model.pipeline
        return [
            masked_text_encoder_graph("text_encoder", pipe.text_encoder, pipe.tokenizer, model.text_len, causal=True),
            vae_decoder_graph(pipe.vae),
        ]

    def bundle_info(self, model) -> dict[str, Any]:
        """The pipeline's default instruction (the argument's default, as ``__call__`` uses it) and its token count."""
        import inspect

        instruction = inspect.signature(type(model.pipeline).__call__).parameters["complex_human_instruction"].default
        text = "\n".join(instruction or ())
        tokens = len(model.pipeline.tokenizer.encode(text)) if text else 0
        return {"guidance": self.default_guidance, "instruction": text, "instruction_tokens": tokens}

    def encode_text(self, pipe, text: str, negative: bool, length: int):
        """As ``SanaPipeline.encode_prompt``: the instruction before the prompt, then the first token and the last
        ``length - 1`` (the negative prompt is encoded without the instruction, to ``length`` tokens)."""
        instruction = "" if negative else pipe.info.get("instruction", "")
        padded = length + int(pipe.info.get("instruction_tokens", 0)) - 2 if instruction else length
        ehs, mask = pipe.encode_masked(instruction + text.lower().strip(), self.roles[0], self.tokenizers[0], padded)
        keep = np.r_[0, np.arange(padded - length + 1, padded)]
        return ehs[:, keep], mask[:, keep]
