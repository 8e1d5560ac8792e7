"""Running a plan from an exported bundle, whatever the backend: the backend only runs graphs.

A backend supplies a ``GraphRunner`` (ONNX Runtime sessions, Core ML functions); this module does the rest the
same way for every backend and the same way the PyTorch path does it: ``GraphDenoiser`` maps each plan step to
the bundle's graph for its variant and latent size and carries the cache tensors between steps (``StepCaches``);
``BundlePipeline`` encodes the conditions, draws the noise from the seed exactly as the PyTorch pipelines do,
runs the core loop (``run_plan``) and decodes. No PyTorch model is built: torch only does the scheduler
arithmetic, through diffusers' schedulers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .bundle import UNET, Graph, Manifest
from .conditioning import Conditioning
from .cost import step_batch
from .denoiser import StepCaches
from .errors import BundleError, ModelError, RecipeError
from .plan import ModelSpec, Plan, Step
from .profiling import timed_call
from .recipe import Recipe, load_recipe
from .sampling import compile_for_scheduler, run_plan


class GraphRunner(Protocol):
    def load(self, graph: Graph) -> None:
        """Open (compile, allocate) ``graph`` now rather than on its first run."""

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph of the bundle; inputs and outputs by name."""


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _xattn_indices(names: list[str]) -> list[int]:
    return [int(n.split("_", 1)[1]) for n in names if n.startswith("xattn_")]


