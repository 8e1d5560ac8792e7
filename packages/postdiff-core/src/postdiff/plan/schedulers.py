"""Scheduler names users know: the short names of the common UIs, each a diffusers class with settings.

``--scheduler`` (and ``scheduler=`` in Python) takes these or a diffusers class name:

| name | diffusers class | settings |
|---|---|---|
| ``ddim`` | DDIMScheduler | |
| ``euler`` | EulerDiscreteScheduler | |
| ``euler-a`` | EulerAncestralDiscreteScheduler | |
| ``heun`` | HeunDiscreteScheduler | |
| ``dpmpp-2m`` | DPMSolverMultistepScheduler | DPM-Solver++, order 2 |
| ``dpmpp-2m-karras`` | DPMSolverMultistepScheduler | DPM-Solver++, order 2, Karras sigmas |
| ``dpmpp-2m-sde-karras`` | DPMSolverMultistepScheduler | SDE DPM-Solver++, order 2, Karras sigmas |
| ``unipc`` | UniPCMultistepScheduler | |
| ``lms`` | LMSDiscreteScheduler | |
| ``pndm`` | PNDMScheduler | PLMS (``skip_prk_steps``, as Stable Diffusion's pipelines) |
| ``lcm`` | LCMScheduler | LCM models only |
| ``flow-euler`` | FlowMatchEulerDiscreteScheduler | flow-matching models only (SD3's and FLUX's own) |
| ``flow-heun`` | FlowMatchHeunDiscreteScheduler | flow-matching models only |
| ``flow-dpmpp-2m`` | DPMSolverMultistepScheduler | DPM-Solver++ 2M on flow sigmas (SANA's), flow-matching models only |

The settings are applied over the model's own scheduler configuration (its noise schedule, prediction type and
spacing stay), by diffusers and by the numpy runtime alike (``postdiff.loop.numpy_schedulers`` implements every one).
Pure data: no PyTorch, no diffusers.
"""

from __future__ import annotations

from typing import Any

from postdiff.errors import ModelError, PostDiffWarning, brief

NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp-2m-sde-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lcm": ("LCMScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "flow-dpmpp-2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    ),
}
HELP = f"scheduler: {', '.join(NAMES)}, or a diffusers scheduler class name such as DDIMScheduler (default: the model's)"


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, settings over the model's configuration) of a scheduler name; a class name comes back
    as it is, with no settings (it is checked where it is built). Names are case-insensitive; ``_`` reads as ``-``
    and a trailing "scheduler" in a UI name is ignored."""
    text = str(name).strip()
    if not text:
        raise ModelError(f"--scheduler is empty; use one of {', '.join(NAMES)}")
    key = text.lower().replace("_", "-").replace("++", "pp").replace(" ", "-")
    if key in NAMES:
        return NAMES[key][0], dict(NAMES[key][1])
    if text[:1].isupper() and text.isidentifier():  # a class name: DDIMScheduler, FlowMatchEulerDiscreteScheduler, ...
        return text, {}
    raise ModelError(f"unknown scheduler {brief(name)}; use one of {', '.join(NAMES)}, or a diffusers scheduler class name")


def is_flow_config(class_name: str, config) -> bool:
    """Whether scheduler ``class_name`` with ``config`` samples a rectified flow (the network predicts a velocity):
    diffusers' FlowMatch* classes, and DPM-Solver/UniPC with ``prediction_type="flow_prediction"`` (SANA's). The one
    test of what a flow scheduler is: for a name (``is_flow_scheduler``), a model's configuration and a built one."""
    return class_name.startswith("FlowMatch") or dict(config).get("prediction_type") == "flow_prediction"


def is_flow_scheduler(name: str) -> bool:
    """Whether a scheduler name samples a rectified flow: the FlowMatch* classes and the ``flow-*`` names. Only
    flow-matching models (SD3, SANA, FLUX) can use them, and they only these."""
    return is_flow_config(*resolve(name))


def same_scheduler_name(a: str, b: str | None) -> bool:
    """Two scheduler names that mean the same scheduler (``dpmpp-2m-karras`` and its class with those settings are
    not the same as the bare class)."""
    return b is not None and resolve(a) == resolve(b)


def name_of(class_name: str, config: dict[str, Any]) -> str | None:
    """The short name a configuration runs as (``dpmpp-2m-karras``), or None when no short name describes it. Where
    several fit, the one that says most (``flow-dpmpp-2m`` before ``dpmpp-2m``, whose settings it includes)."""
    fits = [
        (len(settings), short)
        for short, (cls, settings) in NAMES.items()
        if cls == class_name and all(config.get(k, _DEFAULTS.get((cls, k))) == v for k, v in settings.items())
    ]
    return max(fits, key=lambda fit: fit[0])[1] if fits else None


def label_of(scheduler) -> str:
    """What a compiled plan records as its scheduler: the short name where the name's settings matter
    (``dpmpp-2m-karras``: the class alone would not say Karras), else the class name. ``resolve`` reads both."""
    class_name = type(scheduler).__name__
    short = name_of(class_name, dict(getattr(scheduler, "config", {})))
    return short if short is not None and NAMES[short][1] else class_name


# diffusers' defaults of the keys the short names set, for configurations that do not store them
_DEFAULTS = {
    ("DPMSolverMultistepScheduler", "algorithm_type"): "dpmsolver++",
    ("DPMSolverMultistepScheduler", "solver_order"): 2,
    ("DPMSolverMultistepScheduler", "use_karras_sigmas"): False,
    ("PNDMScheduler", "skip_prk_steps"): False,
}


SIGMA_WARN = 1000.0  # Stable Diffusion's sigma_max is about 14.6; a cosine schedule's 1,000th step gives about 20,000


def warn_if_sigmas_explode(scheduler, label: str) -> float:
    """Warn (once a call, in one line) when a scheduler that samples in sigma space (Euler, Heun, LMS, DPM-Solver with
    Karras sigmas: ``init_noise_sigma`` above 1) starts above ``SIGMA_WARN``: on a schedule whose last step is pure
    noise (``squaredcos_cap_v2``) these samplers scale the latent by that sigma and the images come out as noise
    (the embedded models before v3 gave 10-45% class accuracy with Euler and Heun). Returns the start sigma."""
    import warnings

    sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    if sigma > SIGMA_WARN:
        warnings.warn(
            f"{label} starts at sigma {sigma:,.0f} on this model's noise schedule (Stable Diffusion's is about 14.6); "
            "expect noise: use ddim, or a model trained on scaled_linear betas",
            PostDiffWarning,
            stacklevel=3,
        )
    return sigma
