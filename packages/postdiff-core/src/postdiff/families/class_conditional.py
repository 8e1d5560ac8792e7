"""The class-conditional family: the embedded reference models (class tokens from a class encoder)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from postdiff.errors import RecipeError, brief
from postdiff.families.base import Family, register_family
from postdiff.loop.arrays import TORCH
from postdiff.loop.conditioning import Conditioning
from postdiff.loop.resolution import init_noise_sigma
from postdiff.loop.sampling import run_plan


@register_family
class ClassConditional(Family):
    """A class-conditional UNet whose class tokens come from a class encoder (the embedded reference models):
    the class tokens play the text embeddings' role, the null class is the empty condition for CFG."""

    name = "class-conditional"
    aliases = ("reference",)
    default_guidance = 3.0
    condition = "label"
    roles = ("class_encoder",)

    def matches(self, model) -> bool:
        return hasattr(model.pipeline, "class_encoder")

    def parse_condition(self, text, info) -> int:
        """A class index, or a class name from the model's ``class_names`` (case and "/" ignored, plus its aliases)."""
        n = int(info.get("num_classes", 10))
        if text is None:
            return int(info.get("default_class", n - 1))
        if isinstance(text, int) or str(text).strip().isdigit():
            label = int(text)
            if 0 <= label < n:
                return label
        else:
            names = {c.lower(): i for i, c in enumerate(info.get("class_names") or ())}
            names |= {c.lower().replace("/", " "): i for i, c in enumerate(info.get("class_names") or ())}
            names |= {k.lower(): int(v) for k, v in (info.get("class_aliases") or {}).items()}
            key = str(text).strip().lower()
            if key in names and not key.isdigit():
                return names[key]
        noun = info.get("class_noun", "class")
        named = [c for c in info.get("class_names") or () if not c.isdigit()]
        raise RecipeError(f"unknown {noun} {brief(text)}; use 0-{n - 1}" + (f" or one of: {', '.join(named)}" if named else ""))

    def default_conditions(self, n, info) -> list:
        return [i % int(info.get("num_classes", 10)) for i in range(n)]

    def pipeline_graphs(self, model) -> list:
        import torch

        from postdiff.pytorch.graphs import ClassEncoderGraph, GraphSource, batch_dim  # lazy: imports torch

        def labels(hw, b):
            return {"labels": torch.arange(b) % int(model.pipeline.num_classes)}

        enc = ClassEncoderGraph(model.pipeline.class_encoder).eval()
        return [GraphSource("class_encoder", "class_encoder", enc, ["labels"], ["encoder_hidden_states"], labels, ({0: batch_dim()},))]

    def bundle_info(self, model) -> dict[str, Any]:
        pipe = model.pipeline
        return {
            "guidance": self.default_guidance,
            "null_class": int(pipe.null_class),
            "num_classes": int(pipe.num_classes),
            **{k: v for k, v in self.condition_info(pipe).items() if k != "num_classes"},
            "training_sizes": list(model.training_sizes or ()),
        }

    def condition_info(self, pipe) -> dict[str, Any]:
        """What ``parse_condition`` needs from a class-conditional pipeline (also stored in the manifest)."""
        return {
            "num_classes": int(pipe.num_classes),
            "class_names": list(getattr(pipe, "class_names", ()) or ()),
            "class_aliases": dict(getattr(pipe, "class_aliases", {}) or {}),
            "class_noun": getattr(pipe, "class_noun", "class"),
            "default_class": int(getattr(pipe, "default_class", int(pipe.num_classes) - 1)),
            "dataset": getattr(pipe, "dataset", None),
        }

    def sample(
        self,
        labels: Sequence[int],
        plan,
        denoiser,
        encode: Callable,
        make_scheduler: Callable[[], object],
        *,
        null_class: int,
        num_classes: int,
        channels: int = 1,
        seed: int,
        guidance_scale: float,
        batch_size: int,
        progress: bool = False,
        ops=None,
        latents_out: list | None = None,
        first: int = 0,
    ):
        """The class-conditional sampling loop, whatever runs the networks (PyTorch, a bundle's graphs) and whatever
        holds the arrays (``ops``: ``postdiff.arrays.TORCH`` by default, ``NUMPY`` for the runtime without PyTorch):
        ``encode`` maps class indices to tokens, ``denoiser`` runs plan steps. uint8 images N x H x W (pixel space)."""

        ops = ops or TORCH
        labels = [int(y) for y in labels]
        h, w = plan.latent_hw  # pixel space: the image size
        if len(labels) == 0:
            return np.zeros((0, h, w), dtype=np.uint8)
        if min(labels) < 0 or max(labels) >= num_classes:
            raise RecipeError(f"labels must be class indices 0-{num_classes - 1}")
        # image i of the request is sample first + i: a shard of a larger request draws that sample's noise
        noise = ops.cat([ops.randn((1, channels, h, w), self.generator(seed, first + i, ops)) for i in range(len(labels))])
        out = []
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size]
            if guidance_scale > 1.0:  # null class first, as diffusers lays out CFG batches
                cond = Conditioning(encode(ops.asarray([null_class] * len(y) + y, dtype="int64")), has_uncond=True)
            else:
                cond = Conditioning(encode(ops.asarray(y, dtype="int64")), has_uncond=False)
            sch = make_scheduler()
            # per-sample generators for the noise drawn later (resolution switch, ancestral samplers)
            g = [ops.generator(seed * 7919 + first + i) for i in range(start, start + len(y))]
            # the noise is drawn on the CPU in float32 (the seed's numbers on every device), then follows the network
            x = ops.follow(noise[start : start + batch_size] * init_noise_sigma(sch), cond.encoder_hidden_states)
            x = run_plan(
                plan, denoiser, sch, cond, guidance_scale=guidance_scale, generator=g, latents=x, channels=channels, progress=progress
            )
            out.append(ops.to_uint8_images(x)[:, 0])
            if latents_out is not None:  # the final latents too (golden tensors)
                latents_out.append(ops.numpy(x))
        return np.concatenate(out)

    def generate_bundle(self, pipe, conditions, plan, denoiser, *, seed, guidance, scheduler, batch_size, progress, ops):

        info = pipe.info
        graph = pipe.manifest.graph("class_encoder")
        if pipe.static:
            if len(conditions) % pipe.static_batch:
                raise RecipeError(
                    f"static graphs run exactly {pipe.static_batch} images per call; ask for a multiple of {pipe.static_batch}"
                )
            batch_size = pipe.static_batch

        def encode(y):
            tokens = pipe.run(graph, {"labels": np.asarray(ops.numpy(y), dtype=np.int64)})["encoder_hidden_states"]
            return ops.asarray(tokens)

        latents: list = []
        images = self.sample(
            conditions,
            plan,
            denoiser,
            encode,
            lambda: pipe.scheduler(scheduler, ops),
            null_class=int(info.get("null_class", 10)),
            num_classes=int(info.get("num_classes", 10)),
            channels=int(info.get("in_channels", 1)),
            seed=seed,
            guidance_scale=guidance,
            batch_size=batch_size,
            progress=progress,
            ops=ops,
            latents_out=latents,
        )
        pipe.final_latents = np.concatenate(latents) if latents else None
        return images.astype(np.float32)[..., None] / 255.0
