"""A diffusers ``PixArtTransformer2DModel`` (PixArt-α / PixArt-Σ) or ``SanaTransformer2DModel`` (SANA) as explicit,
exportable callables.

The transformer is patch embedding, a stack of blocks (self-attention, cross-attention to the text tokens, MLP;
each modulated by the timestep through adaLN-single) and the output head. PixArt's blocks are
``BasicTransformerBlock``s on T5 tokens; SANA's are ``SanaTransformerBlock``s: linear (ReLU-kernel) self-attention,
cross-attention to Gemma-2 tokens after an RMS caption norm, and a convolutional MLP (GLUMBConv) on the patch grid.
Both share everything PostDiff touches: the span of blocks, the ``attn2`` modules, adaLN-single and the head. Block caching is the
DiT analogue of DeepCache, in the Δ-cache form of Δ-DiT (Chen et al. 2024): a *full* pass runs every block and
returns the residual a middle span of blocks ``[start, end)`` adds to the hidden state (after block ``end - 1``
minus before block ``start``); a *shallow* pass runs the blocks outside the span and adds the kept residual where
the span would run. The PostDiff paper does not say how it cached on PixArt: this is our choice, documented in
docs (recipes.md). The residual travels as a (batch, h / patch, w / patch, channels) map, the layout of the cached
cross-attention outputs, so exported graphs keep every dimension a multiple of the latent size.

Cross-attention caching works as for the UNet (``postdiff.pytorch.split_base``): every block's ``attn2`` is wrapped by a
processor that computes, captures or returns a given tensor, decided by each call's explicit inputs.

Variants (``Step.variant``), the UNet's names:
    full            (sample, timestep, ehs, mask[, resolution, aspect_ratio]) -> (eps, deep)
    full_capture    same inputs                                                -> (eps, deep, *xattn)
    full_cached     same inputs + *xattn                                       -> (eps, deep)
    shallow         same inputs + deep                                         -> (eps,)
    shallow_cached  same inputs + deep + *xattn[blocks outside the span]       -> (eps,)

``eps`` is the transformer's whole output (PixArt-α's 8 channels: the noise prediction and the learned variance,
which the pipelines drop); ``TransformerVariantModule`` (what exporters trace) returns the noise prediction only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from postdiff.errors import ModelError
from postdiff.plan.compiler import ModelSpec, block_span, cut_choices
from postdiff.pytorch.split_base import CrossAttentionSplit, SplitVariantModule, seeded_randn

SUPPORTED_TRANSFORMERS = ("PixArtTransformer2DModel", "SanaTransformer2DModel")


def transformer_spec(transformer, name: str = "transformer", supported: tuple[str, ...] = SUPPORTED_TRANSFORMERS) -> ModelSpec:
    """The planner's view of a transformer of one of the ``supported`` classes (this module's, or the MMDiT's)."""
    check_supported(transformer, supported)
    cfg = transformer.config
    return ModelSpec(
        name=name,
        downsample_factor=int(cfg.patch_size),
        num_down_blocks=cut_choices(int(cfg.num_layers)),
        # an MMDiT's text joins every block's attention: its keys and values stand in for cross-attention (mmdit.py)
        has_cross_attention=cfg.get("cross_attention_dim") is not None or cfg.get("joint_attention_dim") is not None,
        num_layers=int(cfg.num_layers),
    )


def check_supported(transformer, supported: tuple[str, ...] = SUPPORTED_TRANSFORMERS, layers: int | None = None) -> None:
    if type(transformer).__name__ not in supported:
        raise ModelError(f"PostDiff splits the transformers {supported}, not {type(transformer).__name__}")
    layers = int(transformer.config.num_layers) if layers is None else layers
    if layers < 3:
        raise ModelError(f"block caching needs at least 3 transformer blocks (one cached between two computed); this one has {layers}")


def learned_sigma(config) -> bool:
    """Whether the transformer also predicts the variance (PixArt-α: 8 output channels for 4 latent ones); the
    PixArt pipelines keep the first half."""
    out = config.out_channels if config.out_channels is not None else config.in_channels
    return int(out) // 2 == int(config.in_channels)


