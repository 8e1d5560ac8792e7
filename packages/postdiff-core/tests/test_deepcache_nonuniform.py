"""DeepCache's non-uniform schedule, step for step: ``deepcache-nonuniform`` and ``"schedule": "nonuniform"`` place
their full steps where DeepCache 0.1.1's own ``sample_from_quad_center`` does.

DeepCache's pipeline module does not import under diffusers 0.42 (``PositionNet`` is gone), so the reference function
is read from its source file alone (ast) and run with numpy, as its pipeline runs it."""

from __future__ import annotations

import ast
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from postdiff.errors import PlanError
from postdiff.plan.compiler import ModelSpec, compile_plan, nonuniform_full_steps
from postdiff.plan.recipe import load_recipe


def _deepcache_function():
    spec = importlib.util.find_spec("DeepCache")
    if spec is None:
        pytest.skip("DeepCache 0.1.1 is not installed (scripts/setup.sh installs it)")
    source = Path(spec.submodule_search_locations[0]) / "sd" / "pipeline_stable_diffusion.py"
    tree = ast.parse(source.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    namespace = {"np": np}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(source), "exec"), namespace)
    return namespace["sample_from_quad_center"]


def _official(fn, steps: int, interval: int, center: int, power: float):
    """DeepCache's pipeline: ceil(steps / interval) full steps, its function's indices sorted; None where it gives up."""
    n_full = math.ceil(steps / interval)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its complex powers are cast to integers (ComplexWarning)
        try:
            indices, _ = fn(steps, n_full, center=center, pow=power)
        except ValueError:
            return None
    return sorted(int(i) for i in indices)


@pytest.mark.parametrize("interval", [2, 3, 4, 5])
def test_nonuniform_schedule_matches_deepcache_for_10_to_100_steps(interval):
    fn = _deepcache_function()
    checked = 0
    for steps in range(10, 101):
        for center, power in ((0.3, 1.4), (0.2, 1.2), (0.5, 1.6)):
            expected = _official(fn, steps, interval, round(center * steps), power)
            if expected is None:
                with pytest.raises(PlanError, match="nonuniform"):
                    nonuniform_full_steps(steps, math.ceil(steps / interval), center, power)
                continue
            assert nonuniform_full_steps(steps, math.ceil(steps / interval), center, power) == expected, (steps, interval, center, power)
            checked += 1
    assert checked > 200


def test_the_issue_example_and_the_builtin_plan():
    # 20 steps, interval 2, center 0.3, power 1.4: DeepCache lowers the power to 1.28 to fit ten steps
    assert nonuniform_full_steps(20, 10, 0.3, 1.4) == [0, 2, 4, 6, 7, 8, 10, 12, 15, 17]
    plan = compile_plan(
        load_recipe("deepcache-nonuniform"),
        timesteps=[999 - 50 * i for i in range(20)],
        latent_hw=(64, 64),
        model=ModelSpec(name="sd-like", downsample_factor=8, num_down_blocks=4, has_cross_attention=True),
    )
    assert [s.inference_step for s in plan.steps if s.unet == "full"] == [0, 2, 4, 6, 7, 8, 10, 12, 15, 17]
