"""Plans on pipelines moved to another dtype (``pipe.to(dtype=...)``, the CLI's ``--dtype``), on this CPU.

``baseline`` is compared with the vanilla pipeline in the same dtype *exactly* (0 difference, not a tolerance): the
hook runs the same modules on the same tensors in the same order, so every rounding step is the same. (PixArt's
patch embedding needed care for this: a half-precision module adds its stored position table in its own dtype.)
Every built-in plan of the pipeline's kind runs, is finite and deterministic; the cost model does not depend on
the dtype. CUDA fp16 is ``benchmarks/gpu_check.py``'s (no GPU here).
"""

import numpy as np
import pytest
import torch
from core_helpers import gen

import postdiff
from postdiff.errors import PostDiffError
from postdiff.plan.recipe import BUILTIN_PLANS
from postdiff.pytorch.device import resolve_device, resolve_dtype
from postdiff_lab.toy import toy_pipeline

KINDS = {
    "sd": "postdiff",
    "sdxl": "postdiff-xl",
    "pixart-sigma": "postdiff-dit",
    "lcm": "postdiff-lcm",
    "sd3": "postdiff-sd3",
    "sana": "postdiff-sana",
}
SD_PLANS = [n for n in BUILTIN_PLANS if n not in KINDS.values() and n != "postdiff-flux"]  # FLUX: costs only


def run(pipe, steps: int):
    return pipe("a cat", generator=gen(1), output_type="np", num_inference_steps=steps).images


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_baseline_is_vanilla_and_every_plan_runs_in_half_precision(kind, dtype):
    pipe = toy_pipeline(kind).to(dtype=dtype)
    steps = 4 if kind == "lcm" else 20
    vanilla = run(pipe, steps)
    assert np.isfinite(vanilla).all()
    postdiff.apply(pipe, "baseline")
    assert np.array_equal(run(pipe, steps), vanilla)
    for name in SD_PLANS[1:] if kind == "sd" else [KINDS[kind]]:
        postdiff.apply(pipe, name)
        first, second = run(pipe, steps), run(pipe, steps)
        assert np.isfinite(first).all(), name
        assert np.array_equal(first, second), name
        assert np.abs(first - vanilla).max() > 0, name  # the plan ran
        assert pipe.unet.dtype == dtype if hasattr(pipe, "unet") else pipe.transformer.dtype == dtype
    postdiff.remove(pipe)


@pytest.mark.parametrize("name", ["toy-sd", "reference"])
def test_model_to_moves_the_generation_and_leaves_the_cost_alone(name):
    from postdiff.families.model import load_model
    from postdiff_lab.generation import source_for

    fp32 = source_for(load_model(name, need_pipeline=True))
    bf16 = source_for(load_model(name, need_pipeline=True).to("cpu", "bfloat16"))
    assert (bf16.model.device, bf16.model.dtype) == ("cpu", "bfloat16")
    assert next(bf16.model.network().parameters()).dtype == torch.bfloat16
    for plan in ("baseline", "postdiff"):
        compiled = bf16.compile(plan)
        assert bf16.cost(compiled).ratio == fp32.cost(fp32.compile(plan)).ratio
        images = bf16.generate(plan, 4, 0).images
        reference = fp32.generate(plan, 4, 0).images
        assert np.isfinite(images).all()
        # the same seed's noise (drawn on the CPU in float32), so the same pictures up to bf16's rounding
        assert np.abs(images - reference).mean() < 0.1


def test_auto_picks_the_cpu_here_and_float32_on_it():
    assert resolve_device(None) == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16 and resolve_dtype("auto", "mps") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    for bad, words in (("cuda", "no cuda device here (found: cpu)"), ("cuda:x", "unknown PyTorch device"), ("gpu", "unknown")):
        with pytest.raises(PostDiffError, match=words.replace("(", r"\(").replace(")", r"\)")):
            resolve_device(bad)
    with pytest.raises(PostDiffError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")
