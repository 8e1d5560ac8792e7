"""The cost of a plan: multiply-accumulates (MACs) per step and in total, against a baseline plan.

Pure arithmetic over a compiled plan; the MACs of one network call come from a counter (``postdiff.pytorch.macs.
MacCounter`` counts them on the real module structure, on the ``meta`` device). Only the denoising network is
counted: the text encoder and VAE run once per image whatever the plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from postdiff.plan.compiler import Plan, step_batch


class CallCounter(Protocol):
    """What ``plan_cost`` asks of a MAC counter (``postdiff.pytorch.macs.MacCounter``)."""

    cfg: bool

    def macs(self, variant: str, latent_hw: tuple[int, int], batch: int) -> int: ...


@dataclass(frozen=True)
class StepCost:
    index: int
    variant: str
    latent_hw: tuple[int, int]
    batch: int
    macs: int


@dataclass(frozen=True)
class PlanCost:
    plan: str
    steps: tuple[StepCost, ...]
    baseline_macs: int

    @property
    def total_macs(self) -> int:
        return sum(s.macs for s in self.steps)

    @property
    def ratio(self) -> float:
        """Plan MACs / baseline MACs (lower is cheaper)."""
        return self.total_macs / self.baseline_macs

    @property
    def reduction(self) -> float:
        return 1.0 - self.ratio

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "total_macs": self.total_macs,
            "baseline_macs": self.baseline_macs,
            "ratio": self.ratio,
            "reduction": self.reduction,
            "steps": [{**asdict(s), "latent_hw": list(s.latent_hw)} for s in self.steps],
        }


def plan_cost(plan: Plan, counter: CallCounter, baseline: Plan, *, images: int = 1, cfg: bool | None = None) -> PlanCost:
    """MACs of every step of ``plan`` and of ``baseline`` (normally the ``baseline`` plan at the same size); CFG steps
    run two branches per image unless ``cfg`` is False (default: the counter's UNet decides, ``MacCounter.cfg``)."""
    cfg = counter.cfg if cfg is None else cfg

    def costs(p: Plan) -> tuple[StepCost, ...]:
        out = []
        for s in p.steps:
            b = step_batch(s.guidance, images, cfg)
            out.append(StepCost(s.index, s.variant, s.latent_hw, b, counter.macs(s.variant, s.latent_hw, b)))
        return tuple(out)

    base_total = sum(c.macs for c in costs(baseline))
    return PlanCost(plan=plan.name, steps=costs(plan), baseline_macs=base_total)