class TransformerSplit(CrossAttentionSplit):
    """The callables of one PixArt or SANA transformer for one cached span. A context manager like ``UNetSplit``."""

    def __init__(self, transformer, block: int = 0, *, span: Sequence[int] | None = None, cpu_conv: str | None = None) -> None:
        check_supported(transformer)
        self.transformer = transformer
        self.unet = transformer  # the network every split exposes under one name (VariantModule registers it)
        self.block = block
        n = int(transformer.config.num_layers)
        self.span = block_span(n, block, span)
        self.patch = int(transformer.config.patch_size)
        self.sana = type(transformer).__name__ == "SanaTransformer2DModel"
        if self.sana and transformer.config.guidance_embeds:
            raise ModelError("SANA with an embedded guidance scale (SANA-Sprint) is not supported yet; use a SANA model with CFG")
        self.additional = bool(getattr(transformer, "use_additional_conditions", False))
        self.learned_sigma = learned_sigma(transformer.config)
        with_attn2 = [i for i, blk in enumerate(transformer.transformer_blocks) if getattr(blk, "attn2", None) is not None]
        a, b = self.span
        self._wrap([transformer.transformer_blocks[i].attn2 for i in with_attn2], [k for k, i in enumerate(with_attn2) if not a <= i < b])

    def step(self, variant: str, sample, timestep, cond, deep=None, xattn: Sequence = ()):
        """``forward`` with the inputs a ``Conditioning`` holds (what ``TorchDenoiser`` calls)."""
        return self.forward(
            variant,
            sample,
            timestep,
            cond.encoder_hidden_states,
            cond.encoder_attention_mask,
            cond.resolution,
            cond.aspect_ratio,
            deep,
            xattn,
            cond.cross_attention_kwargs,
        )

    def forward(
        self,
        variant: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
        deep: torch.Tensor | None = None,
        xattn: Sequence[torch.Tensor] = (),
        cross_attention_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """One variant, as ``PixArtTransformer2DModel.forward`` computes it: (eps, deep[, *xattn]) or (eps,)."""
        wanted = self.xattn_indices(variant)
        depth, mode = self._check_variant(variant, deep, xattn, wanted)
        model = self.transformer
        if self.additional and (resolution is None or aspect_ratio is None):
            raise ValueError("this PixArt transformer is conditioned on the image's resolution and aspect ratio; pass both")
        mask = encoder_attention_mask
        if mask is not None and mask.ndim == 2:  # 1 = keep, 0 = discard, as the transformer converts it
            mask = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        batch = sample.shape[0]
        hp, wp = sample.shape[-2] // self.patch, sample.shape[-1] // self.patch
        h = self._embed_patches(sample, hp, wp)
        if self.sana:
            t, embedded_t = model.time_embed(timestep, batch_size=batch, hidden_dtype=h.dtype)
        else:
            added = {"resolution": resolution, "aspect_ratio": aspect_ratio}
            t, embedded_t = model.adaln_single(timestep, added, batch_size=batch, hidden_dtype=h.dtype)
        ehs = encoder_hidden_states
        if model.caption_projection is not None:
            ehs = model.caption_projection(ehs).view(batch, -1, h.shape[-1])
        if self.sana:
            ehs = model.caption_norm(ehs)
        a, b = self.span
        blocks = list(model.transformer_blocks)
        kw = cross_attention_kwargs

        def run(i, x):
            if self.sana:  # its convolutional MLP needs the patch grid
                return blocks[i](x, None, ehs, mask, t, hp, wp)
            return blocks[i](
                x, attention_mask=None, encoder_hidden_states=ehs, encoder_attention_mask=mask, timestep=t, cross_attention_kwargs=kw
            )

        inputs = dict(zip(wanted, xattn)) if mode == "cached" else None
        with self._xattn(mode, inputs) as io:
            io.hw = (hp, wp)
            for i in range(a):
                h = run(i, h)
            if depth == "full":
                before = h
                for i in range(a, b):
                    h = run(i, h)
                residual = (h - before).unflatten(1, (hp, wp))
            else:
                h = h + deep.flatten(1, 2)
            for i in range(b, len(blocks)):
                h = run(i, h)
            captured = [io.outputs[i] for i in wanted] if mode == "capture" else []
        if self.sana:  # SanaModulatedNorm: the same modulation as PixArt's head, in one module
            h = model.norm_out(h, embedded_t, model.scale_shift_table)
        else:
            shift, scale = (model.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
            h = model.norm_out(h) * (1 + scale) + shift
        h = model.proj_out(h)  # (the transformer squeezes a 1-token axis here; the reshape below needs no squeeze)
        c = int(model.config.out_channels or model.config.in_channels)
        h = h.reshape(-1, hp, wp, self.patch, self.patch, c)
        eps = torch.einsum("nhwpqc->nchpwq", h).reshape(-1, c, hp * self.patch, wp * self.patch)
        if depth == "shallow":
            return (eps,)
        return (eps, residual, *captured)

    def _embed_patches(self, sample, hp: int, wp: int):
        """``PatchEmbed.forward`` with the position embedding always computed for the patch grid (the function the
        module stores its native-size table with, so the values are the same): the module's branch between its table
        and a recomputed one would pin exported graphs' dynamic sizes."""
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        pe = self.transformer.patch_embed if self.sana else self.transformer.pos_embed
        if pe.pos_embed_max_size is not None:  # PixArt does not crop: the module's own path
            return pe(sample)
        latent = pe.proj(sample)
        if pe.flatten:
            latent = latent.flatten(2).transpose(1, 2)
        if pe.layer_norm:
            latent = pe.norm(latent)
        if pe.pos_embed is None:
            return latent
        pos = get_2d_sincos_pos_embed(
            embed_dim=pe.pos_embed.shape[-1],
            grid_size=(hp, wp),
            base_size=pe.base_size,
            interpolation_scale=pe.interpolation_scale,
            device=latent.device,
            output_type="pt",
        )
        pos = pos.float().unsqueeze(0)
        if pe.pos_embed.dtype != torch.float32 and (hp, wp) == (pe.height, pe.width):
            # a half-precision module adds its stored table (these values, rounded to its dtype) at its native grid,
            # in that dtype; only asked when the table is not float32, so fp32 exports keep their dynamic sizes
            pos = pos.to(pe.pos_embed.dtype)
        return (latent + pos).to(latent.dtype)

    def module(self, variant: str) -> nn.Module:
        return TransformerVariantModule(self, variant)


class TransformerVariantModule(SplitVariantModule):
    """One variant with explicit tensor inputs and outputs, for ``torch.export`` and the exporters (the interface of
    ``postdiff.pytorch.unet.VariantModule``).

    forward(sample, timestep, encoder_hidden_states, encoder_attention_mask[, resolution, aspect_ratio][, deep][, *xattn])

    ``eps`` is the noise prediction only (the learned variance is dropped, as the PixArt pipelines drop it);
    ``encoder_attention_mask`` is float, 1 for a kept token and 0 for padding."""

    def __init__(self, split: TransformerSplit, variant: str) -> None:
        super().__init__(split, split.transformer, variant)

    def input_names(self) -> list[str]:
        names = ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
        if self._split.additional:
            names += ["resolution", "aspect_ratio"]
        if self.takes_deep:
            names.append("deep")
        return names + [f"xattn_{i}" for i in self.xattn_in]

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask, *rest):
        rest = list(rest)
        resolution = aspect_ratio = deep = None
        if self._split.additional:
            resolution, aspect_ratio = rest.pop(0), rest.pop(0)
        if self.takes_deep:
            deep = rest.pop(0)
        # the mask as the transformer's additive bias, one row per patch: ONNX's Attention operator (ONNX Runtime's CPU
        # kernel) takes a mask with the queries' length, where PyTorch broadcasts one row over every query
        patches = (sample.shape[-2] // self._split.patch) * (sample.shape[-1] // self._split.patch)
        bias = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        bias = bias.expand(-1, patches, -1)
        out = self._split.forward(self.variant, sample, timestep, encoder_hidden_states, bias, resolution, aspect_ratio, deep, tuple(rest))
        if self._split.learned_sigma:
            out = (out[0][:, : out[0].shape[1] // 2], *out[1:])
        return out

    def example_inputs(
        self, latent_hw, batch: int, *, text_len: int, pooled_dim=None, device="cpu", seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Random inputs by name; the cache tensors come from a ``full_capture`` pass on the same inputs."""
        cfg = self.unet.config
        randn = seeded_randn(seed, device)

        mask = torch.ones(batch, text_len, device=device)
        if text_len > 1 and str(device) != "meta":
            mask[:, text_len // 2 :] = 0.0  # padding, as T5 prompts shorter than the maximum have
        ins: dict[str, torch.Tensor] = {
            "sample": randn(batch, cfg.in_channels, *latent_hw),
            "timestep": torch.full((batch,), 500.0, device=device),
            "encoder_hidden_states": randn(batch, text_len, cfg.caption_channels or cfg.cross_attention_dim),
            "encoder_attention_mask": mask,
        }
        if self._split.additional:
            h, w = latent_hw
            ins["resolution"] = torch.tensor([[8.0 * h, 8.0 * w]] * batch, device=device)
            ins["aspect_ratio"] = torch.tensor([[h / w]] * batch, device=device)
        if self.takes_deep or self.xattn_in:
            with torch.no_grad():
                probe = self._split.forward("full_capture", *list(ins.values())[:4], ins.get("resolution"), ins.get("aspect_ratio"))
            ins = self._with_caches(ins, probe)
        return ins

    def dynamic_shapes(self, max_side: int = 2048) -> tuple:
        """``torch.export`` dynamic shapes: batch, text length, and latent sides as multiples of the patch size."""
        from torch.export import Dim

        p = self._split.patch
        batch = Dim("batch", min=1, max=63)
        h, w = Dim("h", min=1, max=max_side // 8 // p), Dim("w", min=1, max=max_side // 8 // p)
        text = Dim("text", min=2, max=512)
        by_name = {
            "sample": {0: batch, 2: p * h, 3: p * w},
            "timestep": {0: batch},
            "encoder_hidden_states": {0: batch, 1: text},
            "encoder_attention_mask": {0: batch, 1: text},
            "resolution": {0: batch},
            "aspect_ratio": {0: batch},
            "deep": {0: batch, 1: h, 2: w},
        }
        for i in self.xattn_in:
            by_name[f"xattn_{i}"] = {0: batch, 1: h, 2: w}
        return self._in_input_order(by_name)
