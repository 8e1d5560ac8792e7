"""Fewer steps or cheaper steps? Plan search under a compute budget (``postdiff plan search``) and the budget
sweep of both families (``postdiff sweep``).

Two families of plans, each a grid:

* fewer steps: ``steps:N`` (the plain sampler with N steps), MACs N/20 of the 20-step baseline;
* cheaper steps: 20 steps with the paper's levers, over the low-resolution scale β (1 = off), the switch point s
  (fraction of the steps at low resolution), the DeepCache interval k (1 = off) and the step m after which
  classifier-free guidance is gated off (0 = off).

The MACs of every candidate come from the cost model; quality is measured by generating samples: in-domain FID
or KID (the reference model's classifier features against the Fashion-MNIST test set) or LPIPS to the
baseline image of the same seed (any model). Lower is better for all three. As in the paper, the choice is made
on a small calibration set; the search then measures the best few on held-out seeds and reports how well the
two rankings agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from postdiff.errors import PlanError, PostDiffError, RecipeError
from postdiff.plan.recipe import DeepCache, LowRes, Recipe, XAttnGate

from .generation import Source
from .text_image import TextImageSet

FAMILIES = ("fewer-steps", "cheaper-steps")
PAPER_SWITCH = "cheaper-steps-paper-switch"  # with --shifts: the best cheaper-steps plan without a shift, per budget
METRICS = ("fid", "kid", "lpips", "clip")
HOLDOUT_SEED_OFFSET = 1  # held-out images use seed + 1: every image's noise differs from the calibration set's


@dataclass(frozen=True)
class Grid:
    betas: tuple[float, ...] = (1.0, 0.75, 0.5)
    switches: tuple[float, ...] = (0.25, 0.5)
    intervals: tuple[int, ...] = (1, 2, 3, 5)
    gates: tuple[int, ...] = (0, 5, 10, 15)
    shifts: tuple[int, ...] = (0,)  # low_res.renoise_shift values (0: the paper's switch)

    def __post_init__(self) -> None:  # every grid is checked once, where it is made
        for b in self.betas:
            if not 0 < b <= 1:
                raise PostDiffError(f"--betas values must be in (0, 1] (1 = no low-resolution phase), got {b}")
        for s in self.switches:
            if not 0 < s < 1:
                raise PostDiffError(f"--switches values must be in (0, 1) (a fraction of the steps), got {s}")
        for k in self.intervals:
            if k < 1:
                raise PostDiffError(f"--intervals values must be at least 1 (1 = no DeepCache), got {k}")
        for m in self.gates:
            if m < 0:
                raise PostDiffError(f"--gates values must be 0 (no gate) or a step number, got {m}")
        for r in self.shifts:
            if int(r) != r:
                raise PostDiffError(f"--shifts values must be integers (steps), got {r}")

    def check_steps(self, steps: int) -> None:
        """Refuse gates at or beyond the last step: they would silently drop every candidate that uses them."""
        late = [m for m in self.gates if m >= steps]
        if late:
            raise PostDiffError(
                f"--gates {','.join(map(str, late))} is at or beyond the last of the {steps} steps, so no plan could use it; "
                f"give gates from 1 to {steps - 1} (or 0 for no gate)"
            )


@dataclass
class Candidate:
    name: str
    family: str
    recipe: Recipe
    macs_ratio: float
    scores: dict[str, float] = field(default_factory=dict)  # "calibration", "holdout"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "macs_ratio": self.macs_ratio, "recipe": self.recipe.to_dict(), **self.scores}


def _shift(recipe: Recipe) -> int:
    return recipe.low_res.renoise_shift if recipe.low_res is not None else 0


def _cheaper_name(beta: float, switch: float, k: int, m: int, shift: int = 0) -> str:
    parts = [f"b{beta:g}@{switch:g}" + (f"r{shift:+d}" if shift else "")] if beta < 1 else []
    parts += [f"k{k}"] if k > 1 else []
    parts += [f"m{m}"] if m else []
    return "-".join(parts)


def candidates(source: Source, grid: Grid, steps: int = 20, max_ratio: float = 1.0) -> list[Candidate]:
    """Every plan of both families with a MACs ratio of at most ``max_ratio`` (the baseline itself excluded).
    Grid points the model or recipe rules out (a latent size the UNet cannot take, a gate beyond the last step)
    are left out."""
    out: list[Candidate] = []

    def add(name: str, family: str, recipe: Recipe) -> None:
        try:
            plan = source.compile(recipe)
        except (RecipeError, PlanError):
            return
        ratio = source.macs_ratio(plan)
        if ratio <= max_ratio + 1e-9:
            out.append(Candidate(name, family, recipe, ratio))

    for n in range(1, steps):
        add(f"steps:{n}", "fewer-steps", Recipe(name=f"steps:{n}", steps=n))
    for beta in grid.betas:
        for switch, shift in product(grid.switches, grid.shifts) if beta < 1 else [(0.0, 0)]:
            for k in grid.intervals:
                for m in grid.gates:
                    name = _cheaper_name(beta, switch, k, m, shift)
                    if not name or (m and m >= steps):
                        continue
                    try:
                        recipe = Recipe(
                            name=name,
                            steps=steps,
                            low_res=LowRes(scale=beta, until=switch, renoise_shift=int(shift)) if beta < 1 else None,
                            deepcache=DeepCache(interval=k) if k > 1 else None,
                            xattn_gate=XAttnGate(after=m) if m else None,
                        ).with_steps(steps)  # validated: a shift beyond the schedule is left out
                    except RecipeError:
                        continue
                    add(name, "cheaper-steps", recipe)
    return out


class Scorer:
    """Quality of a plan from ``n`` samples of seed ``seed`` (lower is better), each measured once and kept.

    Samples are measured in cells (``postdiff_lab.cluster``) by ``executor`` (in this process by default, or on a
    Dask or Ray cluster); FID and KID are computed here from the gathered features, LPIPS is the mean of the
    per-sample distances the cells return."""

    def __init__(
        self,
        source: Source,
        metric: str | None,
        steps: int = 20,
        *,
        executor=None,
        shard: int | None = None,
        threads: int | None = None,
        text: TextImageSet | None = None,
        scores_cache: str | Path | None = None,
    ) -> None:
        from .cluster import Executor

        metric = metric or default_metric(source)  # None: FID for the embedded models, LPIPS otherwise
        if metric not in METRICS:
            raise PostDiffError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
        own = source.model.dataset is not None
        if metric in ("fid", "kid") and not own and (text is None or text.reference is None):
            raise PostDiffError(
                f"--metric {metric} needs a reference set: the embedded models have theirs; for {source.model.name} pass "
                f"--reference-images DIR (or use --metric lpips)"
            )
        if metric == "clip" and (text is None or text.clip is None):
            raise PostDiffError("--metric clip needs a CLIP model: pass --clip DIR (a folder saved by CLIPModel.save_pretrained)")
        self.source, self.metric, self.steps, self.text = source, metric, steps, text
        self.executor = executor or Executor()
        self.shard, self.threads = shard, threads  # None: the defaults of postdiff_lab.cluster
        self._scores: dict[tuple[str, int, int], float] = {}
        self.accuracy: dict[tuple[str, int, int], float] = {}  # class accuracy of the same samples (class models)
        self._model_hash: str | None = None
        self.seconds = 0.0
        # every measured score kept on disk, one file per (what was measured): a run cut short (a sweep takes hours
        # on 2 cores) measures only what it has not measured yet when it runs again
        self.scores_cache = None if scores_cache is None else Path(scores_cache)

    @property
    def reference_set(self) -> str | None:
        """What a distribution metric compares the samples with (None for LPIPS and CLIP score)."""
        if self.metric not in ("fid", "kid"):
            return None
        if self.source.model.dataset is not None:
            return f"in-domain classifier features of the {self.source.model.dataset} test set"
        return f"Inception features of the {len(self.text.reference)} images of {self.text.reference_dir}"

    def check_samples(self, **counts: int) -> None:
        """Refuse, before any work, sample counts a distribution metric cannot be computed from (0: a step left out)."""
        if self.metric not in ("fid", "kid"):
            return
        from .metrics.distribution import MIN_SAMPLES

        for flag, n in counts.items():
            if 0 < n < MIN_SAMPLES:
                raise PostDiffError(
                    f"--{flag} {n}: {self.metric.upper()} needs at least {MIN_SAMPLES} samples per plan; "
                    f"use --{flag} {MIN_SAMPLES} or more (100 or more for a stable ranking), or --metric lpips"
                )

    def warn_if_few(self, n: int) -> None:
        """One warning line when the plans are about to be scored on fewer samples than the metric needs to mean much."""
        if self.metric in ("fid", "kid"):
            from .metrics.distribution import warn_if_few

            dims = 128 if self.source.model.dataset is not None else 2048  # the classifier's features, or Inception's
            warn_if_few(n, dims, self.metric.upper())

    @property
    def model_hash(self) -> str:
        if self._model_hash is None:
            from .cluster import model_fingerprint

            self._model_hash = model_fingerprint(self.source.model)
        return self._model_hash

    def accuracy_of(self, recipe: Recipe, n: int, seed: int) -> float | None:
        """The class accuracy of the samples ``score`` measured for (recipe, n, seed), where the model has classes."""
        return self.accuracy.get((recipe.to_json(indent=None), n, seed))

    def score(self, recipe: Recipe, n: int, seed: int) -> float:
        return self.score_many([(recipe, n, seed)])[0]

    def score_many(self, requests: Sequence[tuple[Recipe, int, int]]) -> list[float]:
        """Scores of several (recipe, n, seed) at once: their cells go to the executor together."""
        from .cluster import run_requests

        keys = [(r.to_json(indent=None), n, seed) for r, n, seed in requests]
        for k in keys:
            self._load_cached(k)
        todo = {k: req for k, req in zip(keys, requests) if k not in self._scores}
        # with a scores cache, one request at a time, so that each is kept as soon as it is measured
        batches = [[item] for item in todo.items()] if self.scores_cache is not None else [list(todo.items())] if todo else []
        for batch in batches:
            start = time.perf_counter()
            results = run_requests(
                self.executor,
                self.source,
                [req for _, req in batch],
                self.metric,
                model_hash=self.model_hash,
                shard=self.shard,
                threads=self.threads,
                baseline_steps=self.steps,
            )
            for (k, _), cell_results in zip(batch, results):
                self._scores[k] = self._combine(cell_results)
                if all("hits" in r for r in cell_results):  # class-conditional models: the class accuracy too
                    self.accuracy[k] = float(np.concatenate([r["hits"] for r in cell_results]).mean())
                self._keep(k)
            self.seconds += time.perf_counter() - start
        return [self._scores[k] for k in keys]

    def _cache_file(self, key: tuple[str, int, int]) -> Path:
        """The file of one measurement: named by everything its value depends on (the model's content, the metric and
        what it compares with, scheduler, guidance, size, prompts, where and in what precision PyTorch ran)."""
        import hashlib
        import json

        source = self.source
        what = {
            "key": list(key),
            "model": self.model_hash,
            "metric": self.metric,
            "steps": self.steps,
            "scheduler": source.scheduler_name,
            "guidance": source.guidance,
            "size": [source.height, source.width],
            "prompts": source.prompts,
            "torch": source.model.placement,
            "reference": None if self.text is None else [self.text.reference_dir, self.text.clip_dir],
        }
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.scores_cache / f"{digest}.json"

    def _load_cached(self, key: tuple[str, int, int]) -> None:
        if self.scores_cache is None or key in self._scores:
            return
        path = self._cache_file(key)
        if path.is_file():
            import json

            kept = json.loads(path.read_text())
            self._scores[key] = float(kept["score"])
            if kept.get("accuracy") is not None:
                self.accuracy[key] = float(kept["accuracy"])

    def _keep(self, key: tuple[str, int, int]) -> None:
        if self.scores_cache is None:
            return
        from .report import write_json

        self.scores_cache.mkdir(parents=True, exist_ok=True)
        write_json(self._cache_file(key), {"score": self._scores[key], "accuracy": self.accuracy.get(key), "request": list(key)})

    def _combine(self, results: list[dict[str, Any]]) -> float:
        if self.metric == "lpips":
            return float(np.concatenate([r["lpips"] for r in results]).mean())
        if self.metric == "clip":  # higher is better (``rank``)
            images = np.concatenate([r["images"] for r in results])
            return float(self.text.clip.scores(images, self.source.conditions_of(len(images))).mean())
        from .metrics import frechet_distance, kernel_inception_distance

        feats = np.concatenate([r["features"] for r in results])
        if self.source.model.dataset is not None:
            from .reference.classifier import test_set_features

            reference = test_set_features(self.source.model.dataset)
        else:
            reference = self.text.reference_features()
        if self.metric == "fid":
            return float(frechet_distance(feats, reference))
        return float(kernel_inception_distance(feats, reference, subset_size=min(1000, len(feats)))[0])


def rank(metric: str) -> Callable[[float], float]:
    """The sort key that puts the best score first: CLIP score is higher-is-better, every other metric lower."""
    return (lambda v: -v) if metric == "clip" else (lambda v: v)


def default_metric(source: Source) -> str:
    return "fid" if source.model.dataset is not None else "lpips"


def check_budget(budget: float, name: str = "a budget") -> None:
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and 0 < budget <= 1):  # NaN fails 0 < x
        raise PostDiffError(f"{name} must be a fraction of the baseline's MACs in (0, 1], got {budget}")


def _calibrate(pool: Sequence[Candidate], scorer: Scorer, n: int, seed: int, log: Callable[[str], None]) -> None:
    scorer.warn_if_few(n)
    todo = [c for c in pool if "calibration" not in c.scores]
    log(f"calibration: {len(todo)} plans x {n} samples on the {scorer.executor.name} executor")
    for i, (c, value) in enumerate(zip(todo, scorer.score_many([(c.recipe, n, seed) for c in todo])), 1):
        c.scores["calibration"] = value
        log(f"calibration [{i}/{len(todo)}] {c.name}: MACs {c.macs_ratio:.3f}, {scorer.metric} {value:.4g}")


def _accuracy_entry(accuracy: float | None) -> dict[str, float]:
    return {} if accuracy is None else {"holdout_accuracy": accuracy}


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return None if rho is None or math.isnan(rho) else float(rho)


def search(
    source: Source,
    budget: float,
    *,
    grid: Grid = Grid(),
    steps: int = 20,
    calibration: int = 100,
    holdout: int = 500,
    top: int = 5,
    metric: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    executor=None,
    shard: int | None = None,
    threads: int | None = None,
    text: TextImageSet | None = None,
    scores_cache: str | Path | None = None,
) -> dict[str, Any]:
    """The best plan of either family with MACs within ``budget``, chosen on ``calibration`` samples; the ``top``
    best are then measured on ``holdout`` held-out samples (0: skip) to report how well the rankings agree."""
    check_budget(budget)
    if calibration < 1:
        raise PostDiffError(f"--calibration must be at least 1 sample, got {calibration}")
    if holdout < 0 or top < 1:
        raise PostDiffError(f"--holdout must be 0 or more and --top at least 1, got {holdout} and {top}")
    grid.check_steps(steps)
    scorer = Scorer(source, metric, steps, executor=executor, shard=shard, threads=threads, text=text, scores_cache=scores_cache)
    scorer.check_samples(calibration=calibration, holdout=holdout)
    pool = candidates(source, grid, steps, budget)
    if not pool:
        raise PostDiffError(f"no plan in the grid fits a budget of {budget} of the baseline's MACs; raise --budget or widen the grid")
    log(f"plan search: {len(pool)} plans within {budget} of the baseline's MACs, {calibration} calibration samples each ({scorer.metric})")
    _calibrate(pool, scorer, calibration, seed, log)
    best_first = rank(scorer.metric)
    ranked = sorted(pool, key=lambda c: best_first(c.scores["calibration"]))
    chosen = ranked[0]
    agreement: dict[str, Any] = {"holdout_samples": holdout}
    if holdout:
        best = ranked[:top]
        values = scorer.score_many([(c.recipe, holdout, seed + HOLDOUT_SEED_OFFSET) for c in best])
        for i, (c, value) in enumerate(zip(best, values), 1):
            c.scores["holdout"] = value
            log(f"held out [{i}/{len(best)}] {c.name}: {scorer.metric} {value:.4g}")
        held = sorted(best, key=lambda c: best_first(c.scores["holdout"]))
        agreement.update(
            {
                "compared": [c.name for c in best],
                "spearman": _spearman([c.scores["calibration"] for c in best], [c.scores["holdout"] for c in best]),
                "holdout_best": held[0].name,
                "chosen_holdout_rank": held.index(chosen) + 1,
            }
        )
    return {
        "model": source.model.name,
        "budget": budget,
        "metric": scorer.metric,
        "reference_set": scorer.reference_set,
        "calibration_samples": calibration,
        "seed": seed,
        "chosen": chosen.to_dict(),
        "agreement": agreement,
        "candidates": [c.to_dict() for c in ranked],
        "measure_seconds": scorer.seconds,
    }


def sweep(
    source: Source,
    budgets: Sequence[float],
    *,
    grid: Grid = Grid(),
    steps: int = 20,
    calibration: int = 100,
    samples: int = 500,
    metric: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    executor=None,
    shard: int | None = None,
    threads: int | None = None,
    text: TextImageSet | None = None,
    scores_cache: str | Path | None = None,
) -> dict[str, Any]:
    """For each budget, the best plan of each family (chosen on the calibration set), both measured on
    ``samples`` held-out samples, with the baseline measured the same way."""
    if not budgets:
        raise PostDiffError("--budgets is empty; give fractions of the baseline's MACs, e.g. 0.3,0.4,0.5,0.6")
    for b in budgets:
        check_budget(b)
    if calibration < 1 or samples < 1:
        raise PostDiffError(f"--calibration and --samples must be at least 1, got {calibration} and {samples}")
    budgets = sorted(set(budgets))
    grid.check_steps(steps)
    scorer = Scorer(source, metric, steps, executor=executor, shard=shard, threads=threads, text=text, scores_cache=scores_cache)
    best_first = rank(scorer.metric)
    scorer.check_samples(calibration=calibration, samples=samples)
    pool = candidates(source, grid, steps, max(budgets))
    log(f"sweep: {len(pool)} plans within {max(budgets)} of the baseline's MACs, {calibration} calibration samples each ({scorer.metric})")
    _calibrate(pool, scorer, calibration, seed, log)
    held_seed = seed + HOLDOUT_SEED_OFFSET

    def winner(fits: list[Candidate]) -> Candidate | None:
        """The calibration winner among ``fits``."""
        return min(fits, key=lambda c: best_first(c.scores["calibration"])) if fits else None

    chosen: list[dict[str, Candidate | None]] = []
    for b in budgets:
        fits = [c for c in pool if c.macs_ratio <= b + 1e-9]
        picks = {family: winner([c for c in fits if c.family == family]) for family in FAMILIES}
        if any(grid.shifts):  # the best plan with the paper's switch beside it: does the shift move the frontier?
            picks[PAPER_SWITCH] = winner([c for c in fits if c.family == "cheaper-steps" and not _shift(c.recipe)])
        chosen.append(picks)
    # every winner and the baseline on the held-out samples, in one batch of cells (each plan once)
    held = list({id(c): c for picks in chosen for c in picks.values() if c is not None}.values())
    values = scorer.score_many(
        [(Recipe(name="baseline", steps=steps), samples, held_seed)] + [(c.recipe, samples, held_seed) for c in held]
    )
    baseline = values[0]
    for c, value in zip(held, values[1:]):
        c.scores["holdout"] = value
        accuracy = scorer.accuracy_of(c.recipe, samples, held_seed)
        if accuracy is not None:
            c.scores["holdout_accuracy"] = accuracy
        log(f"sweep: {c.name}: {scorer.metric} {value:.4g} on {samples} held-out samples")
    rows = []
    for b, picks in zip(budgets, chosen):
        row: dict[str, Any] = {"budget": b}
        row.update({label: (c.to_dict() if c is not None else None) for label, c in picks.items()})
        present = [f for f in FAMILIES if row[f]]
        row["winner"] = min(present, key=lambda f: best_first(row[f]["holdout"])) if present else None
        rows.append(row)
    return {
        "model": source.model.name,
        "metric": scorer.metric,
        "reference_set": scorer.reference_set,
        "budgets": budgets,
        "calibration_samples": calibration,
        "samples": samples,
        "seed": seed,
        "baseline": {
            "macs_ratio": 1.0,
            "holdout": baseline,
            **_accuracy_entry(scorer.accuracy_of(Recipe(name="baseline", steps=steps), samples, held_seed)),
        },
        "rows": rows,
        "candidates": [c.to_dict() for c in sorted(pool, key=lambda c: (c.family, c.macs_ratio))],
        "measure_seconds": scorer.seconds,
    }


METRIC_LABELS = {
    "fid": "in-domain FID (classifier features; lower is better)",
    "kid": "in-domain KID (lower is better)",
    "lpips": "LPIPS to the baseline image (lower is better)",
    "clip": "CLIP score (higher is better)",
}


def pareto_plot(result: dict[str, Any], path) -> None:
    """Quality against MACs, one curve per family: the per-budget winners measured on the held-out samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    base = result["baseline"]["holdout"]
    for family, marker in zip(FAMILIES, ("o", "s")):
        points = {}
        for row in result["rows"]:
            c = row.get(family)
            if c:
                points[c["name"]] = (c["macs_ratio"], c["holdout"])
        if not points:
            continue
        xs, ys = zip(*sorted(points.values()))
        ax.plot([*xs, 1.0], [*ys, base], marker=marker, label=family)
        for name, (x, y) in points.items():
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter([1.0], [base], marker="*", s=120, color="black", zorder=3, label="baseline (20 steps)")
    for b in result["budgets"]:
        ax.axvline(b, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("MACs / baseline MACs")
    label = METRIC_LABELS[result["metric"]]
    if str(result.get("reference_set", "")).startswith("Inception"):
        label = f"Inception {result['metric'].upper()} against the reference images (lower is better)"
    ax.set_ylabel(label)
    if result["metric"] == "fid":
        ax.set_yscale("log")
    ax.set_title(f"{result['model']}: fewer steps vs cheaper steps ({result['samples']} held-out samples)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
