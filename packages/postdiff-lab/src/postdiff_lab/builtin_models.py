"""The lab's named models, offered to every PostDiff command through the ``postdiff.models`` entry point.

``reference`` (the embedded, trained Fashion-MNIST model, the default), ``digits`` (the same recipe on MNIST
digits), ``reference-flow`` (the same network trained on a rectified flow, sampled with FlowMatch Euler),
``toy-sd`` / ``toy-sdxl`` / ``toy-lcm`` (tiny SD, SDXL and LCM pipelines with random weights) and
``toy-pixart`` / ``toy-pixart-sigma`` (tiny PixArt-α and -Σ pipelines), ``toy-sd3`` (a tiny SD3 pipeline: MMDiT,
two CLIP encoders and T5, flow matching), ``toy-sana`` (a tiny SANA pipeline: linear-attention DiT, Gemma-2, DC-AE),
``arch:sd15`` / ``arch:sd21`` / ``arch:sdxl`` / ``arch:lcm-sd15`` / ``arch:pixart-alpha`` / ``arch:sd3-medium`` /
``arch:sana-1600m`` / ``arch:flux-dev`` (published architectures with random weights, for costs and timings; FLUX for
costs and plans only).
"""

from __future__ import annotations

from pathlib import Path

from postdiff.errors import ModelError
from postdiff.families.model import Model, from_pipeline

from .architectures import ARCHITECTURES, Architecture

# the embedded, trained class-conditional models -> their shipped weights (postdiff_lab.reference.model.WEIGHT_FOLDERS:
# the dataset each was trained on, "-flow" for the rectified-flow objective)
REFERENCE_MODELS = {"reference": "fashion", "digits": "digits", "reference-flow": "fashion-flow"}
TOY_MODELS = {
    "toy-sd": "sd",
    "toy-sdxl": "sdxl",
    "toy-lcm": "lcm",
    "toy-pixart": "pixart",
    "toy-pixart-sigma": "pixart-sigma",
    "toy-sd3": "sd3",
    "toy-sana": "sana",
}


def _reference(name: str, need_pipeline: bool | None) -> Model:
    from .reference import model as ref
    from .reference.pipeline import ReferencePipeline, scheduler_config, training_sizes

    key = REFERENCE_MODELS[name]
    return Model(
        name=name,
        unet_config=dict(ref.UNET_CONFIG),
        scheduler_config={"_class_name": "DDIMScheduler", **scheduler_config(key)},
        vae_scale_factor=1,
        text_len=ref.TOKENS,
        pipeline=ReferencePipeline.load(key=key, name=name) if need_pipeline is not False else None,
        dataset=ref.dataset_of(key),
        training_sizes=training_sizes(key),
        weights="trained",
        family_name="class-conditional",
    )


def _from_architecture(arch: Architecture) -> Model:
    from .toy import build_unet

    return Model(
        name=f"arch:{arch.name}",
        unet_config=dict(arch.unet),
        scheduler_config={"_class_name": arch.scheduler_class, **arch.scheduler},
        vae_scale_factor=arch.vae_scale_factor,
        text_len=arch.text_len,
        pooled_dim=arch.pooled_dim,
        build_unet=lambda: build_unet(arch),
        weights="random",
        family_name="unet",
    )


def reference_weights_dir(name: str) -> Path | None:
    """The folder of an embedded model's shipped weights (and of what ships beside them), None for other names."""
    from .reference.pipeline import weights_dir

    return weights_dir(REFERENCE_MODELS[name]) if name in REFERENCE_MODELS else None


def resolve(spec: str, need_pipeline: bool | None = False) -> Model | None:
    """The named model ``spec``, or None when it is not one of the lab's names (``need_pipeline`` as in
    ``postdiff.families.model.load_model``)."""
    if spec in REFERENCE_MODELS:
        return _reference(spec, need_pipeline)
    if spec in TOY_MODELS:
        from .toy import toy_pipeline

        return from_pipeline(spec, toy_pipeline(TOY_MODELS[spec]), weights="random")
    if spec.startswith("arch:"):
        name = spec[5:]
        if name not in ARCHITECTURES:
            raise ModelError(f"unknown architecture {spec!r}; use one of {', '.join('arch:' + a for a in ARCHITECTURES)}")
        if need_pipeline is True:
            raise ModelError(
                f"{spec} is a network architecture with random weights and no text encoder or VAE; it serves "
                f"`postdiff plan cost` and the benchmarks. Generate with a pipeline (--model toy-sd, a local folder or a Hub id)"
            )
        return _from_architecture(ARCHITECTURES[name])
    return None


resolve.names = [
    *REFERENCE_MODELS,
    *TOY_MODELS,
    *(f"arch:{a}" for a in ("sd15", "sd21", "sdxl", "lcm-sd15", "pixart-alpha", "sd3-medium", "sana-1600m", "flux-dev")),
]
