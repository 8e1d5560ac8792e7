"""The graphs an exported bundle holds, as ``nn.Module``s with explicit tensor inputs and outputs.

Backend-independent: the ONNX and Core ML exporters both take their graphs from here. A bundle for a plan has
one UNet graph per variant the plan uses (``postdiff.unet.VariantModule``) and what the pipeline needs around
it: the class encoder (reference model), the text encoder(s) and the VAE decoder (SD, SDXL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cost import MacCounter, step_batch
from .errors import ExportError, ModelError
from .models import Model, load_model
from .plan import Plan
from .recipe import load_recipe
from .unet import UNetSplit


@dataclass
class GraphSource:
    """One graph to export: a module, its input/output names, and how to make inputs for it."""

    name: str
    role: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example: Callable[[tuple[int, int], int], dict[str, torch.Tensor]]  # (latent size, batch) -> inputs by name
    dynamic_shapes: Any  # for torch.export
    variant: str | None = None


@dataclass
class ExportJob:
    """What every exporter starts from: the model, the plan compiled for the requested size, its latent sizes."""

    model: Model
    plan: Plan
    counter: MacCounter

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.plan.latent_hw)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [tuple(hw) for hw in self.plan.latent_sizes]

    def batches(self, variant: str, hw, images: int) -> list[int]:
        """The UNet batch sizes at which the plan calls ``variant`` at ``hw`` with ``images`` images per call."""
        return sorted({step_batch(s.guidance, images) for s in self.plan.steps if s.variant == variant and tuple(s.latent_hw) == tuple(hw)})


def prepare_export(model: str | Model, plan, *, height=None, width=None, steps=None, scheduler=None) -> ExportJob:
    from .generation import Source

    if isinstance(model, str):
        model = load_model(model, need_pipeline=not model.startswith("arch:"))
    compiled = Source(model, scheduler=scheduler, height=height, width=width).compile(load_recipe(plan), steps)
    _check_exportable_size(model, compiled)
    counter = MacCounter(model.unet_config, block=compiled.recipe.cache_block, text_len=model.text_len, pooled_dim=model.pooled_dim)
    return ExportJob(model, compiled, counter)


def _check_exportable_size(model: Model, plan: Plan) -> None:
    """Exported graphs take latent sides that are multiples of the UNet's downsampling factor (their dynamic shapes
    are written that way; Core ML's fixed shapes follow the same rule). PyTorch runs other sizes, exports do not:
    the error names the nearest image sizes that export."""
    from .unet import downsample_factor

    f = downsample_factor(unet_of(model))
    h, w = plan.latent_hw
    if h % f == 0 and w % f == 0:
        return
    px = f * model.vae_scale_factor

    def near(side: int) -> str:
        lo, hi = (side // f) * f, (side // f + 1) * f
        return " or ".join(str(v * model.vae_scale_factor) for v in (lo, hi) if v > 0)

    raise ExportError(
        f"image size {h * model.vae_scale_factor}x{w * model.vae_scale_factor} gives a {h}x{w} latent; exported graphs take "
        f"latent sides that are multiples of {f} (image sides that are multiples of {px}). PyTorch runs this size "
        f"(postdiff generate); to export, use height {near(h)} and width {near(w)}"
    )


def model_kind(model: Model) -> str:
    if model.dataset is not None:  # an embedded class-conditional reference model (Fashion-MNIST, digits)
        return "reference"
    pipe = model.pipeline
    if pipe is None:
        return "unet"
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd"


class _TextEncoder(nn.Module):
    """input_ids -> hidden states as the SD pipelines use them (SD: last layer; SDXL: penultimate layer, plus
    the projected pooled output of the second encoder)."""

    def __init__(self, encoder: nn.Module, penultimate: bool, pooled: bool) -> None:
        super().__init__()
        self.encoder, self.penultimate, self.pooled = encoder, penultimate, pooled

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out[0]
        return (hidden, out[0]) if self.pooled else (hidden,)


class _VaeDecoder(nn.Module):
    """Final latents (as the sampler leaves them) -> image in [-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, latents):
        return (self.vae.decode(latents / self.scaling, return_dict=False)[0],)


class _ClassEncoder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, labels):
        return (self.encoder(labels),)


def unet_of(model: Model):
    """The model's UNet with weights: the pipeline's, or random weights for an ``arch:`` architecture."""
    if model.pipeline is not None:
        return model.pipeline.unet
    if model.architecture is not None:
        from .toy import build_unet

        return build_unet(model.architecture)
    raise ModelError(f"{model.name} has no UNet weights to export; use a pipeline folder, a built-in model or arch:")


