"""The reference pipeline: class-conditional Fashion-MNIST (or MNIST digits) generation that runs any PostDiff plan.

It is driven by the core loop (``run_plan``), as exported backends are, with the class tokens in the role of
the text embeddings: ``uncond`` is the null class, ``cond`` the requested one.

    pipe = ReferencePipeline.load()
    images = pipe.generate([7, 9, 1], plan="postdiff", seed=0)     # uint8, N x 32 x 32
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import data
from ..conditioning import Conditioning
from ..denoiser import TorchDenoiser
from ..errors import ModelError, RecipeError, brief
from ..plan import Plan
from ..recipe import Recipe, load_recipe
from ..sampling import compile_for_scheduler, run_plan
from ..unet import UNetSplit, model_spec
from . import model as ref

DEFAULT_GUIDANCE = 3.0


def weights_dir(dataset: str = "fashion") -> Path:
    return Path(__file__).resolve().parent / ref.WEIGHT_FOLDERS[dataset]


def training_sizes(dataset: str = "fashion", folder: str | Path | None = None) -> tuple[int, ...]:
    """The square sizes the shipped weights were trained at (``sizes`` in training.json; v1 has none: 32 only)."""
    meta = Path(folder or weights_dir(dataset)) / "training.json"
    sizes = json.loads(meta.read_text()).get("sizes") if meta.is_file() else None
    return tuple(int(s) for s in (sizes or [ref.IMAGE_SIZE]))


def parse_label(text: str | int, dataset: str = "fashion") -> int:
    """A class index (0-9), or a class name for Fashion-MNIST ("Sneaker", "ankle boot")."""
    from ..data import CLASSES

    if isinstance(text, int) or str(text).strip().isdigit():
        label = int(text)
        if 0 <= label < ref.NUM_CLASSES:
            return label
    elif dataset == "fashion":
        names = {c.lower(): i for i, c in enumerate(CLASSES)} | {c.lower().replace("/", " "): i for i, c in enumerate(CLASSES)}
        names |= {"t-shirt": 0, "tshirt": 0, "top": 0, "boot": 9}
        key = str(text).strip().lower()
        if key in names:
            return names[key]
    if dataset != "fashion":
        raise RecipeError(f"unknown digit {brief(text)}; use 0-9")
    raise RecipeError(f"unknown Fashion-MNIST class {brief(text)}; use 0-9 or one of: {', '.join(CLASSES)}")


class ReferencePipeline:
    vae_scale_factor = 1  # pixel space

    def __init__(self, unet, class_encoder, scheduler_config: dict | None = None, dataset: str = "fashion") -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.class_encoder = class_encoder.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config or ref.SCHEDULER_CONFIG)
        self.dataset = dataset
        self.name = "reference" if dataset == "fashion" else dataset
        self.spec = model_spec(self.unet, name=self.name)

    @classmethod
    def load(cls, folder: str | Path | None = None, dataset: str = "fashion") -> ReferencePipeline:
        from safetensors.torch import load_file

        folder = Path(folder or weights_dir(dataset))
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ModelError(f"reference weights not found at {weights}; train them with benchmarks/reference/train_reference.py")
        unet, enc = ref.build()
        state = load_file(str(weights))
        unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        enc.load_state_dict({k[14:]: v for k, v in state.items() if k.startswith("class_encoder.")})
        meta = folder / "training.json"
        scheduler_config = json.loads(meta.read_text()).get("scheduler") if meta.is_file() else None
        return cls(unet, enc, scheduler_config, dataset)

    # -- plans -----------------------------------------------------------------------------------------------------
    def scheduler(self, kind: str = "DDIMScheduler"):
        import diffusers

        cls = getattr(diffusers, kind, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ModelError(f"unknown scheduler {kind!r}; use a diffusers scheduler class name such as DDIMScheduler")
        return cls.from_config(self.scheduler_config)

    def compile(
        self, plan: str | Recipe | dict, steps: int | None = None, scheduler: str = "DDIMScheduler", size: int = ref.IMAGE_SIZE
    ) -> Plan:
        recipe = load_recipe(plan)
        if steps is not None:
            recipe = recipe.with_steps(steps)
        return compile_for_scheduler(recipe, self.scheduler(scheduler), (size, size), self.spec)

    # -- generation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        labels: Sequence[int],
        plan: str | Recipe | dict | Plan = "baseline",
        *,
        seed: int = 0,
        guidance_scale: float = DEFAULT_GUIDANCE,
        scheduler: str = "DDIMScheduler",
        steps: int | None = None,
        batch_size: int = 100,
        progress: bool = False,
    ) -> np.ndarray:
        """uint8 images (N x 32 x 32), one per label. Sample i's noise (initial, and any drawn later) depends only
        on (seed, i), so the same seed gives the same noise under every plan and batch size: outputs are paired."""
        compiled = plan if isinstance(plan, Plan) else self.compile(plan, steps, scheduler)
        with UNetSplit(self.unet, block=compiled.recipe.cache_block) as split:
            return sample_labels(
                labels,
                compiled,
                TorchDenoiser(split),
                self.class_encoder,
                lambda: self.scheduler(scheduler),
                seed=seed,
                guidance_scale=guidance_scale,
                batch_size=batch_size,
                progress=progress,
            )


def sample_labels(
    labels: Sequence[int],
    plan: Plan,
    denoiser,
    encode: Callable[[torch.Tensor], torch.Tensor],
    make_scheduler: Callable[[], object],
    *,
    seed: int,
    guidance_scale: float,
    batch_size: int,
    progress: bool = False,
) -> np.ndarray:
    """The reference model's sampling loop, whatever runs the networks (PyTorch here, a bundle's graphs in
    ``postdiff.bundle_runtime``): ``encode`` maps class indices to tokens, ``denoiser`` runs plan steps."""
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    h, w = plan.latent_hw  # pixel space: the image size (32 x 32, or another size the plan was compiled for)
    if len(labels) == 0:
        return np.zeros((0, h, w), dtype=np.uint8)
    if labels.min() < 0 or labels.max() >= ref.NUM_CLASSES:
        raise RecipeError(f"labels must be class indices 0-{ref.NUM_CLASSES - 1}")
    noise = torch.stack([torch.randn(1, h, w, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in range(len(labels))])
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size]
        if guidance_scale > 1.0:  # null class first, as diffusers lays out CFG batches
            cond = Conditioning(encode(torch.cat([torch.full_like(y, ref.NULL_CLASS), y])), has_uncond=True)
        else:
            cond = Conditioning(encode(y), has_uncond=False)
        sch = make_scheduler()
        # per-sample generators for the noise drawn later (resolution switch, ancestral samplers)
        g = [torch.Generator().manual_seed(seed * 7919 + i) for i in range(start, start + len(y))]
        x = noise[start : start + batch_size] * sch.init_noise_sigma
        latents = run_plan(plan, denoiser, sch, cond, guidance_scale=guidance_scale, generator=g, latents=x, channels=1, progress=progress)
        out.append(data.to_uint8(latents))
    return np.concatenate(out)
