"""What PostDiff plans for (``Model``), and resolving ``--model`` values: named models, local folders, Hub ids.

The engine loads diffusers pipeline folders, UNet folders and Hub ids itself. Named models (the lab's embedded
reference models, toy pipelines and ``arch:`` architectures) come from resolvers that packages declare under the
entry-point group ``postdiff.models``: a resolver takes the name and ``need_pipeline`` and returns a ``Model``, or
None for a name it does not know; its ``names`` attribute (a list) says which names it offers, for messages and help.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from postdiff.errors import ModelError
from postdiff.families.registry import family_named, family_of
from postdiff.loop.sampling import compile_for_scheduler
from postdiff.plan.recipe import load_recipe
from postdiff.pytorch.backbone import meta_network, network_of, spec_of

MODEL_RESOLVERS = "postdiff.models"  # the entry-point group of named-model resolvers
# the model the CLI uses without --model: the lab's embedded reference model when the lab is installed
DEFAULT_MODEL = "reference"
# SD 1.5's noise schedule: the scheduler of a bare UNet folder that has none
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass
class Model:
    """A model PostDiff can plan for: always a UNet config; a full pipeline when one was loaded."""

    name: str
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    vae_scale_factor: int = 8
    text_len: int = 77
    pooled_dim: int | None = None
    pipeline: Any = None
    build_unet: Callable[[], Any] | None = None  # a UNet with (random, seeded) weights where there is no pipeline
    dataset: str | None = None  # a dataset the lab can measure this model's samples against (in-domain metrics)
    training_sizes: tuple[int, ...] | None = None  # square latent sizes the weights were trained at, when known
    weights: str = "as loaded"  # "trained", "random" or "as loaded": how benchmarks describe the weights
    family_name: str | None = None  # the family, when the resolver knows it without a pipeline (else recognised)
    device: str = "cpu"  # where PyTorch runs it (``to``)
    dtype: str = "float32"  # its weights' and activations' floating-point type (``to``)

    @property
    def placement(self) -> dict[str, str]:
        """Where and in what PyTorch runs this model ({"device", "dtype"}), as results record it."""
        return {"device": self.device, "dtype": self.dtype}

    def to(self, device: str | None = None, dtype: str | None = None) -> Model:
        """Run this model's PyTorch networks on ``device`` in ``dtype`` (the CLI's ``--device``/``--dtype``: auto,
        cpu, cuda[:N], mps; auto, float32, float16, bfloat16); refused in one line when the device is not here.
        Moves the pipeline, or the random-weight network an architecture builds. Returns the model."""
        from postdiff.pytorch.device import dtype_name, resolve_device, resolve_dtype  # lazy: imports torch

        where = resolve_device(device)
        kind = resolve_dtype(dtype, where)
        if (str(where), dtype_name(kind)) == (self.device, self.dtype):
            return self
        if self.pipeline is not None:
            from diffusers.utils import logging as diffusers_logging  # lazy: imports torch

            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every cast: none are
            try:
                self.pipeline.to(where, kind)
            finally:
                diffusers_logging.set_verbosity(level)
        elif self.build_unet is not None:
            build = self.build_unet
            self.build_unet = lambda: build().to(where, kind)
        self.device, self.dtype = str(where), dtype_name(kind)
        return self

    @cached_property
    def family(self):
        """The model's family (``postdiff.families``): conditions, guidance, seeds, scheduler, bundle contents."""

        return family_named(self.family_name) if self.family_name else family_of(self)

    @property
    def condition_info(self) -> dict[str, Any]:
        """What the family needs to parse a condition (class names for a class-conditional model)."""
        return self.family.condition_info(self.pipeline) if self.pipeline is not None else {}

    def compile(self, recipe, steps: int | None = None, *, scheduler: str | None = None, height=None, width=None):
        """The plan of ``recipe`` (a Recipe, a built-in name or a JSON path) for this model at an image size."""

        recipe = load_recipe(recipe)
        if steps is not None:
            recipe = recipe.with_steps(steps)
        return compile_for_scheduler(recipe, self.scheduler(scheduler), self.latent_hw(height, width), self.spec())

    def mac_counter(self, recipe):
        """The cost model (``postdiff.pytorch.macs.MacCounter``) of this model's network for ``recipe``'s cache cut."""
        from postdiff.pytorch.macs import MacCounter  # lazy: imports torch

        return MacCounter(
            self.unet_config, block=recipe.cache_block, span=recipe.cache_span, text_len=self.text_len, pooled_dim=self.pooled_dim
        )

    def untrained_warning(self, plan) -> str | None:
        return untrained_warning(self.name, self.training_sizes, plan, self.vae_scale_factor)

    @property
    def default_latent(self) -> int:
        # a network whose config has no sample size (FLUX) may carry its pipeline's default as ``_sample_size``
        return int(self.unet_config.get("sample_size", self.unet_config.get("_sample_size", 64)))

    def latent_hw(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Latent size for an image size (pixels); the model's default when not given."""
        f = self.vae_scale_factor
        default = self.default_latent * f
        h = default if height is None else height
        w = default if width is None else width
        if h < 1 or w < 1:
            raise ModelError(f"image size {h}x{w} must be positive (pixels)")
        if h % f or w % f:
            raise ModelError(f"image size {h}x{w} must be a multiple of {f} (the VAE's downsampling factor) for {self.name}")
        return h // f, w // f

    def network(self):
        """The denoising network (UNet or transformer) with weights: the pipeline's, or random weights for an
        ``arch:`` architecture."""
        if self.pipeline is not None:
            return network_of(self.pipeline)
        if self.build_unet is not None:  # an architecture without weights: random ones, seeded
            return self.build_unet()
        raise ModelError(f"{self.name} has no UNet weights to export; use a pipeline folder, a built-in model or arch:")

    def meta_unet(self):
        """The denoising network (UNet or transformer, ``postdiff.pytorch.backbone``) built on the ``meta`` device:
        structure without weights or memory."""
        if getattr(self, "_meta_unet", None) is None:
            self._meta_unet = meta_network(self.unet_config)
        return self._meta_unet

    def spec(self):

        return spec_of(self.meta_unet(), name=self.name)

    def scheduler(self, kind: str | None = None):
        current = getattr(self.pipeline, "scheduler", None)
        if kind is None and hasattr(current, "set_timesteps"):  # a diffusers pipeline's own scheduler
            return current
        return self.family.scheduler(kind, self.scheduler_config)


def untrained_sizes(training_sizes, plan) -> list[tuple[int, int]]:
    """The latent sizes ``plan`` runs at where the weights were not trained (empty when the training sizes are
    unknown or all are trained)."""
    if not training_sizes:
        return []
    trained = {(int(s), int(s)) for s in training_sizes}
    return sorted({tuple(s.latent_hw) for s in plan.steps} - trained)


def untrained_warning(name: str, training_sizes, plan, vae_scale_factor: int = 1) -> str | None:
    """A one-line warning when ``plan`` runs steps at a latent size the model was not trained at, or None.
    A model trained at one size cannot denoise at another, so a plan's low-resolution phase there measures the
    model, not the method: ``postdiff eval --sizes`` shows what the model can do at each size."""
    sizes = untrained_sizes(training_sizes, plan)
    if not sizes:
        return None
    shown = ", ".join(f"{h}x{w}" for h, w in sizes)
    trained = ", ".join(f"{s}x{s}" for s in training_sizes)
    check = sorted({*(int(s) for s in training_sizes), *(side for hw in sizes for side in hw)})  # the sides asked for too
    return (
        f"plan {plan.name} runs steps at latent {shown}, where {name} was not trained (trained at {trained}, its "
        f"training.json): the quality there measures the model, not the method; check it with "
        f"postdiff eval --model {name} --sizes {','.join(str(s * vae_scale_factor) for s in check)}"
    )


def from_pipeline(name: str, pipe, **fields) -> Model:
    """A ``Model`` for a loaded diffusers SD/SDXL/LCM/PixArt/SD3 pipeline."""

    pooled = None
    if getattr(pipe, "text_encoder_2", None) is not None:
        pooled = int(pipe.text_encoder_2.config.projection_dim)
    tok = getattr(pipe, "tokenizer", None)
    net = network_of(pipe)
    text_len = int(getattr(tok, "model_max_length", 77) or 77) if tok is not None else 77
    if type(net).__name__ == "SD3Transformer2DModel":
        # CLIP's tokens and T5's (the pipeline's default max_sequence_length, 256) on one axis; the pooled embedding
        # is both CLIP encoders' projections concatenated
        text_len, pooled = text_len + 256, int(net.config.pooled_projection_dim)
    elif getattr(pipe, "transformer", None) is not None:  # PixArt, SANA: the pipelines' default max_sequence_length
        text_len = 120 if "Alpha" in type(pipe).__name__ else 300
    return Model(
        name=name,
        unet_config={"_class_name": type(net).__name__, **dict(net.config)},
        scheduler_config={"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)},
        vae_scale_factor=int(pipe.vae_scale_factor),
        text_len=text_len,
        pooled_dim=pooled,
        pipeline=pipe,
        **{"device": str(net.device), "dtype": str(net.dtype).removeprefix("torch."), **fields},  # where it is now
    )


def _resolvers() -> list[Callable]:
    from importlib.metadata import entry_points

    found = []
    for ep in sorted(entry_points(group=MODEL_RESOLVERS), key=lambda e: e.name):
        try:
            found.append(ep.load())
        except ImportError:  # a broken plug-in: its names are unknown, the rest works
            continue
    return found


def named_models() -> list[str]:
    """The model names the installed resolvers offer (for help and error messages)."""
    return [name for resolver in _resolvers() for name in getattr(resolver, "names", [])]


def load_model(spec: str | None = None, *, need_pipeline: bool | None = False) -> Model:
    """A named model (from the ``postdiff.models`` resolvers: ``reference``, ``digits``, ``toy-sd``, ``arch:sd15``
    ... with the lab installed), a local diffusers pipeline or UNet folder, or a Hub id (needs the network).

    ``need_pipeline``: True loads the whole pipeline and refuses a model that has none (generation); False plans
    from the UNet's configuration alone where that is cheaper; None loads the pipeline where there is one (export)."""
    spec = spec or DEFAULT_MODEL
    for resolver in _resolvers():
        model = resolver(spec, need_pipeline)
        if model is not None:
            return model
    path = Path(spec).expanduser()
    if path.exists():
        return _load_folder(path, need_pipeline)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _load_hub(spec)
    names = named_models()
    raise ModelError(
        f"unknown model {spec!r}: not a named model ({', '.join(names) or 'none installed; pip install -e packages/postdiff-lab'}), "
        f"not an existing folder, not a Hub id (owner/name)"
    )


def _load_folder(path: Path, need_pipeline: bool | None) -> Model:
    if (path / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # diffusers raises many types for broken folders
            raise ModelError(f"cannot load the diffusers pipeline in {path}: {exc}") from None
        pipe.set_progress_bar_config(disable=True)
        return from_pipeline(str(path), pipe)
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    cfg_file = unet_dir / "config.json"
    if cfg_file.is_file():
        config = json.loads(cfg_file.read_text())
        if config.get("_class_name") != "UNet2DConditionModel":
            raise ModelError(f"{cfg_file} describes a {config.get('_class_name')}, not a UNet2DConditionModel")
        if need_pipeline is True:
            raise ModelError(f"{path} holds a UNet only; generation needs a whole diffusers pipeline folder (model_index.json)")
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched = json.loads(sched_file.read_text()) if sched_file.is_file() else dict(SD_SCHEDULER)
        return Model(name=str(path), unet_config=config, scheduler_config=sched)
    raise ModelError(f"{path} is neither a diffusers pipeline folder (model_index.json) nor a UNet folder (config.json)")


def _load_hub(repo_id: str) -> Model:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id)
    except Exception as exc:
        raise ModelError(
            f"cannot load {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}); without network access, "
            f"download it elsewhere and pass the local folder"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return from_pipeline(repo_id, pipe)
