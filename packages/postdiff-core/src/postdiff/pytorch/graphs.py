"""The graphs an exported bundle holds, as ``nn.Module``s with explicit tensor inputs and outputs.

Backend-independent: the ONNX and Core ML exporters both take their graphs from here. A bundle for a plan has
one UNet graph per variant the plan uses (``postdiff.pytorch.unet.VariantModule``) and what the pipeline needs around
it, which the model's family names (``postdiff.families``): the class encoder, the text encoder(s), the VAE decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from postdiff.plan.compiler import Plan


@dataclass
class GraphSource:
    """One graph to export: a module, its input/output names, and how to make inputs for it."""

    name: str
    role: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example: Callable[[tuple[int, int], int], dict[str, torch.Tensor]]  # (latent size, batch) -> inputs by name
    dynamic_shapes: Any  # for torch.export
    variant: str | None = None
    # Another source whose graph computes this one's outputs among its own from the same inputs (a UNet's ``full``
    # is ``full_capture`` without the cross-attention outputs): a backend may cut this graph out of that one's
    # instead of tracing the network again (ONNX does: the reference model's postdiff bundle in 52 s instead of 73).
    outputs_of: GraphSource | None = None


class _TextEncoder(nn.Module):
    """input_ids -> hidden states as the SD pipelines use them (SD: last layer; SDXL: penultimate layer, plus
    the projected pooled output of the second encoder)."""

    def __init__(self, encoder: nn.Module, penultimate: bool, pooled: bool) -> None:
        super().__init__()
        self.encoder, self.penultimate, self.pooled = encoder, penultimate, pooled

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out[0]
        return (hidden, out[0]) if self.pooled else (hidden,)


class _MaskedTextEncoder(nn.Module):
    """(input_ids, attention_mask) -> last hidden states: a T5 encoder as the PixArt pipelines call it (the mask as
    float, 1 for a token, 0 for padding)."""

    def __init__(self, encoder: nn.Module, causal: bool = False) -> None:
        super().__init__()
        self.encoder, self.causal = encoder, causal

    def forward(self, input_ids, attention_mask):
        # the mask as the additive 4-D bias transformers builds from it (what a 2-D mask becomes inside; given
        # ready, transformers' mask utilities, which coremltools cannot convert, stay out of the graph). -1e4: exact
        # in fp32, finite in fp16. A decoder used as an encoder (SANA's Gemma-2) also masks each token's successors
        n = attention_mask.shape[-1]
        bias = ((1.0 - attention_mask) * -10000.0)[:, None, None, :].expand(-1, 1, n, -1)
        if not self.causal:
            return (self.encoder(input_ids, attention_mask=bias)[0],)
        bias = bias + torch.triu(torch.full((n, n), -10000.0, device=bias.device), diagonal=1)
        # positions given per row: the exporter fuses the rotary embedding into ONNX's RotaryEmbedding, whose ONNX
        # Runtime kernel wants cos/sin tables of the input's batch, where the model's own positions are one shared row
        positions = torch.arange(n, device=input_ids.device).expand(input_ids.shape[0], n)
        return (self.encoder(input_ids, attention_mask=bias, position_ids=positions)[0],)


class _VaeDecoder(nn.Module):
    """Final latents (as the sampler leaves them) -> image in [-1, 1]: unscaled and shifted as the pipelines do (SD3's
    VAE has a ``shift_factor``; the others none)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents):
        return (self.vae.decode(latents / self.scaling + self.shift, return_dict=False)[0],)


class ClassEncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, labels):
        return (self.encoder(labels),)


def batch_dim():
    from torch.export import Dim

    return Dim("batch", min=1, max=1024)


def text_encoder_graph(name: str, encoder, tokenizer, *, penultimate: bool, pooled: bool, length: int | None = None) -> GraphSource:
    """A text encoder as the SD pipelines use it (``penultimate``: SDXL's second-to-last layer; ``pooled``: also
    the projected pooled output), for prompts padded to ``length`` tokens (default: the tokenizer's maximum)."""
    module = _TextEncoder(encoder.eval(), penultimate=penultimate, pooled=pooled).eval()
    length = int(length or tokenizer.model_max_length)

    def ids(hw, b):
        return {
            "input_ids": tokenizer(["a photo"] * b, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        }

    outputs = ["hidden_states", "text_embeds"] if pooled else ["hidden_states"]
    return GraphSource(name, name, module, ["input_ids"], outputs, ids, ({0: batch_dim()},))


def masked_text_encoder_graph(name: str, encoder, tokenizer, text_len: int, *, causal: bool = False) -> GraphSource:
    """A text encoder with its attention mask as an input, for prompts padded to ``text_len`` tokens: PixArt's T5, or
    with ``causal`` SANA's Gemma-2 decoder (each token attends to itself and the tokens before it)."""
    from torch.export import Dim

    module = _MaskedTextEncoder(encoder.eval(), causal=causal).eval()

    def ids(hw, b):
        t = tokenizer(["a photo"] * b, padding="max_length", max_length=text_len, truncation=True, return_tensors="pt")
        return {"input_ids": t.input_ids, "attention_mask": t.attention_mask.to(torch.float32)}

    text = Dim("text", min=2, max=1024)  # SANA's prompts: its instruction's tokens and 300 more
    shapes = ({0: batch_dim(), 1: text}, {0: batch_dim(), 1: text})
    return GraphSource(name, name, module, ["input_ids", "attention_mask"], ["hidden_states"], ids, shapes)


def vae_decoder_graph(vae) -> GraphSource:
    from torch.export import Dim

    module = _VaeDecoder(vae.eval()).eval()
    channels = int(vae.config.latent_channels)
    h, w = Dim("h", min=1, max=512), Dim("w", min=1, max=512)

    def latents(hw, b):
        return {"latents": torch.randn(b, channels, *hw, generator=torch.Generator().manual_seed(0))}

    return GraphSource("vae_decoder", "vae_decoder", module, ["latents"], ["image"], latents, ({0: batch_dim(), 2: h, 3: w},))


def unet_graphs(split, plan: Plan, *, text_len: int, pooled_dim: int | None) -> list[GraphSource]:
    """One graph per variant the plan uses, of a ``UNetSplit`` or a ``TransformerSplit`` (role ``unet`` for both)."""
    out = []
    for variant in dict.fromkeys(v for v, _ in plan.variants()):
        module = split.module(variant).eval()

        def example(hw, batch, module=module):
            return module.example_inputs(hw, batch, text_len=text_len, pooled_dim=pooled_dim)

        out.append(
            GraphSource(
                f"unet_{variant}", "unet", module, module.input_names(), module.output_names(), example, module.dynamic_shapes(), variant
            )
        )
    by_variant = {src.variant: src for src in out}
    full, capture = by_variant.get("full"), by_variant.get("full_capture")
    # only when ``full`` comes first: ``capture`` is then traced for it and finished (quantized, fp16) at its own turn,
    # so ``full`` is always cut out of the traced graph, never out of a finished one
    if (
        full
        and capture
        and out.index(full) < out.index(capture)
        and full.input_names == capture.input_names
        and capture.output_names[: len(full.output_names)] == full.output_names
    ):
        full.outputs_of = capture
    return out
