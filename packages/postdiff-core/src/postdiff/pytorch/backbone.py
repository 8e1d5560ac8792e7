"""The denoising network a model has, UNet or transformer, behind one set of functions.

Everything that used to assume a ``UNet2DConditionModel`` asks here instead: which diffusers class a configuration
builds (``network_class``), the network of a pipeline (``network_of``), the structure without weights
(``meta_network``), the planner's ``ModelSpec`` (``spec_of``) and the split into plan variants for a recipe
(``split_for``: ``postdiff.pytorch.unet.UNetSplit``, ``postdiff.pytorch.transformer.TransformerSplit`` for PixArt or
``postdiff.pytorch.mmdit.MMDiTSplit`` for SD3, which share their interface). Plans keep the UNet's words (``unet: full|shallow``, ``deepcache``) for both kinds.
"""

from __future__ import annotations

from typing import Any

from postdiff.errors import ModelError

UNET = "UNet2DConditionModel"
MMDIT = "SD3Transformer2DModel"  # two token streams and joint attention (postdiff.pytorch.mmdit)
FLUX = "FluxTransformer2DModel"  # double- and single-stream blocks (postdiff.pytorch.mmdit; costs only)
TRANSFORMERS = ("PixArtTransformer2DModel", "SanaTransformer2DModel", MMDIT, FLUX)


def network_class(config: dict[str, Any]) -> str:
    """The diffusers class a network configuration describes (a UNet when the configuration does not say)."""
    name = dict(config).get("_class_name")
    if name is None:
        return "PixArtTransformer2DModel" if "caption_channels" in config and "num_layers" in config else UNET
    return str(name)


def is_transformer(config: dict[str, Any]) -> bool:
    return network_class(config) in TRANSFORMERS


def network_of(pipe):
    """A diffusers pipeline's denoising network: its ``transformer`` (PixArt, SD3) or its ``unet``."""
    net = getattr(pipe, "transformer", None)
    return net if net is not None else pipe.unet


def build_network(config: dict[str, Any]):
    """The network of ``config`` with freshly initialised weights (on the current default device)."""
    import diffusers

    name = network_class(config)
    if name != UNET and name not in TRANSFORMERS:
        raise ModelError(f"PostDiff plans for {UNET} and {', '.join(TRANSFORMERS)}, not {name}")
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return getattr(diffusers, name).from_config(clean).eval()


def meta_network(config: dict[str, Any]):
    """The network built on the ``meta`` device: structure without weights or memory."""
    import torch

    with torch.device("meta"):
        return build_network(config)


def spec_of(network, name: str | None = None):
    if type(network).__name__ == FLUX:
        from postdiff.pytorch.mmdit import flux_spec  # lazy: imports torch

        return flux_spec(network, name=name or "transformer")
    if type(network).__name__ == MMDIT:
        from postdiff.pytorch.mmdit import mmdit_spec  # lazy: imports torch

        return mmdit_spec(network, name=name or "transformer")
    if type(network).__name__ in TRANSFORMERS:
        from postdiff.pytorch.transformer import transformer_spec  # lazy: imports torch

        return transformer_spec(network, name=name or "transformer")
    from postdiff.pytorch.unet import model_spec  # lazy: imports torch

    return model_spec(network, name=name or "unet")


def split_for(network, recipe=None, *, block: int | None = None, span=None, cpu_conv: str | None = None):
    """The split of ``network`` into plan variants for ``recipe``'s cut (or an explicit ``block`` / ``span``)."""
    if recipe is not None:
        block, span = recipe.cache_block, recipe.cache_span
    block = block or 0
    if type(network).__name__ == FLUX:
        from postdiff.pytorch.mmdit import FluxSplit  # lazy: imports torch

        return FluxSplit(network, block=block, span=span, cpu_conv=cpu_conv)
    if type(network).__name__ == MMDIT:
        from postdiff.pytorch.mmdit import MMDiTSplit  # lazy: imports torch

        return MMDiTSplit(network, block=block, span=span, cpu_conv=cpu_conv)
    if type(network).__name__ in TRANSFORMERS:
        from postdiff.pytorch.transformer import TransformerSplit  # lazy: imports torch

        return TransformerSplit(network, block=block, span=span, cpu_conv=cpu_conv)
    if span is not None:
        raise ModelError("deepcache.span names transformer blocks; this model has a UNet, so use deepcache.block")
    from postdiff.pytorch.unet import UNetSplit  # lazy: imports torch

    return UNetSplit(network, block=block, cpu_conv=cpu_conv)


def downsample_factor(network) -> int:
    """The factor a latent side must be a multiple of: a UNet's downsampling, a transformer's patch size (FLUX: its
    2x2 packing)."""
    if type(network).__name__ == FLUX:
        return 2
    if type(network).__name__ in TRANSFORMERS:
        return int(network.config.patch_size)
    from postdiff.pytorch.unet import downsample_factor as unet_factor  # lazy: imports torch

    return unet_factor(network)
