"""PostDiff: cheaper denoising steps for pretrained diffusion models, training-free.

    import postdiff
    postdiff.apply(pipe, "postdiff")     # a diffusers SD / SDXL pipeline
    image = pipe("a photo of a cat").images[0]
    postdiff.remove(pipe)

A recipe (``Recipe``, what a user writes) compiles to a ``Plan`` (one ``Step`` per UNet call), which every
backend interprets. See README.md for the recipe format and the built-in plans.
"""

from .conditioning import Conditioning
from .denoiser import Denoiser, TorchDenoiser
from .diffusers_hook import applied_recipe, apply, remove
from .errors import ModelError, PlanError, PostDiffError, RecipeError
from .plan import ModelSpec, Plan, Step, compile_plan, validate_plan
from .recipe import BUILTIN_PLANS, DeepCache, LowRes, Recipe, XAttnGate, builtin_names, load_recipe
from .sampling import PlanRun, compile_for_scheduler, run_plan
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