class GraphDenoiser:
    """A ``Denoiser`` over a bundle's UNet graphs (the dynamic ones, or with ``static`` the fixed-shape copies)."""

    def __init__(self, manifest: Manifest, runner: GraphRunner, *, static: bool = False) -> None:
        self.manifest, self.runner, self.static = manifest, runner, static
        self.caches = StepCaches()

    def reset(self) -> None:
        self.caches.clear()

    def __call__(self, step: Step, sample: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
        caches = self.caches
        caches.begin(step, tuple(sample.shape[-2:]))
        batch = int(sample.shape[0])
        graph = self.manifest.unet_graph(step.variant, step.latent_hw, batch, static=self.static)
        feeds = {
            "sample": _np(sample).astype(np.float32, copy=False),
            "timestep": np.full((batch,), float(timestep), dtype=np.float32),
            "encoder_hidden_states": _np(cond.encoder_hidden_states),
        }
        if "text_embeds" in graph.input_names:
            feeds["text_embeds"] = _np(cond.text_embeds)
            feeds["time_ids"] = _np(cond.time_ids).astype(np.float32)
        if "deep" in graph.input_names:
            feeds["deep"] = caches.deep_for(step, cond)
        wanted = _xattn_indices(graph.input_names)
        if wanted:
            feeds.update({f"xattn_{i}": x for i, x in zip(wanted, caches.xattn_for(step, wanted))})
        with timed_call(step.variant, step.latent_hw, batch):
            out = self.runner.run(graph, feeds)
        if step.unet == "full":
            caches.keep_deep(step, out["deep"], cond)
        if step.xattn == "capture":
            got = _xattn_indices(graph.output_names)
            caches.keep_xattn(step, got, [out[f"xattn_{i}"] for i in got], cond)
        return torch.from_numpy(np.ascontiguousarray(out["eps"]))


class BundlePipeline:
    """Generation from a bundle: ``generate(conditions, plan, seed)`` -> N x H x W x C floats in [0, 1].

    Conditions are class labels (reference model) or prompts (SD, SDXL). Images pair with the PyTorch runs of
    the same seed: the reference model's ``ReferencePipeline`` and a diffusers pipeline under ``postdiff.apply``.
    """

    def __init__(self, folder: Path, manifest: Manifest, runner: GraphRunner, *, static: bool = False, static_batch: int = 1) -> None:
        self.folder, self.manifest, self.runner, self.static = Path(folder), manifest, runner, static
        self.static_batch = static_batch
        self.info = manifest.model
        self.kind = self.info["kind"]
        if self.kind == "unet":
            raise BundleError(
                f"this bundle holds UNet graphs only ({self.info['name']} has no text encoder or VAE): it serves "
                f"per-graph benchmarks, not generation. Export a pipeline model to generate"
            )
        self.spec = ModelSpec(**self.info["spec"])

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.info["latent_hw"])

    @property
    def image_hw(self) -> tuple[int, int]:
        return tuple(self.info["image_hw"])

    def scheduler(self, name: str | None = None):
        import diffusers

        name = name or self.info.get("scheduler") or self.info["scheduler_config"].get("_class_name", "DDIMScheduler")
        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ModelError(f"unknown scheduler {name!r}; use a diffusers scheduler class name such as DDIMScheduler")
        return cls.from_config(self.info["scheduler_config"])

    def compile(self, recipe: str | Recipe | dict | None = None, steps: int | None = None, scheduler: str | None = None) -> Plan:
        """The plan for ``recipe`` (default: the one the bundle was exported for), refused if the bundle lacks a graph."""
        recipe = load_recipe(recipe) if recipe is not None else Recipe.from_dict(self.manifest.recipe)
        if steps is not None:
            recipe = recipe.with_steps(steps)
        plan = compile_for_scheduler(recipe, self.scheduler(scheduler), self.latent_hw, self.spec)
        images, cfg = self.static_batch, self.info.get("guidance", 1.0) > 1.0
        self.manifest.check_plan(plan, static=self.static, batch_of=lambda s: step_batch(s.guidance, images, cfg))
        return plan

    def open(self, plan: Plan) -> None:
        """Load every graph ``plan`` runs (its UNet graphs and the encoders and decoder around them) now, so that
        the first generation pays no loading cost."""
        images, cfg = self.static_batch, self.info.get("guidance", 1.0) > 1.0
        for step in plan.steps:
            batch = step_batch(step.guidance, images, cfg) if self.static else None
            self.runner.load(self.manifest.unet_graph(step.variant, step.latent_hw, batch, static=self.static))
        for graph in self.manifest.graphs:
            if graph.role != UNET:
                self.runner.load(graph)

    def generate(
        self,
        conditions: Sequence,
        plan: Plan | str | Recipe | None = None,
        *,
        seed: int = 0,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        batch_size: int = 100,
        progress: bool = False,
    ) -> np.ndarray:
        plan = plan if isinstance(plan, Plan) else self.compile(plan, scheduler=scheduler)
        guidance = float(guidance_scale if guidance_scale is not None else self.info.get("guidance", 1.0))
        denoiser = GraphDenoiser(self.manifest, self.runner, static=self.static)
        if self.kind == "reference":
            return self._generate_labels(conditions, plan, denoiser, seed, guidance, scheduler, batch_size, progress)
        return self._generate_prompts(conditions, plan, denoiser, seed, guidance, scheduler, progress)

    # -- reference model -------------------------------------------------------------------------------------------
    def _generate_labels(self, labels, plan, denoiser, seed, guidance, scheduler, batch_size, progress) -> np.ndarray:
        from .reference.pipeline import sample_labels

        graph = self.manifest.graph("class_encoder")
        if self.static:
            if len(labels) % self.static_batch:
                raise RecipeError(
                    f"static graphs run exactly {self.static_batch} images per call; ask for a multiple of {self.static_batch}"
                )
            batch_size = self.static_batch

        def encode(y: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(self.runner.run(graph, {"labels": y.numpy()})["encoder_hidden_states"])

        images = sample_labels(
            labels,
            plan,
            denoiser,
            encode,
            lambda: self.scheduler(scheduler),
            seed=seed,
            guidance_scale=guidance,
            batch_size=batch_size,
            progress=progress,
        )
        return images.astype(np.float32)[..., None] / 255.0

    # -- SD / SDXL -------------------------------------------------------------------------------------------------
    def _tokenizer(self, name: str):
        cache = self.__dict__.setdefault("_tokenizers", {})
        if name not in cache:
            from transformers import AutoTokenizer

            folder = self.folder / name
            if not folder.is_dir():
                raise BundleError(f"the bundle has no {name}/ folder; re-export it")
            cache[name] = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cache[name]

    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled text embeddings or None) for one prompt, as the diffusers pipeline computes them."""
        hidden, pooled = [], None
        roles = ["text_encoder", "text_encoder_2"] if self.kind == "sdxl" else ["text_encoder"]
        for role, tok_name in zip(roles, ["tokenizer", "tokenizer_2"]):
            tok = self._tokenizer(tok_name)
            ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np").input_ids
            out = self.runner.run(self.manifest.graph(role), {"input_ids": ids.astype(np.int64)})
            hidden.append(torch.from_numpy(out["hidden_states"]))
            if "text_embeds" in out:
                pooled = torch.from_numpy(out["text_embeds"])
        return torch.cat(hidden, dim=-1), pooled

    def _conditioning(self, prompt: str, cfg: bool) -> Conditioning:
        ehs, pooled = self._encode(prompt)
        time_ids = None
        if self.kind == "sdxl":
            h, w = self.image_hw
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=ehs.dtype)
        if not cfg:
            return Conditioning(ehs, has_uncond=False, text_embeds=pooled, time_ids=time_ids)
        if self.kind == "sdxl" and self.info.get("force_zeros_for_empty_prompt", True):
            neg, neg_pooled = torch.zeros_like(ehs), torch.zeros_like(pooled)
        else:
            neg, neg_pooled = self._encode("")
        return Conditioning(
            torch.cat([neg, ehs]),
            has_uncond=True,
            text_embeds=None if pooled is None else torch.cat([neg_pooled, pooled]),
            time_ids=None if time_ids is None else torch.cat([time_ids, time_ids]),
        )

    def _generate_prompts(self, prompts, plan, denoiser, seed, guidance, scheduler, progress) -> np.ndarray:
        from diffusers.utils.torch_utils import randn_tensor

        if self.static and self.static_batch != 1:
            raise BundleError(
                f"SD bundles run one prompt per call; this one was exported for {self.static_batch} (re-export with --batch 1)"
            )
        vae = self.manifest.graph("vae_decoder")
        images = []
        for i, prompt in enumerate(prompts):
            cond = self._conditioning(str(prompt), guidance > 1.0)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)  # as DiffusersSource seeds image i
            sch = self.scheduler(scheduler)
            sch.set_timesteps(plan.recipe.steps)
            latents = randn_tensor((1, self.info["in_channels"], *self.latent_hw), generator=gen, dtype=torch.float32)
            latents = latents * sch.init_noise_sigma
            latents = run_plan(plan, denoiser, sch, cond, guidance_scale=guidance, generator=gen, latents=latents, progress=progress)
            image = self.runner.run(vae, {"latents": _np(latents)})["image"]
            images.append(np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)[0])
        return np.stack(images).astype(np.float32)