def unet_graphs(split: UNetSplit, plan: Plan, model: Model) -> list[GraphSource]:
    out = []
    for variant in dict.fromkeys(v for v, _ in plan.variants()):
        module = split.module(variant).eval()

        def example(hw, batch, module=module):
            return module.example_inputs(hw, batch, text_len=model.text_len, pooled_dim=model.pooled_dim)

        out.append(
            GraphSource(
                f"unet_{variant}", "unet", module, module.input_names(), module.output_names(), example, module.dynamic_shapes(), variant
            )
        )
    return out


def pipeline_graphs(model: Model) -> list[GraphSource]:
    """The graphs around the UNet that generation from a bundle needs (none for a bare ``arch:`` UNet)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    pipe = model.pipeline
    kind = model_kind(model)
    if kind == "unet":
        return []
    if kind == "reference":

        def labels(hw, b):
            return {"labels": torch.arange(b) % 10}

        enc = _ClassEncoder(pipe.class_encoder).eval()
        return [GraphSource("class_encoder", "class_encoder", enc, ["labels"], ["encoder_hidden_states"], labels, ({0: batch},))]

    graphs = []
    encoders = [("text_encoder", pipe.text_encoder, pipe.tokenizer)]
    if kind == "sdxl":
        encoders.append(("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2))
    for name, encoder, tokenizer in encoders:
        pooled = name == "text_encoder_2"
        module = _TextEncoder(encoder.eval(), penultimate=kind == "sdxl", pooled=pooled).eval()

        def ids(hw, b, tokenizer=tokenizer):
            return {
                "input_ids": tokenizer(
                    ["a photo"] * b, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
                ).input_ids
            }

        outputs = ["hidden_states", "text_embeds"] if pooled else ["hidden_states"]
        graphs.append(GraphSource(name, name, module, ["input_ids"], outputs, ids, ({0: batch},)))

    vae = _VaeDecoder(pipe.vae.eval()).eval()
    channels = int(pipe.vae.config.latent_channels)
    h, w = Dim("h", min=1, max=512), Dim("w", min=1, max=512)

    def latents(hw, b):
        return {"latents": torch.randn(b, channels, *hw, generator=torch.Generator().manual_seed(0))}

    graphs.append(GraphSource("vae_decoder", "vae_decoder", vae, ["latents"], ["image"], latents, ({0: batch, 2: h, 3: w},)))
    return graphs


def save_tokenizers(model: Model, folder) -> None:
    """The tokenizers of an SD/SDXL pipeline, as folders a bundle runtime loads with transformers' AutoTokenizer."""
    from pathlib import Path

    pipe = model.pipeline
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None) if pipe is not None else None
        if tok is not None:
            tok.save_pretrained(str(Path(folder) / name))


def model_info(model: Model, latent_hw: tuple[int, int], plan: Plan) -> dict[str, Any]:
    """What a runtime needs to know about the model to run its bundle without the PyTorch model code."""
    kind = model_kind(model)
    spec = model.spec()
    info: dict[str, Any] = {
        "name": model.name,
        "kind": kind,
        "spec": {
            "name": spec.name,
            "downsample_factor": spec.downsample_factor,
            "num_down_blocks": spec.num_down_blocks,
            "has_cross_attention": spec.has_cross_attention,
        },
        "latent_hw": list(latent_hw),
        "image_hw": [latent_hw[0] * model.vae_scale_factor, latent_hw[1] * model.vae_scale_factor],
        "vae_scale_factor": model.vae_scale_factor,
        "in_channels": int(model.unet_config.get("in_channels", 4)),
        "text_len": model.text_len,
        "pooled_dim": model.pooled_dim,
        "scheduler": plan.scheduler,
        "scheduler_config": dict(model.scheduler_config),
    }
    if kind == "reference":
        from .reference import model as ref
        from .reference.pipeline import DEFAULT_GUIDANCE

        info.update(null_class=ref.NULL_CLASS, num_classes=ref.NUM_CLASSES, guidance=DEFAULT_GUIDANCE, dataset=model.dataset)
        info["training_sizes"] = list(model.training_sizes or ())
    elif kind in ("sd", "sdxl"):
        info["guidance"] = 7.5  # what DiffusersSource uses, so bundle and torch runs pair up
        if kind == "sdxl":
            info["force_zeros_for_empty_prompt"] = bool(model.pipeline.config.get("force_zeros_for_empty_prompt", True))
    return info
