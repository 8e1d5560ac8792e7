"""What only a GPU can show: plans on CUDA in float16, through the same diffusers path users run.

    python benchmarks/gpu_check.py                      # on a machine with CUDA; about 2 minutes on one H100
    python benchmarks/gpu_check.py --runs 5 --size 512

1. Exactness on CUDA fp16 (toy pipelines, random weights): ``baseline`` against the vanilla pipeline (max abs
   difference of the images; 0 expected: the baseline runs the same kernels in the same order), and every built-in
   plan runs, is finite and deterministic (two calls, same seed).
2. Speed on ``arch:sd15`` (SD1.5's UNet, VAE and CLIP configurations with random weights) at ``--size`` px, 20 steps,
   CFG 7.5: whole generations (text encoder, denoising, VAE decode), ``baseline`` and ``postdiff`` interleaved, after a
   warm-up, ``torch.cuda.synchronize()`` around each; medians, with the MACs ratio of the cost model beside them.

Prints a table and writes JSON (``--json``). Without CUDA it says so and exits 2: nothing is measured or made up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def exactness(device: str, dtype: str) -> list[dict]:
    import torch

    import postdiff
    from postdiff.plan.recipe import BUILTIN_PLANS
    from postdiff_lab.toy import toy_pipeline

    kind_of = {"postdiff-xl": "sdxl", "postdiff-dit": "pixart-sigma", "postdiff-lcm": "lcm"}
    rows = []
    for kind in ("sd", "sdxl", "pixart-sigma", "lcm"):
        pipe = toy_pipeline(kind).to(device, getattr(torch, dtype))
        pipe.set_progress_bar_config(disable=True)
        steps = 4 if kind == "lcm" else 20

        def run(p=pipe, s=steps):
            g = torch.Generator().manual_seed(1)  # CPU generator: diffusers draws on the CPU and moves the noise
            return p("a cat", generator=g, output_type="np", num_inference_steps=s).images

        vanilla = run()
        for name in ["baseline", *(n for n in BUILTIN_PLANS if kind_of.get(n, "sd") == kind and n != "baseline")]:
            postdiff.apply(pipe, name)
            first, second = run(), run()
            postdiff.remove(pipe)
            rows.append(
                {
                    "pipeline": kind,
                    "plan": name,
                    "finite": bool(np.isfinite(first).all()),
                    "deterministic": bool(np.array_equal(first, second)),
                    "max_abs_vs_vanilla": float(np.abs(first - vanilla).max()),
                }
            )
    return rows


def speed(device: str, dtype: str, size: int, runs: int) -> dict:
    import torch

    from postdiff.families.model import load_model
    from postdiff_lab.generation import source_for

    model = load_model("arch:sd15", need_pipeline=True).to(device, dtype)
    source = source_for(model, height=size, width=size)
    plans = ["baseline", "postdiff"]
    compiled = {p: source.compile(p) for p in plans}
    seconds: dict[str, list[float]] = {p: [] for p in plans}
    for p in plans:  # warm-up: kernels, cuDNN autotuning, allocator
        source.generate(p, 1, 0)
    for _ in range(runs):
        for p in plans:
            torch.cuda.synchronize()
            start = time.perf_counter()
            source.generate(p, 1, 0)
            torch.cuda.synchronize()
            seconds[p].append(time.perf_counter() - start)
    medians = {p: statistics.median(s) for p, s in seconds.items()}
    ratio = source.macs_ratio(compiled["postdiff"])
    return {
        "model": "arch:sd15 (random weights)",
        "image_px": size,
        "steps": compiled["baseline"].recipe.steps,
        "runs": runs,
        "seconds": seconds,
        "median_s": medians,
        "speedup": medians["baseline"] / medians["postdiff"],
        "macs_ratio": ratio,
        "efficiency": (medians["baseline"] / medians["postdiff"]) * ratio,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=str(HERE / "results" / "gpu_check.json"))
    args = ap.parse_args(argv)
    import torch

    from postdiff.pytorch.device import found_devices
    from postdiff_lab.report import machine_info, write_json

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (PyTorch found: {', '.join(found_devices())}); nothing measured", file=sys.stderr)
        return 2
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "machine": machine_info(),
        "exactness": exactness(args.device, args.dtype),
    }
    print(f"gpu_check on {result['gpu']} (torch {result['torch']}, CUDA {result['cuda']}), {args.dtype}")
    print("| pipeline | plan | finite | deterministic | max abs vs vanilla |")
    print("|---|---|---|---|---|")
    for r in result["exactness"]:
        print(f"| {r['pipeline']} | {r['plan']} | {r['finite']} | {r['deterministic']} | {r['max_abs_vs_vanilla']:.3g} |")
    write_json(args.json, result)  # the exactness part survives a failure in the speed part
    result["speed"] = speed(args.device, args.dtype, args.size, args.runs)
    s = result["speed"]
    print(
        f"\narch:sd15 (random weights), {s['image_px']} px, {s['steps']} steps, N = {s['runs']} interleaved: baseline "
        f"{s['median_s']['baseline']:.3f} s, postdiff {s['median_s']['postdiff']:.3f} s, {s['speedup']:.2f}x for "
        f"{1 / s['macs_ratio']:.2f}x fewer MACs (efficiency {s['efficiency']:.2f})"
    )
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
