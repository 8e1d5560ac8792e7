"""The reference pipeline: class-conditional Fashion-MNIST (or MNIST digits) generation that runs any PostDiff plan.

It is driven by the core loop (``run_plan``), as exported backends are, with the class tokens in the role of
the text embeddings: ``uncond`` is the null class, ``cond`` the requested one.

    pipe = ReferencePipeline.load()
    images = pipe.generate([7, 9, 1], plan="postdiff", seed=0)     # uint8, N x 32 x 32
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from postdiff.errors import ModelError
from postdiff.families.registry import family_named
from postdiff.loop.sampling import compile_for_scheduler
from postdiff.plan.compiler import Plan
from postdiff.plan.recipe import Recipe, load_recipe
from postdiff.pytorch.denoiser import TorchDenoiser
from postdiff.pytorch.unet import UNetSplit, model_spec

from .. import data
from . import model as ref

FAMILY = family_named("class-conditional")  # conditions, guidance, seeds and sampling loop of class-conditional models
DEFAULT_GUIDANCE = FAMILY.default_guidance


def weights_dir(key: str = "fashion") -> Path:
    """The folder of the shipped weights ``key`` (``model.WEIGHT_FOLDERS``: a dataset, or ``<dataset>-flow``)."""
    return Path(__file__).resolve().parent / ref.WEIGHT_FOLDERS[key]


def training_sizes(key: str = "fashion", folder: str | Path | None = None) -> tuple[int, ...]:
    """The square sizes the shipped weights were trained at (``sizes`` in training.json; v1 has none: 32 only)."""
    meta = Path(folder or weights_dir(key)) / "training.json"
    sizes = json.loads(meta.read_text()).get("sizes") if meta.is_file() else None
    return tuple(int(s) for s in (sizes or [ref.IMAGE_SIZE]))


def scheduler_config(key: str = "fashion", folder: str | Path | None = None) -> dict:
    """The noise schedule the shipped weights were trained with (``scheduler`` in training.json; the model module's
    default when a folder has none): v1 to v2.1 used the cosine schedule, v3 Stable Diffusion's, ``-flow`` weights
    a rectified flow (FlowMatch Euler)."""
    meta = Path(folder or weights_dir(key)) / "training.json"
    config = json.loads(meta.read_text()).get("scheduler") if meta.is_file() else None
    return dict(config or ref.SCHEDULER_CONFIG)


# What the class-conditional family needs to read a condition, per dataset: the noun of its error messages,
# extra names, and the default class of `postdiff generate`
_CLASS_WORDS = {
    "fashion": {"noun": "Fashion-MNIST class", "aliases": {"t-shirt": 0, "tshirt": 0, "top": 0, "boot": 9}},
    "digits": {"noun": "digit", "aliases": {}},
}
DEFAULT_CLASS = 9  # Ankle boot; the digit 9


def class_info(dataset: str = "fashion") -> dict:
    """The class-conditional family's condition info for a dataset's model (see ``ClassConditional.parse_condition``)."""
    words = _CLASS_WORDS[dataset]
    return {
        "num_classes": ref.NUM_CLASSES,
        "class_names": list(data.DATASETS[dataset]),
        "class_aliases": dict(words["aliases"]),
        "class_noun": words["noun"],
        "default_class": DEFAULT_CLASS,
        "dataset": dataset,
    }


def parse_label(text: str | int, dataset: str = "fashion") -> int:
    """A class index (0-9), or a class name for Fashion-MNIST ("Sneaker", "ankle boot")."""
    return FAMILY.parse_condition(text, class_info(dataset))


class ReferencePipeline:
    vae_scale_factor = 1  # pixel space

    def __init__(
        self, unet, class_encoder, scheduler_config: dict | None = None, dataset: str = "fashion", name: str | None = None
    ) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.class_encoder = class_encoder.eval().requires_grad_(False)
        # the class the model samples with by default travels in the configuration, as diffusers' _class_name
        self.scheduler_config = {"_class_name": "DDIMScheduler", **dict(scheduler_config or ref.SCHEDULER_CONFIG)}
        self.dataset = dataset
        info = class_info(dataset)
        self.num_classes, self.null_class = ref.NUM_CLASSES, ref.NULL_CLASS
        self.class_names, self.class_aliases, self.class_noun = info["class_names"], info["class_aliases"], info["class_noun"]
        self.default_class = info["default_class"]
        self.name = name or {"fashion": "reference"}.get(dataset, dataset)
        self.spec = model_spec(self.unet, name=self.name)

    def to(self, device=None, dtype=None) -> ReferencePipeline:
        """Move the networks (as a diffusers pipeline's ``to``); the sampling loop follows the class tokens' device
        and dtype, and draws its noise on the CPU from the seed, as diffusers does."""
        self.unet.to(device, dtype)
        self.class_encoder.to(device, dtype)
        return self

    @classmethod
    def load(cls, folder: str | Path | None = None, key: str = "fashion", name: str | None = None) -> ReferencePipeline:
        """The shipped weights ``key`` (``model.WEIGHT_FOLDERS``), or those in ``folder`` (drawing ``key``'s classes)."""
        from safetensors.torch import load_file

        folder = Path(folder or weights_dir(key))
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ModelError(f"reference weights not found at {weights}; train them with benchmarks/reference/train_reference.py")
        unet, enc = ref.build()
        state = load_file(str(weights))
        unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        enc.load_state_dict({k[14:]: v for k, v in state.items() if k.startswith("class_encoder.")})
        return cls(unet, enc, scheduler_config(key, folder), ref.dataset_of(key), name)

    # -- plans -----------------------------------------------------------------------------------------------------
    def scheduler(self, kind: str | None = None):
        """The scheduler ``kind`` on this model's schedule; None: its own (DDIM, or a flow model's FlowMatch Euler)."""
        return FAMILY.scheduler(kind, self.scheduler_config)

    def compile(
        self, plan: str | Recipe | dict, steps: int | None = None, scheduler: str | None = None, size: int = ref.IMAGE_SIZE
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
        scheduler: str | None = None,
        steps: int | None = None,
        batch_size: int = 100,
        progress: bool = False,
        first: int = 0,
    ) -> np.ndarray:
        """uint8 images (N x 32 x 32), one per label. Sample i's noise (initial, and any drawn later) depends only
        on (seed, i), so the same seed gives the same noise under every plan and batch size: outputs are paired.
        ``first``: the labels are samples first, first + 1, ... of a larger request (a shard of it)."""
        compiled = plan if isinstance(plan, Plan) else self.compile(plan, steps, scheduler)
        with UNetSplit(self.unet, block=compiled.recipe.cache_block) as split:
            return FAMILY.sample(
                labels,
                compiled,
                TorchDenoiser(split),
                self.class_encoder,
                lambda: self.scheduler(scheduler),
                null_class=self.null_class,
                num_classes=self.num_classes,
                seed=seed,
                guidance_scale=guidance_scale,
                batch_size=batch_size,
                progress=progress,
                first=first,
            )
