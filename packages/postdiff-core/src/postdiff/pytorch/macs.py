"""Cost model: multiply-accumulates (MACs) of each network variant (UNet or transformer), summed over a compiled plan.

MACs are counted on the real module structure with ``torch.utils.flop_counter.FlopCounterMode`` (MACs =
FLOPs / 2; convolutions, linear layers and the attention matmuls), on the ``meta`` device: the UNet is built
from its config without memory and no arithmetic runs, so counting SD-size models takes well under a second.
Counts are cached per (config, DeepCache cut, variant, latent size, batch). Only the denoising network is counted:
the text encoder and VAE run once per image whatever the plan.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from postdiff.plan.compiler import guidance_dim
from postdiff.pytorch.backbone import meta_network, network_class, split_for

_CACHE: dict[tuple, int] = {}


def _config_key(config: dict[str, Any]) -> str:
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MacCounter:
    """Counts MACs of the plan variants of one network configuration (a UNet's or a transformer's ``config``, or an
    architecture dict), for one cut (``block``, or a transformer's ``span``)."""

    def __init__(
        self, unet_config: dict[str, Any], *, block: int = 0, span=None, text_len: int = 77, pooled_dim: int | None = None
    ) -> None:
        self.network = network_class(unet_config)
        self.config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        self.block = block
        self.span = None if span is None else tuple(span)
        self.text_len = text_len
        self.pooled_dim = pooled_dim
        self._key = _config_key({**self.config, "_class_name": self.network})
        # guidance doubles the batch (CFG) unless the network embeds it (LCM's time_cond_proj_dim, FLUX-dev's
        # guidance_embeds: one branch per image)
        self.cfg = guidance_dim(self.config) is None and not self.config.get("guidance_embeds", False)
        self._split = None  # a UNetSplit or TransformerSplit of the meta-device network

    def _get_split(self):
        if self._split is None:
            net = meta_network({**self.config, "_class_name": self.network})
            self._split = split_for(net, block=self.block, span=self.span)
        return self._split

    def macs(self, variant: str, latent_hw: tuple[int, int], batch: int) -> int:
        key = (self._key, self.block, self.span, variant, tuple(latent_hw), batch, self.text_len)
        if key not in _CACHE:
            module = self._get_split().module(variant)
            ins = module.example_inputs(tuple(latent_hw), batch, text_len=self.text_len, pooled_dim=self.pooled_dim, device="meta")
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                module(*ins.values())
            _CACHE[key] = int(counter.get_total_flops()) // 2
        return _CACHE[key]
