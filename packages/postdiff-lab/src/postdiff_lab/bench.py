"""``postdiff bench``: plans × backends on one model, measured side by side.

For every backend that can run here and every plan: the export (cached by content, ``export_cache``), load time
(first and warm), the first generation, end-to-end latency over ``runs`` timed generations after ``warmup``
untimed ones (median, min, max), time per UNet call by variant, latent size and batch (``profiling``), peak
memory, MACs from the cost model, the speedup against ``baseline`` on the same backend, and fidelity (PSNR,
SSIM, LPIPS) against the PyTorch ``baseline`` image of the same seed. A backend that cannot run here is listed
with the reason.

Backends are measured one after the other (a library's worker threads keep spinning for a while after a call
and would slow the other one down); within a backend, timed runs alternate between plans (run 1 of every plan,
then run 2, ...), so drift on a noisy machine falls on all plans alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from postdiff.bundle import backends
from postdiff.errors import PostDiffError
from postdiff.families.model import load_model
from postdiff.plan.recipe import load_recipe

from .evaluation import LPIPS_NOTE, paired_fidelity
from .export_cache import cached_export
from .generation import source_for
from .profiling import PeakMemory, StepTimes
from .report import machine_info


@dataclass
class BenchConfig:
    model: str = "reference"
    plans: list[str] = field(default_factory=lambda: ["baseline", "postdiff"])
    backends: list[str] = field(default_factory=lambda: backends.names())  # torch and every installed backend
    runs: int = 3
    warmup: int = 1
    images: int = 10
    seed: int = 0
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    guidance: float | None = None
    threads: int | None = None
    cache_dir: str | None = None
    weights: list[str] = field(default_factory=lambda: ["fp32"])  # bundle weight types (--weights)
    device: str | None = None  # PyTorch's device and dtype for the torch rows (None: auto); OpenVINO reads --device too
    dtype: str | None = None
    low_memory: bool = False  # bundles under bundle_runtime.LeanRunner
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # backend name -> its runner options

    def check(self) -> None:
        """Every input error before anything is loaded or exported."""
        if self.runs < 1:
            raise PostDiffError(f"--runs must be at least 1, got {self.runs}")
        if self.warmup < 0:
            raise PostDiffError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.images < 1:
            raise PostDiffError(f"--images must be at least 1, got {self.images}")
        if self.threads is not None and self.threads < 1:
            raise PostDiffError(f"--threads must be at least 1, got {self.threads}")
        if backends.TORCH in self.backends:
            from postdiff.pytorch.device import check_target

            check_target(self.device, self.dtype)
        if not self.plans:
            raise PostDiffError("--plans is empty; name at least one plan, e.g. --plans baseline,postdiff")
        if not self.backends:
            raise PostDiffError("--backends is empty; name at least one of: " + ", ".join(backends.names()))
        if not self.weights:
            raise PostDiffError("--weights is empty; name at least one of fp32, fp16, int8, int4")
        known = ("fp32", "fp16", "int8", "int4")
        for w in self.weights:
            if w not in known:
                raise PostDiffError(f"--weights: unknown weight type {w!r}; choose from {', '.join(known)}")
        self.weights = list(dict.fromkeys(self.weights))
        for name in self.backends:
            if name != backends.TORCH:
                backends.get(name)
        for name in self.plans:
            load_recipe(name)
        if "baseline" not in self.plans:  # speedups are against it
            self.plans.insert(0, "baseline")
        self.plans = list(dict.fromkeys(self.plans))
        self.backends = list(dict.fromkeys(self.backends))


def split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


class _Target:
    """One (backend, plan): how to load it and how to generate with it."""

    def __init__(self, backend: str, plan_name: str, weights: str = "fp32") -> None:
        self.backend, self.plan_name, self.weights = backend, plan_name, weights
        self.row: dict[str, Any] = {"backend": backend, "plan": plan_name, "weights": weights}
        self.times = StepTimes()
        self.seconds: list[float] = []
        self.memory: list[dict] = []
        self.images: np.ndarray | None = None
        self.generate: Callable[[], np.ndarray] | None = None

    def timed(self) -> None:
        with self.times, PeakMemory() as mem:
            start = time.perf_counter()
            images = self.generate()
            self.seconds.append(time.perf_counter() - start)
        self.memory.append(mem.to_dict())
        if self.images is None:
            self.images = images


def _timed_load(load: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    obj = load()
    return obj, time.perf_counter() - start


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, load_s = _timed_load(lambda: load_model(cfg.model, need_pipeline=True).to(cfg.device, cfg.dtype))
    source = source_for(model, scheduler=cfg.scheduler, guidance=cfg.guidance, height=cfg.height, width=cfg.width)
    guidance = source.guidance
    compiled = {name: source.compile(name, cfg.steps) for name in cfg.plans}
    costs = {name: source.cost(plan) for name, plan in compiled.items()}
    conditions = source.default_conditions(cfg.images)
    base_plan = compiled["baseline"]
    result: dict[str, Any] = {
        "model": model.name,
        "weights": model.weights,
        "image_hw": [x * model.vae_scale_factor for x in base_plan.latent_hw],
        "steps": base_plan.recipe.steps,
        "scheduler": base_plan.scheduler,
        "guidance": guidance,
        "images_per_run": cfg.images,
        "config": asdict(cfg),
        "machine": machine_info(),
        "notes": [
            "speedup: baseline median / plan median on the same backend; MACs from the cost model (UNet only, CFG batch)",
            "fidelity: against the PyTorch baseline image of the same seed; " + LPIPS_NOTE,
            "peak memory: highest resident set size sampled every 5 ms during a timed run (growth: above the RSS at its start)",
        ],
        "results": [],
        "skipped": [],
    }
    if "torch" in cfg.backends:  # the PyTorch rows' load: the one above (first) and once more (warm)
        load_warm_s = _timed_load(lambda: load_model(cfg.model, need_pipeline=True).to(cfg.device, cfg.dtype))[1]
    targets: list[_Target] = []
    for backend in cfg.backends:
        reason = backends.unavailable(backend) or (backend != backends.TORCH and model.family.bundle_refusal(model, backend))
        if reason:
            log(f"bench: {backend}: skipped ({reason})")
            result["skipped"].append({"backend": backend, "reason": reason})
            continue
        if backend == backends.TORCH:
            from postdiff.pytorch.device import short_dtype

            for name in cfg.plans:
                t = _Target(backend, name, short_dtype(model.dtype))
                t.row.update(load_s=load_s, load_warm_s=load_warm_s, load_note="load_model (weights into a PyTorch pipeline)")
                t.row["executed"] = {"device": model.device, "precision": model.dtype}  # where and how PyTorch ran
                recipe = compiled[name].recipe
                t.generate = lambda r=recipe: source.generate(r, cfg.images, cfg.seed, conditions=conditions).images
                targets.append(t)
            continue
        for weights in cfg.weights:
            try:
                export_weights = backends.get(backend).export_weights(weights)
            except PostDiffError as exc:
                log(f"bench: {backend} {weights}: skipped ({exc})")
                result["skipped"].append({"backend": f"{backend} {weights}", "reason": str(exc)})
                continue
            for name in cfg.plans:
                t = _Target(backend, name, weights)
                _prepare_bundle(t, cfg, compiled[name], conditions, guidance, log, export_weights)
                targets.append(t)
    if not targets:
        raise PostDiffError("no backend in --backends can run here: " + "; ".join(s["reason"] for s in result["skipped"]))

    for backend in dict.fromkeys((t.backend, t.weights) for t in targets):
        block = [t for t in targets if (t.backend, t.weights) == backend]
        log(f"bench: {' '.join(backend)}: first run, {cfg.warmup} warm-up run(s) and {cfg.runs} timed runs per plan")
        for t in block:
            if cfg.warmup:  # the first warm-up is the first run; without warm-ups, the first timed run is
                start = time.perf_counter()
                t.images = t.generate()
                t.row["first_run_s"] = time.perf_counter() - start
            for _ in range(cfg.warmup - 1):
                t.generate()
        for _ in range(cfg.runs):
            for t in block:
                t.timed()
        for t in block:
            t.row.setdefault("first_run_s", t.seconds[0])

    torch_base = next((t.images for t in targets if t.backend == "torch" and t.plan_name == "baseline"), None)
    if torch_base is None:
        log("bench: PyTorch baseline images for the fidelity columns")
        torch_base = source.generate(compiled["baseline"].recipe, cfg.images, cfg.seed, conditions=conditions).images
    base_median = {(t.backend, t.weights): statistics.median(t.seconds) for t in targets if t.plan_name == "baseline"}
    for t in targets:
        cost = costs[t.plan_name]
        median = statistics.median(t.seconds)
        t.row.update(
            {
                "runs_s": t.seconds,
                "median_s": median,
                "min_s": min(t.seconds),
                "max_s": max(t.seconds),
                "speedup": base_median[(t.backend, t.weights)] / median,
                "macs": cost.total_macs * cfg.images,
                "macs_ratio": cost.ratio,
                "memory": max(t.memory, key=lambda m: m["peak_rss_mb"]),
                "unet_calls": t.times.summary(),
                **paired_fidelity(t.images, torch_base),
            }
        )
        result["results"].append(t.row)
    result["grid"] = [t.images[:10] for t in targets]
    result["grid_labels"] = [f"{t.backend} {t.weights} {t.plan_name}" for t in targets]
    result["timestamp"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return result


def _prepare_bundle(t: _Target, cfg: BenchConfig, plan, conditions, guidance, log, export_weights: dict) -> None:
    from postdiff.bundle.runtime import load_bundle

    backend = backends.get(t.backend)
    options: dict[str, Any] = {"height": cfg.height, "width": cfg.width, "steps": plan.recipe.steps, "scheduler": cfg.scheduler}
    options.update(export_weights)
    if backend.fixed_shapes:  # graphs of one batch size: export for the bench's images per call
        options["batch"] = cfg.images
    load_options: dict[str, Any] = dict(cfg.options.get(t.backend, {}))
    if "threads" in backend.runner_options:
        load_options["threads"] = cfg.threads
    exporter = backend.bundle_format or t.backend  # OpenVINO runs ONNX bundles
    folder, cached, seconds = cached_export(exporter, cfg.model, plan.recipe, cache_dir=cfg.cache_dir, log=log, **options)
    t.row.update({"bundle": str(folder), "export_cached": cached, "export_s": seconds})

    def opened():
        pipe = load_bundle(folder, backend, low_memory=cfg.low_memory, **load_options)
        pipe.open(pipe.compile(plan.recipe, scheduler=cfg.scheduler))
        return pipe

    pipe, t.row["load_s"] = _timed_load(opened)
    pipe, t.row["load_warm_s"] = _timed_load(opened)
    t.row["weights"] = pipe.manifest.weights  # what the bundle holds, as its manifest says
    t.row["executed"] = dict(getattr(pipe.runner, "executed", {}))  # what the runtime ran, read back (precision, provider)
    t.row["load_note"] = "manifest and checksums read, every graph the plan runs opened"
    bundle_plan = pipe.compile(plan.recipe, scheduler=cfg.scheduler)
    t.generate = lambda: pipe.generate(conditions, bundle_plan, seed=cfg.seed, guidance_scale=guidance, scheduler=cfg.scheduler)
