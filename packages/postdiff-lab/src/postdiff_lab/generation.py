"""One way to generate a batch of images under a plan, whatever the model: a class-conditional pipeline (the
embedded reference models) or a diffusers SD/SDXL pipeline. The CLI (generate, demo, eval) and the benchmarks
use this instead of knowing each model; what differs between models is the family's (``postdiff.families``).

Image ``i`` of a request depends only on (seed, i): the same seed gives paired images under every plan.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from postdiff.errors import PostDiffError
from postdiff.families.model import Model
from postdiff.plan.compiler import Plan
from postdiff.plan.cost import PlanCost, plan_cost
from postdiff.plan.recipe import Recipe, load_recipe


@dataclass
class Batch:
    images: np.ndarray  # N x H x W x C, float in [0, 1]
    conditions: list  # class labels or prompts, one per image
    seconds: float


class Source:
    def __init__(
        self,
        model: Model,
        *,
        scheduler: str | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.scheduler_name = scheduler
        self.guidance = model.family.guidance(guidance)  # the family's default when not given
        self.height, self.width = height, width
        if prompts is not None and model.family.condition != "prompt":
            raise PostDiffError(f"--prompts is for text-to-image models; {model.name} takes {model.family.condition}s")
        self.prompts = list(prompts) if prompts else None  # the user's prompts: image i gets prompt i mod len

    def at_size(self, height: int, width: int) -> Source:
        """This source at another image size (same model, scheduler, guidance and prompts)."""
        return type(self)(
            self.model, scheduler=self.scheduler_name, guidance=self.guidance, height=height, width=width, prompts=self.prompts
        )

    def compile(self, recipe: Recipe | str, steps: int | None = None) -> Plan:
        return self.model.compile(recipe, steps, scheduler=self.scheduler_name, height=self.height, width=self.width)

    def default_conditions(self, n: int) -> list:
        """The conditions of image 0..n-1 when none are given (the user's prompts in turn, else classes in turn or
        the family's prompts)."""
        if self.prompts:
            return [self.prompts[i % len(self.prompts)] for i in range(n)]
        return self.model.family.default_conditions(n, self.model.condition_info)

    def parse_condition(self, text):
        """A user's ``--prompt`` (None: the family's default) as the model takes it."""
        return self.model.family.parse_condition(text, self.model.condition_info)

    def cost(self, plan: Plan) -> PlanCost:
        """MACs of every step of ``plan`` and of the baseline it is compared with."""
        baseline = self.compile(load_recipe("baseline").with_steps(baseline_steps(plan)))
        return plan_cost(plan, self.model.mac_counter(plan.recipe), baseline)

    def macs_ratio(self, plan: Plan) -> float:
        return self.cost(plan).ratio

    def generate(
        self, recipe: Recipe, n: int, seed: int = 0, *, conditions: Sequence | None = None, progress: bool = False, first: int = 0
    ) -> Batch:
        """``n`` images of seed ``seed``; ``first``: they are images first .. first + n - 1 of a larger request (a shard
        of it, as cluster cells generate): the same images, with the same conditions, as in the whole request."""
        raise NotImplementedError

    def conditions_of(self, n: int, first: int = 0) -> list:
        return self.default_conditions(first + n)[first:]


def baseline_steps(plan: Plan) -> int:
    """The baseline a plan is compared with: 20 steps, or the plan's own count for plans that are not
    "fewer steps" plans (``steps:N`` is compared with the 20-step baseline, its whole point)."""
    from postdiff.plan.recipe import DEFAULT_STEPS

    name = plan.recipe.name or ""
    return DEFAULT_STEPS if name.startswith("steps:") else plan.recipe.steps


class ClassSource(Source):
    """A class-conditional pipeline (the embedded Fashion-MNIST and digits models); conditions are class labels
    (image i gets class i mod 10). Other sizes than 32 px run the model at that pixel size (``postdiff eval --sizes``)."""

    def generate(self, recipe, n, seed=0, *, conditions=None, progress=False, first=0) -> Batch:
        pipe = self.model.pipeline
        labels = list(conditions) if conditions is not None else self.conditions_of(n, first)
        plan = self.compile(recipe)
        start = time.perf_counter()
        images = pipe.generate(
            labels,
            plan,
            seed=seed,
            guidance_scale=self.guidance,
            scheduler=self.scheduler_name,  # None: the model's own
            progress=progress,
            first=first,
        )
        seconds = time.perf_counter() - start
        return Batch(images.astype(np.float32)[..., None] / 255.0, labels, seconds)


class DiffusersSource(Source):
    """A diffusers SD/SDXL/LCM/PixArt/SD3/SANA pipeline run through ``postdiff.apply``; conditions are prompts."""

    def generate(self, recipe, n, seed=0, *, conditions=None, progress=False, first=0) -> Batch:
        from postdiff.pytorch import diffusers_hook

        pipe = self.model.pipeline
        if self.scheduler_name:
            pipe.scheduler = self.model.scheduler(self.scheduler_name)
        prompts = list(conditions) if conditions is not None else self.conditions_of(n, first)
        diffusers_hook.apply(pipe, load_recipe(recipe))
        images = []
        start = time.perf_counter()
        # the size only when asked: a pipeline's own default (SANA's is 1024 px) is what None would not give
        size = {k: v for k, v in (("height", self.height), ("width", self.width)) if v is not None}
        try:
            for i, prompt in enumerate(prompts):
                out = pipe(
                    prompt,
                    **size,
                    guidance_scale=self.guidance,
                    generator=self.model.family.generator(seed, first + i),
                    output_type="np",
                    **self.model.family.call_options(),
                )
                images.append(out.images[0])
        finally:
            diffusers_hook.remove(pipe)
        return Batch(np.stack(images), prompts, time.perf_counter() - start)


SOURCES = {"label": ClassSource, "prompt": DiffusersSource}  # by the kind of condition the model's family takes


def source_for(model: Model, **kwargs) -> Source:
    return SOURCES[model.family.condition](model, **kwargs)
