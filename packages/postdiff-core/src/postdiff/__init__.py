"""PostDiff: cheaper denoising steps for pretrained diffusion models, training-free.

    import postdiff
    postdiff.apply(pipe, "postdiff")     # a diffusers SD / SDXL pipeline
    image = pipe("a photo of a cat").images[0]
    postdiff.remove(pipe)

A recipe (``Recipe``, what a user writes) compiles to a ``Plan`` (one ``Step`` per UNet call), which every
backend interprets. The engine is in layers, each a subpackage importing only those below it:

    errors, files, validate, profiling   the foundation: errors and small helpers
    plan/       recipes, compiling a plan, schedulers by name, the cost of a plan: pure data
    loop/       the sampling loop, the resolution switch, conditioning, the denoiser protocol, numpy schedulers
    pytorch/    the UNet and transformer splits, the diffusers hook, the torch denoiser, MAC counting
    families/   one module per model family, and ``Model`` (loading --model values)
    bundle/     the manifest, the bundle runtime, the export skeleton, golden tensors, the backend registry

See the documentation's Architecture page for what may import what.
"""

from typing import TYPE_CHECKING

# Names resolve on first use (PEP 562), so ``import postdiff`` loads neither torch nor diffusers: the layers that
# need no PyTorch (``postdiff.plan``, ``postdiff.loop``, ``postdiff.bundle``) work without them.
_EXPORTS = {
    "Conditioning": "loop.conditioning",
    "Denoiser": "loop.denoiser",
    "TorchDenoiser": "pytorch.denoiser",
    "applied_recipe": "pytorch.diffusers_hook",
    "apply": "pytorch.diffusers_hook",
    "remove": "pytorch.diffusers_hook",
    "ModelError": "errors",
    "PlanError": "errors",
    "PostDiffError": "errors",
    "RecipeError": "errors",
    "ModelSpec": "plan.compiler",
    "Plan": "plan.compiler",
    "Step": "plan.compiler",
    "compile_plan": "plan.compiler",
    "validate_plan": "plan.compiler",
    "BUILTIN_PLANS": "plan.recipe",
    "DeepCache": "plan.recipe",
    "LowRes": "plan.recipe",
    "Recipe": "plan.recipe",
    "XAttnGate": "plan.recipe",
    "builtin_names": "plan.recipe",
    "load_recipe": "plan.recipe",
    "PlanRun": "loop.sampling",
    "compile_for_scheduler": "loop.sampling",
    "run_plan": "loop.sampling",
    "UNetSplit": "pytorch.unet",
    "model_spec": "pytorch.unet",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'postdiff' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too, for completion and help()
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # pragma: no cover
    from postdiff.errors import ModelError, PlanError, PostDiffError, RecipeError
    from postdiff.loop.conditioning import Conditioning
    from postdiff.loop.denoiser import Denoiser
    from postdiff.loop.sampling import PlanRun, compile_for_scheduler, run_plan
    from postdiff.plan.compiler import ModelSpec, Plan, Step, compile_plan, validate_plan
    from postdiff.plan.recipe import BUILTIN_PLANS, DeepCache, LowRes, Recipe, XAttnGate, builtin_names, load_recipe
    from postdiff.pytorch.denoiser import TorchDenoiser
    from postdiff.pytorch.diffusers_hook import applied_recipe, apply, remove
    from postdiff.pytorch.unet import UNetSplit, model_spec

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_PLANS",
    "Conditioning",
    "DeepCache",
    "Denoiser",
    "LowRes",
    "ModelError",
    "ModelSpec",
    "Plan",
    "PlanError",
    "PlanRun",
    "PostDiffError",
    "Recipe",
    "RecipeError",
    "Step",
    "TorchDenoiser",
    "UNetSplit",
    "XAttnGate",
    "applied_recipe",
    "apply",
    "builtin_names",
    "compile_for_scheduler",
    "compile_plan",
    "load_recipe",
    "model_spec",
    "remove",
    "run_plan",
    "validate_plan",
]
