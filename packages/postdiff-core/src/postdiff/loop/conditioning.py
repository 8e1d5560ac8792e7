"""What a UNet call is conditioned on, and how it changes with guidance and resolution: PyTorch tensors on the
PyTorch paths, numpy arrays in the runtime without PyTorch (the same code for both)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from postdiff.errors import RecipeError
from postdiff.loop.arrays import ops_for

Array = Any  # a torch.Tensor or a numpy.ndarray


def second_half(x: Any, full_batch: int) -> Any:
    """The conditional half of a CFG-batched input: an array whose first dimension is ``full_batch``, or each value of
    a dict (diffusers' ``added_cond_kwargs``); anything else (None, a scalar timestep, a scale) as it is."""
    if isinstance(x, dict):
        return {k: second_half(v, full_batch) for k, v in x.items()}
    if getattr(x, "ndim", 0) == 0 or x.shape[0] != full_batch:
        return x
    return x[full_batch // 2 :]


@dataclass(frozen=True)
class Conditioning:
    """Inputs of a UNet call besides the latent and the timestep.

    With classifier-free guidance on (``has_uncond``), every batched tensor holds the unconditional half first
    and the conditional half second, as diffusers pipelines lay them out.
    ``text_embeds``/``time_ids`` are SDXL's added conditioning; ``time_ids`` refer to the full-resolution image.
    ``encoder_attention_mask`` (PixArt: 1 for a kept T5 token, 0 for padding), ``resolution`` (height, width in
    pixels) and ``aspect_ratio`` are PixArt's. ``down_block_additional_residuals`` and
    ``mid_block_additional_residual`` are a ControlNet's outputs (made at the stage's size: PostDiff resizes the
    control image).
    """

    encoder_hidden_states: Array
    has_uncond: bool = True
    text_embeds: Array | None = None
    time_ids: Array | None = None
    timestep_cond: Array | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
    encoder_attention_mask: Array | None = None
    resolution: Array | None = None
    aspect_ratio: Array | None = None
    # ControlNet's residuals as diffusers pipelines pass them to the UNet (one per skip connection, and the middle's)
    down_block_additional_residuals: tuple | None = None
    mid_block_additional_residual: Array | None = None
    # IP-Adapter's image embeddings (one tensor per loaded adapter), as pipelines pass them in added_cond_kwargs
    image_embeds: tuple | None = None

    @property
    def batch(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def cond_half(self) -> Conditioning:
        """The conditional branch only (CFG dropped)."""
        if not self.has_uncond:
            return self
        n = self.batch
        return dataclasses.replace(
            self,
            encoder_hidden_states=self.encoder_hidden_states[n // 2 :],
            has_uncond=False,
            text_embeds=second_half(self.text_embeds, n),
            time_ids=second_half(self.time_ids, n),
            timestep_cond=second_half(self.timestep_cond, n),
            encoder_attention_mask=second_half(self.encoder_attention_mask, n),
            resolution=second_half(self.resolution, n),
            aspect_ratio=second_half(self.aspect_ratio, n),
            down_block_additional_residuals=None
            if self.down_block_additional_residuals is None
            else tuple(second_half(r, n) for r in self.down_block_additional_residuals),
            mid_block_additional_residual=second_half(self.mid_block_additional_residual, n),
            image_embeds=None if self.image_embeds is None else tuple(second_half(e, n) for e in self.image_embeds),
        )

    def at_size(self, latent_hw: tuple[int, int], full_hw: tuple[int, int]) -> Conditioning:
        """Size conditioning follows the stage's resolution, scaled by the ratio of the stage's latent size to the full
        one: SDXL's ``time_ids`` (original size, crop coordinates and target size: [orig_h, orig_w, crop_top,
        crop_left, target_h, target_w], or the refiner's five with an aesthetic score last, which stays) and PixArt-α's ``resolution`` (height, width), rounded to whole pixels.
        PixArt's aspect ratio is the image's and stays. Other models are unchanged."""
        if tuple(latent_hw) == tuple(full_hw) or (self.time_ids is None and self.resolution is None):
            return self
        rh, rw = latent_hw[0] / full_hw[0], latent_hw[1] / full_hw[1]

        def scaled(x):
            if x is None:
                return None
            ops = ops_for(x)
            n = int(x.shape[-1])  # SDXL refiner: [orig_h, orig_w, crop_top, crop_left, aesthetic_score]
            scale = ops.like(ops.asarray([rh, rw] * (n // 2) + [1.0] * (n % 2)), x)
            if ops.name == "torch":
                scale = scale.to(x.device)
            return ops.round(x * scale)

        return dataclasses.replace(self, time_ids=scaled(self.time_ids), resolution=scaled(self.resolution))

    def added_cond_kwargs(self) -> dict[str, Array] | None:
        if self.text_embeds is None and self.time_ids is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}


PROMPT_EMBEDDINGS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")


@dataclass(frozen=True)
class PromptEmbeddings:
    """A prompt already encoded, for a bundle exported without its text encoder (PixArt's T5-XXL is 4.7B parameters,
    which an app may run elsewhere or once): the arrays PixArt pipelines' ``encode_prompt`` returns, by the names of
    their ``__call__`` arguments. The negative pair is needed for classifier-free guidance (guidance above 1)."""

    prompt_embeds: Any
    prompt_attention_mask: Any
    negative_prompt_embeds: Any = None
    negative_prompt_attention_mask: Any = None

    @classmethod
    def load(cls, path) -> PromptEmbeddings:
        """From an ``.npz`` file holding the arrays by name (``numpy.savez(path, prompt_embeds=..., ...)``):
        embeddings 1 x tokens x width, masks 1 x tokens (1 for a token, 0 for padding)."""
        try:
            with np.load(path) as data:
                arrays = {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError) as exc:
            raise RecipeError(f"cannot read prompt embeddings from {path}: {exc}; give an .npz file made with numpy.savez") from None
        unknown = sorted(set(arrays) - set(PROMPT_EMBEDDINGS))
        missing = [k for k in PROMPT_EMBEDDINGS[:2] if k not in arrays]
        if unknown or missing:
            raise RecipeError(
                f"{path}: prompt embeddings need the arrays {', '.join(PROMPT_EMBEDDINGS[:2])} (and, for guidance, "
                f"{', '.join(PROMPT_EMBEDDINGS[2:])})"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(unknown)}" if unknown else "")
            )
        for emb, mask in (PROMPT_EMBEDDINGS[:2], PROMPT_EMBEDDINGS[2:]):
            if emb not in arrays and mask not in arrays:
                continue
            if (emb in arrays) != (mask in arrays):
                raise RecipeError(f"{path}: {emb} and {mask} come together; give both or neither")
            e, m = arrays[emb], arrays[mask]
            if e.ndim != 3 or e.shape[0] != 1 or m.shape != e.shape[:2]:
                raise RecipeError(
                    f"{path}: {emb} must be 1 x tokens x width and {mask} 1 x tokens, got {list(e.shape)} and {list(m.shape)}"
                )
            arrays[emb], arrays[mask] = e.astype(np.float32), m.astype(np.float32)
        neg = arrays.get(PROMPT_EMBEDDINGS[2])
        if neg is not None and neg.shape != arrays[PROMPT_EMBEDDINGS[0]].shape:
            raise RecipeError(
                f"{path}: negative_prompt_embeds {list(neg.shape)} and prompt_embeds {list(arrays[PROMPT_EMBEDDINGS[0]].shape)} "
                f"must have one shape (pad both to the same number of tokens, as the pipelines do)"
            )
        return cls(**arrays)


def guidance_embedding(w: float, dim: int, batch: int = 1):
    """LCM's guidance-scale embedding of ``w`` (the pipeline's guidance scale minus 1): ``dim`` sinusoids of 1000 w,
    sines then cosines, zero-padded to an odd ``dim``, one row per batch item. The arithmetic of diffusers'
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` (after VDM), in float32 numpy, so that the
    runtime without PyTorch computes it too."""
    half = dim // 2
    step = np.float32(np.log(np.float32(10000.0))) / np.float32(max(half - 1, 1))
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)
    arg = np.float32(np.float32(w) * np.float32(1000.0)) * freqs
    emb = np.concatenate([np.sin(arg), np.cos(arg), np.zeros(dim % 2, dtype=np.float32)]).astype(np.float32)
    return np.repeat(emb[None], int(batch), axis=0)
