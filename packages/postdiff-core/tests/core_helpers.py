"""Helpers the core tests import (a module of its own: several test folders have a conftest.py)."""

import numpy as np
import torch

SCHEDULERS = [
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
]


def make_pipe(kind: str = "sd", scheduler: str = "DDIMScheduler"):
    from postdiff_lab.toy import toy_pipeline

    return toy_pipeline(kind, scheduler=scheduler)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_plans_against_vanilla(pipe, run, exact, accelerated) -> None:
    """On ``pipe`` (``run(pipe)`` makes one seeded call): every recipe in ``exact`` gives the vanilla pipeline's output
    (<= 1e-6); every plan in ``accelerated`` gives a finite output that differs from it and repeats exactly (paired:
    the same seed, the same image); after ``postdiff.remove`` the pipeline is vanilla again."""
    import postdiff

    def array(x):
        return x.numpy() if torch.is_tensor(x) else np.asarray(x)

    postdiff.remove(pipe)
    vanilla = array(run(pipe))
    try:
        for recipe in exact:
            postdiff.apply(pipe, recipe)
            assert np.abs(array(run(pipe)) - vanilla).max() <= 1e-6, recipe
        for plan in accelerated:
            postdiff.apply(pipe, plan)
            out = array(run(pipe))
            assert np.isfinite(out).all() and np.abs(out - vanilla).max() > 1e-3, plan
            assert np.array_equal(array(run(pipe)), out), plan
        postdiff.remove(pipe)
        assert np.abs(array(run(pipe)) - vanilla).max() <= 1e-6  # nothing left behind
    finally:
        postdiff.remove(pipe)


def cost_against_baseline(model, recipe, steps: int = 20, **size):
    """(plan, PlanCost) of ``recipe`` on ``model`` against its ``baseline`` at the same steps and size (MACs counted on
    the meta device)."""
    from postdiff.plan.cost import plan_cost

    base = model.compile("baseline", steps, **size)
    plan = model.compile(recipe, steps, **size)
    return plan, plan_cost(plan, model.mac_counter(plan.recipe), base)
