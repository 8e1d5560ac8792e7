"""Model families, the base: everything that depends on what kind of model a run or a bundle holds, in one object
per kind. Each built-in family has its module beside this one; ``registry`` finds a model's.

A ``Family`` owns the decisions that used to be checks of a model's name: how a condition is parsed and encoded,
the default guidance, the per-image random generator for a seed, the scheduler by name, which graphs an exported
bundle holds around the UNet and what its manifest records, and how a bundle's graphs are driven to make images.
The PyTorch path (``postdiff.families.model.Model.family``) and the bundle path (``BundlePipeline.family``, from the
manifest's ``kind``) ask the same object, so a torch run and a bundle run of one seed stay paired.

Families are registered by name, the way diffusers registers per-model hooks and cache-dit its per-model adapters:

    @register_family
    class MyFamily(Family):
        name = "my-dit"
        def matches(self, model): return hasattr(model.pipeline, "transformer")
        ...

``registry.family_of(model)`` returns the first family whose ``matches`` accepts the model (a subclass is asked
before its base, the others in registration order: the most specific are registered first);
``registry.family_named(kind)`` the one a manifest names. Torch is imported inside the methods that export: the
bundle runtime uses the families without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from postdiff.errors import BundleError, ModelError
from postdiff.loop.arrays import TORCH
from postdiff.plan.schedulers import is_flow_config, is_flow_scheduler, resolve

# The model a family is asked about: a ``postdiff.families.model.Model``. That module imports the families, so it is
# not imported here, not even for annotations (the engine's import graph has no circle, typing included).
Model = Any


# Image i of a request with seed s draws its noise from a generator seeded with image_seed(s, i), on every path
# (PyTorch pipelines, bundles, every backend): the same seed gives paired images under every plan and batch size.
SEED_STRIDE = 1_000_003


def image_seed(seed: int, index: int) -> int:
    return int(seed) * SEED_STRIDE + int(index)


class Family:
    """The base: what every family shares. Subclasses set ``name`` and override what differs."""

    name = "base"
    aliases: tuple[str, ...] = ()  # older manifest kinds that mean this family
    default_guidance = 7.5  # diffusers' default for SD pipelines
    condition = "prompt"  # what a condition is: "prompt" (text) or "label" (class index)
    roles: tuple[str, ...] = ()  # the graphs a bundle holds besides its UNet graphs
    optional_roles: tuple[str, ...] = ()  # roles an export may leave out (``--no-text-encoder``), noted in the manifest
    tokenizers: tuple[str, ...] = ()  # tokenizer folders a bundle holds
    generates = True  # False: a bundle of this family serves per-graph benchmarks only

    # -- recognising a model -------------------------------------------------------------------------------------
    def matches(self, model: Model) -> bool:
        raise NotImplementedError

    # -- conditions ----------------------------------------------------------------------------------------------
    def parse_condition(self, text: str | int | None, info: dict[str, Any]) -> Any:
        """A user's condition (``--prompt``) as this family takes it; None gives the family's default."""
        return "a photograph of an astronaut riding a horse" if text is None else str(text)

    def default_conditions(self, n: int, info: dict[str, Any]) -> list:
        prompts = ("a red apple on a table", "a lighthouse at dusk", "a cat wearing sunglasses", "a bowl of ramen")
        return [prompts[i % len(prompts)] for i in range(n)]

    # -- randomness and schedulers -------------------------------------------------------------------------------
    def generator(self, seed: int, index: int, ops=None):
        """Image ``index``'s generator for ``seed``: a torch.Generator, or its numpy twin with ``ops=NUMPY``."""

        return (ops or TORCH).generator(image_seed(seed, index))

    def scheduler(self, name: str | None, config: dict[str, Any], ops=None):
        """The scheduler by name (``postdiff.plan.schedulers``: a short name or a class name; None: the configuration's
        own class): diffusers' class, or with ``ops=NUMPY`` its numpy twin (``postdiff.loop.numpy_schedulers``)."""

        own = config.get("_class_name", "DDIMScheduler")
        name = name or own
        class_name, settings = resolve(name)
        if class_name != own:  # the model's own scheduler class is always its to use
            self.check_scheduler(name)
        if class_name != own or settings:  # a short name's settings may turn a flow model's solver into another kind
            config = self._flow_config(name, config)
        return (ops or TORCH).scheduler(name, config)

    @staticmethod
    def _flow_config(name: str, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` for scheduler ``name``, after refusing a noise-prediction scheduler on a flow-matching model and the
        reverse; the model's shift is given under the key the named solver reads (FlowMatch* read ``shift``, DPM-Solver
        and UniPC on flow sigmas ``flow_shift``: SD3 ships the first, SANA the second)."""
        flow = is_flow_config(config.get("_class_name", "DDIMScheduler"), config)
        if is_flow_scheduler(name) != flow:
            raise ModelError(
                f"--scheduler {name}: this model was trained on a rectified flow (it predicts a velocity); use "
                "flow-euler, flow-heun or flow-dpmpp-2m"
                if flow
                else f"--scheduler {name}: a flow-matching scheduler samples models trained on a rectified flow (SD3, "
                "SANA, FLUX); this model predicts noise. Use ddim, euler, dpmpp-2m-karras or another of its schedulers"
            )
        if not flow:
            return config
        if resolve(name)[0].startswith("FlowMatch"):
            return config if "shift" in config else {**config, "shift": float(config.get("flow_shift", 1.0))}
        return config if "flow_shift" in config else {**config, "flow_shift": float(config.get("shift", 1.0))}

    def check_scheduler(self, name: str) -> None:
        """Refuse, before any work, a scheduler this family's models cannot sample with."""

        if resolve(name)[0] == "LCMScheduler":
            raise ModelError(
                f"--scheduler {name}: LCMScheduler samples LCM-distilled models (LatentConsistencyModelPipeline); this "
                f"{self.name} model was not distilled for it. Use ddim, euler, dpmpp-2m-karras or another of its schedulers"
            )

    def condition_info(self, pipe) -> dict[str, Any]:
        """What ``parse_condition`` needs from a loaded pipeline (also recorded in a bundle's manifest)."""
        return {}

    def guidance(self, value: float | None) -> float:
        return self.default_guidance if value is None else float(value)

    def call_options(self) -> dict[str, Any]:
        """Options of the diffusers pipeline's ``__call__`` that make it generate what a bundle of this family does."""
        return {}

    # -- export ---------------------------------------------------------------------------------------------------
    def bundle_refusal(self, model: Model, backend: str | None = None) -> str | None:
        """Why no bundle of ``model`` can be built with ``backend`` (its name: onnx, openvino, coreml; None: any), or
        None when one can."""
        return None

    def pipeline_graphs(self, model: Model) -> list:
        """The graphs (``postdiff.pytorch.graphs.GraphSource``) around the UNet that generation from a bundle needs."""
        return []

    def bundle_info(self, model: Model) -> dict[str, Any]:
        """What the manifest's ``model`` records for this family beyond the common fields."""
        return {"guidance": self.default_guidance}

    # -- generation from a bundle -------------------------------------------------------------------------------
    def generate_bundle(self, pipe, conditions: Sequence, plan, denoiser, *, seed, guidance, scheduler, batch_size, progress, ops):
        """Images N x H x W x C floats in [0, 1] from a bundle's graphs (``pipe``), arrays held by ``ops``."""
        raise BundleError(f"{self.name} bundles cannot generate images")


def flow_bundle_refusal(model: Model, backend: str | None, kind: str) -> str | None:
    """Bundles of the flow-matching transformers (SD3, SANA) are ONNX bundles, which ONNX Runtime and OpenVINO run; Core
    ML packages of them are not built yet, and asking for one is refused in one line that names what works."""
    if backend != "coreml":
        return None
    return f"{model.name}: Core ML bundles of {kind} models are not built yet; export ONNX (postdiff export onnx: ONNX Runtime and OpenVINO run it) or run it on PyTorch"


FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Register a family class (decorator); a later registration of the same name replaces the earlier one."""
    family = cls()
    FAMILIES[family.name] = family
    return cls
