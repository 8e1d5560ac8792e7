"""A diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5, the MMDiT) as explicit plan variants.

The MMDiT has two token streams, the image patches and the text tokens, and every ``JointTransformerBlock`` runs one
attention over both (joint attention: the image queries attend to image and text keys, and the text queries to both),
then a modulated MLP per stream. The last block updates the image stream only (``context_pre_only``).

Block caching, as for PixArt (Δ-DiT's Δ-cache): a *full* pass returns the residual a middle span of blocks
``[start, end)`` adds, a *shallow* pass runs the blocks outside the span and adds the kept residual where the span
would run. Here the span changes both streams, so the cached residual holds both: ``deep`` is (batch, image tokens +
text tokens, width), the image residual first (the order of the joint sequence).

Cross-attention caching has no module to cache here: MMDiT has no cross-attention, the text conditions the image
through the joint attention, and the text stream is itself recomputed by every block from both streams. What stands
in for it is **the text stream's keys and values**: at the gate step a ``*_capture`` pass records, per block, the
keys and values the text tokens contribute to the joint attention (after the block's adaLN modulation, projections
and key normalisation) for the conditional branch; afterwards a ``*_cached`` pass runs the image stream only, each
block's image queries attending to the image keys and the recorded text keys. Everything the text stream costs
(its adaLN, q/k/v and output projections, its MLP, and its share of the attention as queries) is skipped, which is
what T-GATE's cached cross-attention output saves in a UNet: the text's contribution frozen once the layout is
decided. In a cross-attention UNet the keys and values come from the text encoder and never change; in MMDiT they
drift with the image, so freezing them is an approximation whose cost in quality is not measured yet (no trained
SD3 is reachable offline; the split's tests check that the frozen keys and values of the step itself give that step
exactly). ``xattn_k`` is block k's
(batch, heads, text tokens, 2 x head_dim): keys, then values.

Variants (``Step.variant``), the names every split uses:
    full            (sample, timestep, ehs, pooled) -> (v, deep)
    full_capture    same inputs                     -> (v, deep, *text_kv)
    full_cached     same inputs + *text_kv          -> (v, deep)
    shallow         same inputs + deep              -> (v,)
    shallow_cached  same inputs + deep + *text_kv[blocks outside the span] -> (v,)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from postdiff.plan.compiler import ModelSpec, block_span, cut_choices
from postdiff.pytorch.split_base import CrossAttentionSplit, SplitVariantModule, seeded_randn
from postdiff.pytorch.transformer import check_supported, transformer_spec

MMDIT_TRANSFORMERS = ("SD3Transformer2DModel",)
FLUX_TRANSFORMERS = ("FluxTransformer2DModel",)


def mmdit_spec(transformer, name: str = "transformer") -> ModelSpec:
    return transformer_spec(transformer, name, MMDIT_TRANSFORMERS)


def _heads(attn) -> tuple[int, int]:
    return int(attn.heads), int(attn.to_k.out_features) // int(attn.heads)


def text_keys_values(block, context: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """The keys and values the text tokens give block ``block``'s joint attention, as ``JointAttnProcessor2_0``
    computes them: (batch, heads, tokens, 2 x head_dim)."""
    attn = block.attn
    if block.context_pre_only:
        normed = block.norm1_context(context, temb)
    else:
        normed = block.norm1_context(context, emb=temb)[0]
    heads, dim = _heads(attn)
    batch = context.shape[0]
    key = attn.add_k_proj(normed).view(batch, -1, heads, dim).transpose(1, 2)
    value = attn.add_v_proj(normed).view(batch, -1, heads, dim).transpose(1, 2)
    if attn.norm_added_k is not None:
        key = attn.norm_added_k(key)
    return torch.cat([key, value], dim=-1)


def image_stream_block(block, hidden: torch.Tensor, text_kv: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """``JointTransformerBlock.forward``'s image stream with the text tokens' keys and values given (``text_kv``): the
    image queries attend to the image keys and the given text keys; the text stream is not computed."""
    if block.use_dual_attention:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp, normed2, gate_msa2 = block.norm1(hidden, emb=temb)
    else:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden, emb=temb)
    attn = block.attn
    heads, dim = _heads(attn)
    batch = hidden.shape[0]
    query = attn.to_q(normed).view(batch, -1, heads, dim).transpose(1, 2)
    key = attn.to_k(normed).view(batch, -1, heads, dim).transpose(1, 2)
    value = attn.to_v(normed).view(batch, -1, heads, dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    text_key, text_value = text_kv.to(query.dtype).split(dim, dim=-1)
    out = F.scaled_dot_product_attention(query, torch.cat([key, text_key], dim=2), torch.cat([value, text_value], dim=2))
    out = attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, heads * dim).to(query.dtype))
    hidden = hidden + gate_msa.unsqueeze(1) * attn.to_out[1](out)
    if block.use_dual_attention:
        hidden = hidden + gate_msa2.unsqueeze(1) * block.attn2(hidden_states=normed2)
    normed = block.norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return hidden + gate_mlp.unsqueeze(1) * block.ff(normed)


class MMDiTSplit(CrossAttentionSplit):
    """The callables of one SD3 transformer for one cached span. A context manager like the other splits; it wraps no
    processor (the text keys and values are computed and used here, in the split's own block loop)."""

    def __init__(self, transformer, block: int = 0, *, span: Sequence[int] | None = None, cpu_conv: str | None = None) -> None:
        check_supported(transformer, MMDIT_TRANSFORMERS)
        self.transformer = transformer
        self.unet = transformer  # the network every split exposes under one name
        self.block = block
        self.num_layers = int(transformer.config.num_layers)
        self.span = block_span(self.num_layers, block, span)
        self.patch = int(transformer.config.patch_size)
        a, b = self.span
        self.attn2 = []  # no wrapped modules (CrossAttentionSplit.close has nothing to restore)
        self.shallow_xattn = [i for i in range(self.num_layers) if not a <= i < b]
        self.latent_channels = int(transformer.config.in_channels)

    timestep_scale = 1000.0  # the timestep the pipeline passes at sigma 1 (SD3: sigma x 1000; FLUX: sigma)

    @property
    def num_xattn(self) -> int:
        return self.num_layers

    def step(self, variant: str, sample, timestep, cond, deep=None, xattn: Sequence = ()):
        """``forward`` with the inputs a ``Conditioning`` holds (the pooled text embedding is its ``text_embeds``)."""
        return self.forward(variant, sample, timestep, cond.encoder_hidden_states, cond.text_embeds, deep, xattn)

    def forward(
        self,
        variant: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        deep: torch.Tensor | None = None,
        xattn: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, ...]:
        """One variant, as ``SD3Transformer2DModel.forward`` computes it: (v, deep[, *text_kv]) or (v,)."""
        wanted = self.xattn_indices(variant)
        depth, mode = self._check_variant(variant, deep, xattn, wanted)
        if pooled_projections is None:
            raise ValueError(f"the {type(self.transformer).__name__} needs the pooled text embedding (pooled_projections)")
        hp, wp = sample.shape[-2] // self.patch, sample.shape[-1] // self.patch
        tokens = hp * wp
        text_len = encoder_hidden_states.shape[1]
        h, temb, extra = self._embed(sample, timestep, pooled_projections, text_len)
        blocks = self.blocks
        given = dict(zip(wanted, xattn)) if mode == "cached" else {}
        captured: dict[int, torch.Tensor] = {}
        # the text stream: not computed at all when its keys and values are given
        c = None if mode == "cached" else self.transformer.context_embedder(encoder_hidden_states)

        def run(i, h, c):
            if mode == "cached":
                return image_stream_block(blocks[i], h, given[i], temb), None
            if mode == "capture" and i in wanted:
                captured[i] = text_keys_values(blocks[i], c, temb)
            c, h = blocks[i](hidden_states=h, encoder_hidden_states=c, temb=temb, joint_attention_kwargs=None, **extra)
            return h, c

        a, b = self.span
        for i in range(a):
            h, c = run(i, h, c)
        if depth == "full":
            h0, c0 = h, c
            for i in range(a, b):
                h, c = run(i, h, c)
            text_residual = torch.zeros_like(h[:, :1]).expand(-1, text_len, -1) if c is None or c0 is None else c - c0
            residual = torch.cat([h - h0, text_residual], dim=1)
        else:
            h = h + deep[:, :tokens]
            if c is not None and b < self.num_layers:
                c = c + deep[:, tokens:]
        for i in range(b, len(blocks)):
            h, c = run(i, h, c)
        out = self._head(h, temb, hp, wp)
        if depth == "shallow":
            return (out,)
        return (out, residual, *(captured[i] for i in wanted if mode == "capture"))

    @property
    def blocks(self) -> list:
        """The joint blocks in order: each takes and returns both streams."""
        return list(self.transformer.transformer_blocks)

    def _embed(self, sample, timestep, pooled, text_len: int):
        """(image tokens, the timestep-and-text embedding, extra keyword arguments of every block)."""
        model = self.transformer
        return model.pos_embed(sample).contiguous(), model.time_text_embed(timestep, pooled), {}  # position table cropped to the grid

    def _head(self, h, temb, hp: int, wp: int):
        model = self.transformer
        h = model.proj_out(model.norm_out(h, temb))
        p, ch = self.patch, model.out_channels
        h = h.reshape(-1, hp, wp, p, p, ch)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, ch, hp * p, wp * p)

    def module(self, variant: str) -> nn.Module:
        return MMDiTVariantModule(self, variant)


