"""PostDiff: cheaper denoising steps for pretrained diffusion models, training-free.

    import postdiff
    postdiff.apply(pipe, "postdiff")     # a diffusers SD / SDXL pipeline
    image = pipe("a photo of a cat").images[0]
    postdiff.remove(pipe)

A recipe (``Recipe``, what a user writes) compiles to a ``Plan`` (one ``Step`` per UNet call), which every
backend interprets. See README.md for the recipe format and the built-in plans.
"""

from typing import TYPE_CHECKING

# Names resolve on first use (PEP 562), so ``import postdiff`` loads neither torch nor diffusers: the plan and
# manifest half of the engine (``postdiff.recipe``, ``postdiff.plan``, ``postdiff.bundle``) works without them.
_EXPORTS = {
    "Conditioning": "conditioning",
    "Denoiser": "denoiser",
    "TorchDenoiser": "torch_denoiser",
    "applied_recipe": "diffusers_hook",
    "apply": "diffusers_hook",
    "remove": "diffusers_hook",
    "ModelError": "errors",
    "PlanError": "errors",
    "PostDiffError": "errors",
    "RecipeError": "errors",
    "ModelSpec": "plan",
    "Plan": "plan",
    "Step": "plan",
    "compile_plan": "plan",
    "validate_plan": "plan",
    "BUILTIN_PLANS": "recipe",
    "DeepCache": "recipe",
    "LowRes": "recipe",
    "Recipe": "recipe",
    "XAttnGate": "recipe",
    "builtin_names": "recipe",
    "load_recipe": "recipe",
    "PlanRun": "sampling",
    "compile_for_scheduler": "sampling",
    "run_plan": "sampling",
    "UNetSplit": "unet",
    "model_spec": "unet",
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
    from .conditioning import Conditioning
    from .denoiser import Denoiser
    from .diffusers_hook import applied_recipe, apply, remove
    from .errors import ModelError, PlanError, PostDiffError, RecipeError
    from .plan import ModelSpec, Plan, Step, compile_plan, validate_plan
    from .recipe import BUILTIN_PLANS, DeepCache, LowRes, Recipe, XAttnGate, builtin_names, load_recipe
    from .sampling import PlanRun, compile_for_scheduler, run_plan
    from .torch_denoiser import TorchDenoiser
    from .unet import UNetSplit, model_spec

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
