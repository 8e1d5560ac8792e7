"""A diffusers ``UNet2DConditionModel`` as explicit, exportable callables.

The UNet is seen as a ladder of layers. The down path produces skip tensors ("res samples"): conv_in, then
each (resnet[, attention]) layer and each downsampler. The up path consumes them in reverse, one per
(resnet[, attention]) layer. DeepCache with ``block=b`` cuts the ladder after the first layer of down block
``b``: the *shallow* pass runs only the layers above the cut (conv_in, the first layers of the down path, the
mirrored last layers of the up path, conv_out) and takes the hidden state that enters the first mirrored up
layer from the cache; the *full* pass runs everything and returns that hidden state as the cache.

Cross-attention caching works on every ``attn2`` module (cross-attention) through the processor wrappers of
``postdiff.pytorch.split_base``, which this split shares with the transformer's.

Variants (``Step.variant``):
    full            (sample, timestep, ehs[, text_embeds, time_ids]) -> (eps, deep)
    full_capture    same inputs                                      -> (eps, deep, *xattn)
    full_cached     same inputs + *xattn                             -> (eps, deep)
    shallow         same inputs + deep                               -> (eps,)
    shallow_cached  same inputs + deep + *xattn[shallow subset]      -> (eps,)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from postdiff.errors import ModelError
from postdiff.plan.compiler import ModelSpec, guidance_dim
from postdiff.pytorch.cpu_conv import ConvPath, mode_from_env
from postdiff.pytorch.split_base import CrossAttentionSplit, SplitVariantModule, seeded_randn

SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


@dataclass
class _Layer:
    """One rung of the ladder: a resnet (+ attention) pair, a down/upsampler, or conv_in."""

    kind: str  # "conv_in" | "res" | "down" | "up"
    resnet: nn.Module | None = None
    attention: nn.Module | None = None
    sampler: nn.Module | None = None
    xattn: list[int] = field(default_factory=list)  # indices of the attn2 modules this layer runs


def _attn2_modules(module: nn.Module | None) -> list[nn.Module]:
    if module is None:
        return []
    return [m for m in module.modules() if type(m).__name__ == "Attention" and getattr(m, "is_cross_attention", False)]


def downsample_factor(unet) -> int:
    return 2 ** sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None) is not None)


def model_spec(unet, name: str = "unet") -> ModelSpec:
    return ModelSpec(
        name=name,
        downsample_factor=downsample_factor(unet),
        num_down_blocks=len(unet.down_blocks),
        has_cross_attention=bool(_attn2_modules(unet)),
        guidance_embedded=guidance_dim(unet.config) is not None,
    )


def _check_supported(unet) -> None:
    if type(unet).__name__ != "UNet2DConditionModel":
        raise ModelError(f"PostDiff splits diffusers UNet2DConditionModel, not {type(unet).__name__}")
    bad = [type(b).__name__ for b in unet.down_blocks if type(b).__name__ not in SUPPORTED_DOWN]
    bad += [type(b).__name__ for b in unet.up_blocks if type(b).__name__ not in SUPPORTED_UP]
    if unet.mid_block is not None and type(unet.mid_block).__name__ not in SUPPORTED_MID:
        bad.append(type(unet.mid_block).__name__)
    if bad:
        raise ModelError(
            f"unsupported UNet block type(s) {sorted(set(bad))}; PostDiff supports the SD 1.x/2.x/SDXL blocks "
            f"{SUPPORTED_DOWN + SUPPORTED_UP + SUPPORTED_MID}"
        )
    cfg = unet.config
    unsupported = {
        "class_embed_type": cfg.class_embed_type,
        "addition_embed_type": cfg.addition_embed_type if cfg.addition_embed_type not in (None, "text_time") else None,
        # "ip_image_proj": an IP-Adapter loaded with load_ip_adapter (its image tokens come in added_cond_kwargs)
        "encoder_hid_dim_type": cfg.encoder_hid_dim_type if cfg.encoder_hid_dim_type != "ip_image_proj" else None,
    }
    unsupported = {k: v for k, v in unsupported.items() if v is not None}
    if unsupported:
        raise ModelError(f"unsupported UNet configuration {unsupported}; PostDiff supports SD 1.x/2.x and SDXL UNets")


@contextlib.contextmanager
def _lora_scaled(unet, cross_attention_kwargs: dict | None):
    """As ``UNet2DConditionModel.forward`` does: ``cross_attention_kwargs["scale"]`` scales the UNet's PEFT LoRA layers
    (``load_lora_weights``, unfused) for this call and is not passed on to the attention processors."""
    if not cross_attention_kwargs or "scale" not in cross_attention_kwargs:
        yield cross_attention_kwargs
        return
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    kw = dict(cross_attention_kwargs)
    scale = kw.pop("scale")
    if USE_PEFT_BACKEND:
        scale_lora_layers(unet, scale)
    try:
        yield kw or None
    finally:
        if USE_PEFT_BACKEND:
            unscale_lora_layers(unet, scale)


class UNetSplit(CrossAttentionSplit):
    """The callables of one UNet for one DeepCache cut. Use as a context manager (or call ``close``) so the
    cross-attention wrappers are removed from the UNet afterwards."""

    def __init__(self, unet, block: int = 0, *, cpu_conv: str | None = None) -> None:
        _check_supported(unet)
        if not 0 <= block < len(unet.down_blocks):
            raise ModelError(f"DeepCache block {block} out of range: this UNet has {len(unet.down_blocks)} down blocks")
        self.unet = unet
        self.block = block
        self.conv_path = ConvPath(cpu_conv or mode_from_env())  # see cpu_conv.py
        self.is_sdxl = unet.config.addition_embed_type == "text_time"
        self.num_upsamplers = unet.num_upsamplers

        self.down_layers: list[_Layer] = [_Layer("conv_in")]
        self.cut = None  # index of the last res sample the shallow pass produces
        for b, blk in enumerate(unet.down_blocks):
            attns = list(getattr(blk, "attentions", None) or [None] * len(blk.resnets))
            for j, (res, att) in enumerate(zip(blk.resnets, attns)):
                if b == block and j == 0:
                    self.cut = len(self.down_layers)
                self.down_layers.append(_Layer("res", resnet=res, attention=att))
            if blk.downsamplers is not None:
                self.down_layers.append(_Layer("down", sampler=blk.downsamplers))
        # Up layers, each consuming one res sample; an upsampler closes every block but the last.
        self.up_layers: list[_Layer] = []
        for blk in unet.up_blocks:
            attns = list(getattr(blk, "attentions", None) or [None] * len(blk.resnets))
            for res, att in zip(blk.resnets, attns):
                self.up_layers.append(_Layer("res", resnet=res, attention=att))
            if blk.upsamplers is not None:
                self.up_layers.append(_Layer("up", sampler=blk.upsamplers))
        n_res = len(self.down_layers)
        n_consumers = sum(1 for layer in self.up_layers if layer.kind == "res")
        if n_res != n_consumers:
            raise ModelError(f"UNet skip connections do not pair up ({n_res} produced, {n_consumers} consumed)")
        # The up layer (position in up_layers) where the shallow pass re-enters: the consumer of res sample `cut`.
        consumer = n_res - 1 - self.cut
        seen = -1
        for pos, layer in enumerate(self.up_layers):
            if layer.kind == "res":
                seen += 1
                if seen == consumer:
                    self.entry = pos
                    break

        # Cross-attention modules in execution order, and which of them the shallow pass runs.
        attn2: list[nn.Module] = []
        layers = [*self.down_layers, ("mid", unet.mid_block), *self.up_layers]
        for layer in layers:
            if isinstance(layer, tuple):
                found = _attn2_modules(layer[1])
            else:
                found = _attn2_modules(layer.attention)
                layer.xattn = list(range(len(attn2), len(attn2) + len(found)))
            attn2.extend(found)
        self._wrap(attn2, [i for layer in self.shallow_down + self.shallow_up for i in layer.xattn])

    # -- structure -------------------------------------------------------------------------------------------------
    @property
    def shallow_down(self) -> list[_Layer]:
        return self.down_layers[: self.cut + 1]

    @property
    def shallow_up(self) -> list[_Layer]:
        return self.up_layers[self.entry :]

    # -- the forward -----------------------------------------------------------------------------------------------
    def _embed(self, sample, timestep, ehs, text_embeds, time_ids, timestep_cond, image_embeds=None):
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.is_sdxl else None
        if image_embeds is not None:  # IP-Adapter: process_encoder_hidden_states adds the projected image tokens
            added = {**(added or {}), "image_embeds": list(image_embeds)}
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added)
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ehs = unet.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=added)
        return sample, emb, ehs

    def _attend(self, attention, h, ehs, kw):
        if attention is None:
            return h
        self.io.hw = tuple(h.shape[-2:])
        return attention(h, encoder_hidden_states=ehs, cross_attention_kwargs=kw, return_dict=False)[0]

    def step(self, variant: str, sample, timestep, cond, deep=None, xattn: Sequence = ()):
        """``forward`` with the inputs a ``Conditioning`` holds (what ``TorchDenoiser`` calls)."""
        return self.forward(
            variant,
            sample,
            timestep,
            cond.encoder_hidden_states,
            cond.text_embeds,
            cond.time_ids,
            deep,
            xattn,
            cond.timestep_cond,
            cond.cross_attention_kwargs,
            cond.down_block_additional_residuals,
            cond.mid_block_additional_residual,
            cond.image_embeds,
        )

    def forward(self, variant: str, sample: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        """Run one variant; returns (eps, deep) for full variants (+ xattn outputs for *_capture), (eps,) for shallow.
        Arguments as ``_forward``; on CPU under the convolution path ``cpu_conv`` picks."""
        key = (variant, tuple(sample.shape))
        return self.conv_path.run(key, sample.device.type == "cpu", lambda: self._forward(variant, sample, *args, **kwargs))

    def _forward(
        self,
        variant: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        deep: torch.Tensor | None = None,
        xattn: Sequence[torch.Tensor] = (),
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
        image_embeds: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        with _lora_scaled(self.unet, cross_attention_kwargs) as kw:
            sample, emb, ehs = self._embed(sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond, image_embeds)
            return self._run(variant, sample, emb, ehs, deep, xattn, kw, down_residuals, mid_residual)

    def _run(self, variant, sample, emb, ehs, deep, xattn, kw, down_residuals, mid_residual):
        wanted = self.xattn_indices(variant)
        depth, mode = self._check_variant(variant, deep, xattn, wanted)
        unet = self.unet
        up_factor = 2**self.num_upsamplers
        forward_size = any(d % up_factor != 0 for d in sample.shape[-2:])

        with self._xattn(mode, dict(zip(wanted, xattn)) if mode == "cached" else None) as io:
            down_layers = self.down_layers if depth == "full" else self.shallow_down
            res: list[torch.Tensor] = []
            h = sample
            for layer in down_layers:
                if layer.kind == "conv_in":
                    h = unet.conv_in(h)
                elif layer.kind == "res":
                    h = self._attend(layer.attention, layer.resnet(h, emb), ehs, kw)
                else:
                    for s in layer.sampler:
                        h = s(h)
                res.append(h)
            if down_residuals is not None:
                # ControlNet, as UNet2DConditionModel adds it: one residual per skip connection, added after the down
                # path ran. A shallow pass produces (and its up layers consume) only the skips above the cut, so it
                # uses only their residuals: the first cut + 1, the cut layer's input and everything above it.
                if len(down_residuals) != len(self.down_layers):
                    raise ModelError(
                        f"ControlNet gave {len(down_residuals)} residuals; this UNet has {len(self.down_layers)} skip connections"
                    )
                res = [r + extra for r, extra in zip(res, down_residuals)]
            if depth == "full":
                if unet.mid_block is not None:
                    io.hw = tuple(h.shape[-2:])
                    if getattr(unet.mid_block, "has_cross_attention", False):
                        h = unet.mid_block(h, emb, encoder_hidden_states=ehs, cross_attention_kwargs=kw)
                    else:
                        h = unet.mid_block(h, emb)
                if mid_residual is not None:
                    h = h + mid_residual
                up_layers = self.up_layers
            else:
                h = deep
                up_layers = self.shallow_up
            cache = None
            for pos, layer in enumerate(up_layers, start=0 if depth == "full" else self.entry):
                if pos == self.entry:
                    cache = h
                if layer.kind == "res":
                    h = torch.cat([h, res.pop()], dim=1)
                    h = self._attend(layer.attention, layer.resnet(h, emb), ehs, kw)
                else:
                    size = res[-1].shape[2:] if forward_size and res else None
                    for s in layer.sampler:
                        h = s(h, size)
            if unet.conv_norm_out is not None:
                h = unet.conv_act(unet.conv_norm_out(h))
            eps = unet.conv_out(h)
            captured = [io.outputs[i] for i in wanted] if mode == "capture" else []
        if depth == "shallow":
            return (eps,)
        return (eps, cache, *captured)

    def module(self, variant: str) -> nn.Module:
        """An ``nn.Module`` with explicit tensor inputs/outputs for ``variant``, for torch.export and exporters."""
        return VariantModule(self, variant)


class VariantModule(SplitVariantModule):
    """One UNet variant with explicit tensor inputs and outputs, for ``torch.export`` and the exporters.

    forward(sample, timestep, encoder_hidden_states[, text_embeds, time_ids][, timestep_cond][, deep][, *xattn]) -> tuple

    ``timestep`` has one value per batch row.
    """

    def __init__(self, split: UNetSplit, variant: str) -> None:
        super().__init__(split, split.unet, variant)
        # a guidance-distilled UNet (LCM) takes the guidance scale's embedding as an input of every variant
        self.cond_dim = guidance_dim(split.unet.config)
        self.takes_guidance = self.cond_dim is not None

    def input_names(self) -> list[str]:
        names = ["sample", "timestep", "encoder_hidden_states"]
        if self._split.is_sdxl:
            names += ["text_embeds", "time_ids"]
        if self.takes_guidance:
            names.append("timestep_cond")
        if self.takes_deep:
            names.append("deep")
        return names + [f"xattn_{i}" for i in self.xattn_in]

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        rest = list(rest)
        text_embeds = time_ids = deep = timestep_cond = None
        if self._split.is_sdxl:
            text_embeds, time_ids = rest.pop(0), rest.pop(0)
        if self.takes_guidance:
            timestep_cond = rest.pop(0)
        if self.takes_deep:
            deep = rest.pop(0)
        return self._split.forward(
            self.variant, sample, timestep, encoder_hidden_states, text_embeds, time_ids, deep, tuple(rest), timestep_cond
        )

    def example_inputs(
        self, latent_hw: tuple[int, int], batch: int, *, text_len: int, pooled_dim: int | None = None, device="cpu", seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Random inputs by name (in ``input_names`` order). The cache tensors are what a ``full_capture`` pass on
        the same inputs returns, so a shallow or cached variant sees the values it would get in a plan."""
        cfg = self.unet.config
        randn = seeded_randn(seed, device)

        ins: dict[str, torch.Tensor] = {
            "sample": randn(batch, cfg.in_channels, *latent_hw),
            "timestep": torch.full((batch,), 500.0, device=device),
            "encoder_hidden_states": randn(batch, text_len, cfg.cross_attention_dim),
        }
        if self._split.is_sdxl:
            if pooled_dim is None:
                pooled_dim = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
            ins["text_embeds"] = randn(batch, pooled_dim)
            h, w = latent_hw
            ins["time_ids"] = torch.tensor([[8.0 * h, 8.0 * w, 0.0, 0.0, 8.0 * h, 8.0 * w]] * batch, device=device)
        if self.takes_guidance:
            ins["timestep_cond"] = randn(batch, int(self.cond_dim))
        if self.takes_deep or self.xattn_in:
            with torch.no_grad():
                ins = self._with_caches(ins, self._split.forward("full_capture", *ins.values()))
        return ins

    def dynamic_shapes(self, max_side: int = 2048) -> tuple:
        """``torch.export`` dynamic shapes for ``forward``'s arguments (images up to ``max_side`` pixels at a VAE
        factor of 8): batch everywhere; latent height and width as
        multiples of the UNet's downsampling factor (what the UNet can take); the DeepCache feature at the cut's
        resolution; cross-attention maps at their layers' resolutions."""
        from torch.export import Dim

        f = downsample_factor(self.unet)
        # diffusers' Upsample2D adds a .contiguous() from batch 64 up: a guard for torch.export, a no-op in the graph.
        # The exported graph takes any batch; the bound only keeps torch.export from tracing that branch.
        batch = Dim("batch", min=1, max=63)
        h, w = Dim("h", min=1, max=max_side // 8 // f), Dim("w", min=1, max=max_side // 8 // f)
        spatial = {0: batch, 2: f * h, 3: f * w}
        deep_f = max(f >> self._split.block, 1)
        by_name = {
            "sample": spatial,
            "timestep": {0: batch},
            "encoder_hidden_states": {0: batch},
            "text_embeds": {0: batch},
            "time_ids": {0: batch},
            "timestep_cond": {0: batch},
            "deep": {0: batch, 2: deep_f * h, 3: deep_f * w},
        }
        if self.xattn_in:  # each cached cross-attention map is at its layer's resolution: probe it once
            probe = self.example_inputs((2 * f, 2 * f), 1, text_len=1)
            for i in self.xattn_in:
                k = max(probe[f"xattn_{i}"].shape[1] // 2, 1)
                by_name[f"xattn_{i}"] = {0: batch, 1: k * h, 2: k * w}
        specs = [by_name[n] for n in self.input_names()]
        return (*specs[:3], tuple(specs[3:])) if len(specs) > 3 else tuple(specs)  # *rest is one tuple argument