class FluxSplit(MMDiTSplit):
    """FLUX.1 (``FluxTransformer2DModel``): 19 double-stream blocks (SD3's joint blocks, with rotary positions) then 38
    single-stream blocks (one attention and MLP over the concatenated tokens); both kinds take and return both streams,
    so block caching spans any of the 57. The latent is packed into 2x2 patches (64 channels) as the FLUX pipeline
    packs it. FLUX.1-dev is guidance-distilled (the guidance scale is an input, no CFG batch): there is no branch to
    drop, and its text stream is not cached (``xattn_gate`` is refused with the reason); this split serves ``plan cost``
    and ``plan show`` on ``arch:flux-dev``, not a pipeline yet."""

    guidance = 3.5  # FluxPipeline's default, the embedded guidance every step gets

    def __init__(self, transformer, block: int = 0, *, span: Sequence[int] | None = None, cpu_conv: str | None = None) -> None:
        check_supported(transformer, FLUX_TRANSFORMERS, layers=_flux_layers(transformer))
        self.transformer = self.unet = transformer
        self.block = block
        self.num_layers = _flux_layers(transformer)
        self.span = block_span(self.num_layers, block, span)
        self.patch = 2
        self.attn2 = []
        self.shallow_xattn = []
        self.latent_channels = int(transformer.config.in_channels) // 4  # 2x2 packed

    timestep_scale = 1.0

    @property
    def num_xattn(self) -> int:
        return 0  # the text stream is not cached for FLUX (see the class docstring)

    @property
    def blocks(self) -> list:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def _embed(self, sample, timestep, pooled, text_len: int):
        model = self.transformer
        b, c, h, w = sample.shape
        packed = sample.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        x = model.x_embedder(packed)
        t = timestep.to(x.dtype) * 1000  # the pipeline passes t / 1000, the transformer scales back
        if model.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance * 1000, device=x.device, dtype=x.dtype)
            temb = model.time_text_embed(t, guidance, pooled)
        else:
            temb = model.time_text_embed(t, pooled)
        ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        ids = torch.cat([torch.zeros(text_len, 3, device=x.device), ids.reshape(-1, 3)])
        return x, temb, {"image_rotary_emb": model.pos_embed(ids)}

    def _head(self, h, temb, hp: int, wp: int):
        model = self.transformer
        out = model.proj_out(model.norm_out(h, temb))
        b, _, ch = out.shape
        return out.view(b, hp, wp, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch // 4, hp * 2, wp * 2)


def _flux_layers(transformer) -> int:
    return int(transformer.config.num_layers) + int(transformer.config.num_single_layers)


def flux_spec(transformer, name: str = "transformer") -> ModelSpec:
    """FLUX's planner view: 2x2 packing is its downsampling factor, its double and single blocks one list; the gate
    needs a cross-attention or a CFG branch, and guidance-distilled FLUX offers neither here."""
    check_supported(transformer, FLUX_TRANSFORMERS, layers=_flux_layers(transformer))
    return ModelSpec(
        name=name,
        downsample_factor=2,
        num_down_blocks=cut_choices(_flux_layers(transformer)),
        has_cross_attention=False,
        guidance_embedded=bool(transformer.config.guidance_embeds),
        num_layers=_flux_layers(transformer),
    )


class MMDiTVariantModule(SplitVariantModule):
    """One variant with explicit tensor inputs and outputs (the interface of the other splits' variant modules).

    forward(sample, timestep, encoder_hidden_states, pooled_projections[, deep][, *xattn])"""

    def __init__(self, split: MMDiTSplit, variant: str) -> None:
        super().__init__(split, split.transformer, variant)

    def input_names(self) -> list[str]:
        names = ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
        if self.takes_deep:
            names.append("deep")
        return names + [f"xattn_{i}" for i in self.xattn_in]

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, *rest):
        rest = list(rest)
        deep = rest.pop(0) if self.takes_deep else None
        return self._split.forward(self.variant, sample, timestep, encoder_hidden_states, pooled_projections, deep, tuple(rest))

    def example_inputs(
        self, latent_hw, batch: int, *, text_len: int, pooled_dim=None, device="cpu", seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Random inputs by name; the cache tensors come from a ``full_capture`` pass on the same inputs."""
        cfg = self.unet.config
        randn = seeded_randn(seed, device)

        split = self._split
        ins: dict[str, torch.Tensor] = {
            "sample": randn(batch, split.latent_channels, *latent_hw),
            "timestep": torch.full((batch,), 0.5 * split.timestep_scale, device=device),
            "encoder_hidden_states": randn(batch, text_len, cfg.joint_attention_dim),
            "pooled_projections": randn(batch, pooled_dim or cfg.pooled_projection_dim),
        }
        if self.takes_deep or self.xattn_in:
            with torch.no_grad():
                probe = self._split.forward("full_capture", *ins.values())
            ins = self._with_caches(ins, probe)
        return ins

    def dynamic_shapes(self, max_side: int = 2048) -> tuple:
        """``torch.export`` dynamic shapes: batch, text length, and latent sides as multiples of the patch size. The
        block residual ``deep`` holds image tokens (h x w patches) then text tokens, a length no linear expression of
        one dimension gives, so torch.export infers it (``Dim.AUTO``) from the slicing that relates it to the others."""
        from torch.export import Dim

        p = self._split.patch
        batch = Dim("batch", min=1, max=63)
        h, w = Dim("h", min=1, max=max_side // 8 // p), Dim("w", min=1, max=max_side // 8 // p)
        text = Dim("text", min=2, max=1024)
        by_name = {
            "sample": {0: batch, 2: p * h, 3: p * w},
            "timestep": {0: batch},
            "encoder_hidden_states": {0: batch, 1: text},
            "pooled_projections": {0: batch},
            "deep": {0: batch, 1: Dim.AUTO},
        }
        for i in self.xattn_in:
            by_name[f"xattn_{i}"] = {0: batch, 2: text}  # (batch, heads, text tokens, 2 x head_dim)
        return self._in_input_order(by_name)
