"""Resolving ``--model`` values: built-in toy pipelines, ``arch:`` architectures, local folders and Hub ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .architectures import ARCHITECTURES, Architecture
from .errors import ModelError

TOY_MODELS = {"toy-sd": "sd", "toy-sdxl": "sdxl"}
# the embedded, trained class-conditional models → the dataset each was trained on (postdiff.data.DATASETS)
REFERENCE_MODELS = {"reference": "fashion", "digits": "digits"}
DEFAULT_MODEL = "reference"


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
    architecture: Architecture | None = None
    dataset: str | None = None  # an embedded reference model's dataset: class labels, in-domain classifier, test set
    training_sizes: tuple[int, ...] | None = None  # square latent sizes the weights were trained at, when known

    def untrained_warning(self, plan) -> str | None:
        return untrained_warning(self.name, self.training_sizes, plan, self.vae_scale_factor)

    @property
    def default_latent(self) -> int:
        return int(self.unet_config.get("sample_size", 64))

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

    def meta_unet(self):
        """The UNet built on the ``meta`` device: structure without weights or memory."""
        if getattr(self, "_meta_unet", None) is None:
            import torch
            from diffusers import UNet2DConditionModel

            with torch.device("meta"):
                self._meta_unet = UNet2DConditionModel.from_config(self.unet_config).eval()
        return self._meta_unet

    def spec(self):
        from .unet import model_spec

        return model_spec(self.meta_unet(), name=self.name)

    def scheduler(self, kind: str | None = None):
        import diffusers

        current = getattr(self.pipeline, "scheduler", None)
        if kind is None and hasattr(current, "set_timesteps"):  # a diffusers pipeline's own scheduler
            return current
        name = kind or self.scheduler_config.get("_class_name", "DDIMScheduler")
        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ModelError(f"unknown scheduler {name!r}; use a diffusers scheduler class name such as DDIMScheduler")
        return cls.from_config(self.scheduler_config)


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
    check = sorted({*(int(s) for s in training_sizes), *(h for h, w in sizes if h == w)})
    return (
        f"plan {plan.name} runs steps at latent {shown}, where {name} was not trained (trained at {trained}, its "
        f"training.json): the quality there measures the model, not the method; check it with "
        f"postdiff eval --model {name} --sizes {','.join(str(s * vae_scale_factor) for s in check)}"
    )


def _reference(name: str, need_pipeline: bool) -> Model:
    from .reference import model as ref
    from .reference.pipeline import ReferencePipeline, training_sizes

    dataset = REFERENCE_MODELS[name]
    return Model(
        name=name,
        unet_config=dict(ref.UNET_CONFIG),
        scheduler_config={"_class_name": "DDIMScheduler", **ref.SCHEDULER_CONFIG},
        vae_scale_factor=1,
        text_len=ref.TOKENS,
        pipeline=ReferencePipeline.load(dataset=dataset) if need_pipeline else None,
        dataset=dataset,
        training_sizes=training_sizes(dataset),
    )


def _from_architecture(arch: Architecture) -> Model:
    return Model(
        name=f"arch:{arch.name}",
        unet_config=dict(arch.unet),
        scheduler_config={"_class_name": "DDIMScheduler", **arch.scheduler},
        vae_scale_factor=arch.vae_scale_factor,
        pooled_dim=arch.pooled_dim,
        architecture=arch,
    )


def _from_pipeline(name: str, pipe) -> Model:
    pooled = None
    if getattr(pipe, "text_encoder_2", None) is not None:
        pooled = int(pipe.text_encoder_2.config.projection_dim)
    tok = getattr(pipe, "tokenizer", None)
    return Model(
        name=name,
        unet_config=dict(pipe.unet.config),
        scheduler_config=dict(pipe.scheduler.config),
        vae_scale_factor=int(pipe.vae_scale_factor),
        text_len=int(getattr(tok, "model_max_length", 77) or 77) if tok is not None else 77,
        pooled_dim=pooled,
        pipeline=pipe,
    )


def load_model(spec: str | None = None, *, need_pipeline: bool = False) -> Model:
    """``reference`` (the embedded, trained Fashion-MNIST model), ``digits`` (the same on MNIST digits), ``toy-sd``/``toy-sdxl`` (built in, random
    weights), ``arch:sd15|sd21|sdxl`` (UNet architecture only,
    random weights), a local diffusers pipeline or UNet folder, or a Hub id (needs the network)."""
    spec = spec or DEFAULT_MODEL
    if spec in REFERENCE_MODELS:
        return _reference(spec, need_pipeline)
    if spec in TOY_MODELS:
        from .toy import toy_pipeline

        return _from_pipeline(spec, toy_pipeline(TOY_MODELS[spec]))
    if spec.startswith("arch:"):
        name = spec[5:]
        if name not in ARCHITECTURES:
            raise ModelError(f"unknown architecture {spec!r}; use one of {', '.join('arch:' + a for a in ARCHITECTURES)}")
        if need_pipeline:
            raise ModelError(
                f"{spec} is a UNet architecture with random weights and no text encoder or VAE; it serves "
                f"`postdiff plan cost` and the benchmarks. Generate with a pipeline (--model toy-sd, a local folder or a Hub id)"
            )
        return _from_architecture(ARCHITECTURES[name])
    path = Path(spec).expanduser()
    if path.exists():
        return _load_folder(path, need_pipeline)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _load_hub(spec)
    raise ModelError(
        f"unknown model {spec!r}: not a built-in ({', '.join(REFERENCE_MODELS)}, {', '.join(TOY_MODELS)}, arch:sd15, arch:sd21, arch:sdxl), "
        f"not an existing folder, not a Hub id (owner/name)"
    )


def _load_folder(path: Path, need_pipeline: bool) -> Model:
    if (path / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # diffusers raises many types for broken folders
            raise ModelError(f"cannot load the diffusers pipeline in {path}: {exc}") from None
        pipe.set_progress_bar_config(disable=True)
        return _from_pipeline(str(path), pipe)
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    cfg_file = unet_dir / "config.json"
    if cfg_file.is_file():
        config = json.loads(cfg_file.read_text())
        if config.get("_class_name") != "UNet2DConditionModel":
            raise ModelError(f"{cfg_file} describes a {config.get('_class_name')}, not a UNet2DConditionModel")
        if need_pipeline:
            raise ModelError(f"{path} holds a UNet only; generation needs a whole diffusers pipeline folder (model_index.json)")
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched = (
            json.loads(sched_file.read_text())
            if sched_file.is_file()
            else {"_class_name": "DDIMScheduler", **ARCHITECTURES["sd15"].scheduler}
        )
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
    return _from_pipeline(repo_id, pipe)
