"""Compiled plans: the per-step instructions every backend interprets.

A plan has one entry per UNet evaluation (``Step``). A backend only has to know how to run one UNet variant at
one latent size; everything else (which variant, which size, when to switch resolution, when to drop CFG) is
decided here, once, as data:

    {"index": 7, "inference_step": 7, "timestep": 651, "latent_hw": [32, 32], "unet": "shallow",
     "guidance": "cfg", "xattn": "compute", "events": []}

Fields of a step:
    unet      "full" (whole UNet; refreshes the DeepCache feature) or "shallow" (outer layers only; reuses it)
    guidance  "cfg" (unconditional + conditional batch) or "cond" (conditional branch only, CFG dropped)
    xattn     "compute" (cross-attention as usual), "capture" (compute it and keep the conditional outputs)
              or "cached" (reuse the kept outputs instead of computing cross-attention)
    events    "switch_resolution": the latent arrives from a lower resolution (x0 upsampled and re-noised);
              every cache is invalid from here on and the scheduler's history is reset.
              "repeat_step": the call runs again at the previous call's point of the schedule: the warm-up a
              scheduler makes after it restarts at the switch (PNDM evaluates its first step twice).
    schedule_index  (only where it differs from ``index``) the call's position in the scheduler's timesteps: a
              switch with ``low_res.renoise_shift`` re-noises to another point of the schedule, and the steps after
              it repeat (or skip) that many positions. The scheduler restarts there at the switch.

Steps are counted by plan index (one per UNet call), never by searching the timestep list: second-order
schedulers such as Heun evaluate the UNet twice per inference step at repeated timesteps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from postdiff.errors import PlanError, RecipeError
from postdiff.files import atomic_write_text
from postdiff.plan.recipe import DeepCache, Recipe, parse_json, switch_step

PLAN_FORMAT = "postdiff.plan/1"
UNET_KINDS = ("full", "shallow")
GUIDANCE_KINDS = ("cfg", "cond")
XATTN_KINDS = ("compute", "capture", "cached")
EVENTS = ("switch_resolution", "repeat_step")


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about the denoising network: a UNet (``postdiff.pytorch.unet.model_spec``) or a
    transformer (``postdiff.pytorch.transformer.transformer_spec``: the patch size is its downsampling factor, ``num_layers``
    its blocks, ``num_down_blocks`` the ``deepcache.block`` values it takes)."""

    name: str
    downsample_factor: int
    num_down_blocks: int
    has_cross_attention: bool
    # guidance is a UNet input (LCM's ``timestep_cond``), not a CFG batch: every step runs one branch per image
    guidance_embedded: bool = False
    num_layers: int | None = None  # transformer blocks (None: a UNet)

    @property
    def is_transformer(self) -> bool:
        return self.num_layers is not None


def guidance_dim(unet_config) -> int | None:
    """The width of the guidance embedding a guidance-distilled UNet takes as ``timestep_cond`` (LCM's
    ``time_cond_proj_dim``), or None for a UNet guided by a CFG batch: the one test of which kind a UNet is."""
    dim = dict(unet_config).get("time_cond_proj_dim")
    return None if dim is None else int(dim)


def cut_choices(num_layers: int) -> int:
    """How many ``deepcache.block`` values a transformer of ``num_layers`` blocks takes (each must leave a nonempty
    span): its ``ModelSpec.num_down_blocks``."""
    return max((num_layers - 1) // 2, 0)


def block_span(num_layers: int, block: int = 0, span=None, *, where: str = "recipe.deepcache") -> tuple[int, int]:
    """The transformer blocks ``[start, end)`` a block-cache plan caches: the recipe's ``span``, or for ``block`` b the
    span that leaves the outer b + 1 blocks at each end computed. RecipeError when it does not fit the model."""
    if span is None:
        if not 0 <= block < cut_choices(num_layers):
            raise RecipeError(
                f"{where}.block={block} is out of range for a transformer of {num_layers} blocks: use 0 to "
                f"{cut_choices(num_layers) - 1} (block b caches blocks b+1 to {num_layers}-b-2), or name the blocks with {where}.span"
            )
        return (block + 1, num_layers - block - 1)
    a, b = (int(v) for v in span)
    if not (0 <= a < b <= num_layers) or (a, b) == (0, num_layers):
        raise RecipeError(
            f"{where}.span=[{a}, {b}] does not fit a transformer of {num_layers} blocks: give 0 <= start < end <= "
            f"{num_layers}, leaving at least one block computed"
        )
    return (a, b)


@dataclass(frozen=True)
class Step:
    index: int
    inference_step: int
    timestep: float
    latent_hw: tuple[int, int]
    unet: str = "full"
    guidance: str = "cfg"
    xattn: str = "compute"
    events: tuple[str, ...] = ()
    schedule_index: int | None = None  # where it differs from ``index`` (a shifted switch); see ``scheduler_index``

    @property
    def scheduler_index(self) -> int:
        """The call's position in the scheduler's timesteps (its noise level): ``index`` unless a shifted switch
        moved the steps after it."""
        return self.index if self.schedule_index is None else self.schedule_index

    @property
    def variant(self) -> str:
        """Name of the UNet callable this step needs: full, shallow, full_capture, full_cached, shallow_cached."""
        return self.unet if self.xattn == "compute" else f"{self.unet}_{self.xattn}"

    @property
    def switches_resolution(self) -> bool:
        return "switch_resolution" in self.events

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latent_hw"] = list(self.latent_hw)
        d["events"] = list(self.events)
        if self.schedule_index is None:  # plans without a shifted switch read as they always did
            del d["schedule_index"]
        return d


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    latent_hw: tuple[int, int]
    steps: tuple[Step, ...]
    scheduler: str = ""
    order: int = 1

    @property
    def name(self) -> str:
        return self.recipe.label

    @property
    def timesteps(self) -> list[float]:
        return [s.timestep for s in self.steps]

    @property
    def latent_sizes(self) -> list[tuple[int, int]]:
        """Latent sizes in the order the plan uses them."""
        seen: list[tuple[int, int]] = []
        for s in self.steps:
            if s.latent_hw not in seen:
                seen.append(s.latent_hw)
        return seen

    @property
    def gates_cross_attention(self) -> bool:
        return any(s.xattn != "compute" for s in self.steps)

    def variants(self) -> list[tuple[str, tuple[int, int]]]:
        """(variant, latent size) pairs the plan needs, in first-use order: what an exporter must provide."""
        out: list[tuple[str, tuple[int, int]]] = []
        for s in self.steps:
            key = (s.variant, s.latent_hw)
            if key not in out:
                out.append(key)
        return out

    # -- serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "recipe": self.recipe.to_dict(),
            "latent_hw": list(self.latent_hw),
            "scheduler": self.scheduler,
            "order": self.order,
            "steps": [s.to_dict() for s in self.steps],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "plan") -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f'{where}: not a compiled plan (expected "format": "{PLAN_FORMAT}")')
        try:
            recipe = Recipe.from_dict(data["recipe"], where=f"{where}.recipe")
            steps = tuple(
                Step(
                    index=int(s["index"]),
                    inference_step=int(s["inference_step"]),
                    timestep=float(s["timestep"]),
                    latent_hw=(int(s["latent_hw"][0]), int(s["latent_hw"][1])),
                    unet=str(s["unet"]),
                    guidance=str(s["guidance"]),
                    xattn=str(s["xattn"]),
                    events=tuple(s.get("events", ())),
                    schedule_index=None if s.get("schedule_index") is None else int(s["schedule_index"]),
                )
                for s in data["steps"]
            )
            plan = cls(
                recipe=recipe,
                latent_hw=(int(data["latent_hw"][0]), int(data["latent_hw"][1])),
                steps=steps,
                scheduler=str(data.get("scheduler", "")),
                order=int(data.get("order", 1)),
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            if isinstance(exc, (PlanError, RecipeError)):
                raise
            raise PlanError(
                f"{where}: malformed compiled plan ({type(exc).__name__}: {exc}); re-create it with `postdiff plan show --json`"
            ) from None
        validate_plan(plan)
        return plan

    @classmethod
    def from_json(cls, text: str, *, where: str = "plan") -> Plan:
        return cls.from_dict(parse_json(text, where, PlanError), where=where)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())


# -- compilation ----------------------------------------------------------------------------------------------------
def low_res_size(latent_hw: tuple[int, int], scale: float, factor: int, *, where: str = "recipe.low_res.scale") -> tuple[int, int]:
    """The low-resolution latent for ``scale``: per side, the multiple of the UNet's downsampling ``factor`` nearest
    to ``scale`` x the side (ties round up), at least ``factor`` and at most the side itself. So SDXL at 832x1216
    (latent 104x152, factor 4) with scale 3/4 runs its low-resolution phase at 80x112, where 78x114 is not a size its
    UNet takes. A multiple of the factor is what exported graphs take, and what keeps every skip connection aligned."""
    h, w = latent_hw
    lh, lw = (min(side, max(factor, math.floor(side * scale / factor + 0.5) * factor)) for side in (h, w))
    if (lh, lw) == (h, w):
        raise RecipeError(
            f"{where}={scale:g} gives no lower resolution for the {h}x{w} latent: the nearest sides the UNet can take "
            f"(multiples of its downsampling factor {factor}) are the full ones. Use a smaller scale, a larger image, or "
            f"a plan without low_res"
        )
    return lh, lw


def first_latent_hw(recipe: Recipe, latent_hw: tuple[int, int], model: ModelSpec) -> tuple[int, int]:
    """The latent size ``recipe``'s first step runs at, before any scheduler is asked: the low-resolution size when the
    recipe starts below full size, else ``latent_hw`` (a pipeline that prepares its latent before it sets its timesteps,
    as SD3's, gets its starting latent at this size)."""
    lr = recipe.low_res
    if lr is None or lr.scale >= 1 or switch_step(recipe.steps, lr.until) == 0:
        return tuple(latent_hw)
    return low_res_size(tuple(latent_hw), lr.scale, model.downsample_factor)


def _full_steps(dc: DeepCache | None, n: int, stage_starts: Iterable[int]) -> set[int]:
    if dc is None or dc.interval == 1:
        return set(range(n))
    starts = sorted(set(stage_starts))
    if dc.schedule == "uniform":
        full = set()
        for k in range(n):
            start = max(s for s in starts if s <= k)
            if (k - start) % dc.interval == 0:
                full.add(k)
        return full
    return set(nonuniform_full_steps(n, math.ceil(n / dc.interval), dc.center, dc.power)) | set(starts)


def nonuniform_full_steps(total: int, n_full: int, center: float, power: float) -> list[int]:
    """DeepCache's non-uniform schedule (``sample_from_quad_center`` of its Stable Diffusion pipeline): ``n_full``
    full steps, dense around step ``c = round(center * total)`` and sparse away from it, at ``c + Re(u^power)``
    (truncated toward zero) for ``u`` evenly spaced from ``(-c)^(1/power)`` (complex) to ``(total - c)^(1/power)``,
    the two ends left out and step 0 always full. Like DeepCache, the power is lowered by 0.02 until the curve gives
    ``n_full`` distinct steps; where no power above 1 does, the plan is refused.

    The arithmetic is DeepCache's own, in numpy's complex powers, so the steps equal its function's on every
    (steps, interval) pair the tests try (``test_deepcache_nonuniform.py``): a step that lands on an integer is
    decided by the last bit of the platform's ``cpow``, in DeepCache's package as here."""
    import numpy as np  # lazy: the plan layer imports without numpy; only this schedule needs it

    c = round(center * total)
    p = power
    while p > 1:
        curve = np.linspace((-c) ** (1 / p), (total - c) ** (1 / p), n_full + 1) ** p
        picks = [int(v) + c for v in np.unique(np.real(curve).astype(np.int32))[1:-1]]
        if len(picks) + 1 == n_full:
            return [0, *picks]
        p -= 0.02
    raise PlanError(
        f"deepcache.schedule 'nonuniform' finds no {n_full} distinct full steps among {total} around step {c} "
        f"(center {center:g}) for any power from {power:g} down to 1 (DeepCache's rule); use a larger power, another center, "
        "a larger interval or the uniform schedule"
    )


def starting_at(plan: Plan, begin: int) -> Plan:
    """``plan`` for a run that starts at position ``begin`` of its scheduler's timesteps (img2img's ``strength``,
    SDXL's ``denoising_start``): the plan was compiled for the steps that run, and every step's ``schedule_index``
    now counts from the start of the whole schedule, where the scheduler restarts at a switch."""
    if begin == 0:
        return plan
    return replace(plan, steps=tuple(replace(s, schedule_index=s.scheduler_index + begin) for s in plan.steps))


def check_recipe_fits(recipe: Recipe, model: ModelSpec) -> None:
    """Every check of a recipe against the network it will run on, in one place: the DeepCache cut (a UNet's
    ``block``, a transformer's ``block`` or ``span``), the cross-attention the gate needs, and whether the non-uniform
    schedule finds its full steps. ``compile_plan`` runs it, and so does ``postdiff.apply``, so that a recipe the
    pipeline cannot run is refused when it is applied, not at every later call. RecipeError or PlanError."""
    dc = recipe.deepcache
    if dc is not None and dc.span is not None and not model.is_transformer:
        raise RecipeError(f"recipe.deepcache.span names transformer blocks, and {model.name} is a UNet; use deepcache.block")
    if dc is not None and model.is_transformer:
        block_span(model.num_layers, dc.block, dc.span)
    elif dc is not None and dc.block >= model.num_down_blocks:
        raise RecipeError(
            f"recipe.deepcache.block={dc.block} but {model.name} has {model.num_down_blocks} down blocks; use 0 to "
            f"{model.num_down_blocks - 1}"
        )
    if dc is not None and dc.interval > 1 and dc.schedule == "nonuniform":
        nonuniform_full_steps(recipe.steps, math.ceil(recipe.steps / dc.interval), dc.center, dc.power)
    if recipe.xattn_gate is not None and not model.has_cross_attention:
        why = (
            " (nor a CFG branch to drop: its guidance is embedded, as in FLUX.1-dev, and its text stream is not cached)"
            if model.guidance_embedded
            else ""
        )
        raise RecipeError(f"recipe.xattn_gate needs cross-attention, and {model.name} has none{why}; drop xattn_gate from the recipe")


def compile_plan(
    recipe: Recipe,
    *,
    timesteps: Sequence[float],
    latent_hw: tuple[int, int],
    model: ModelSpec,
    order: int = 1,
    scheduler: str = "",
    restart_repeat: int = 0,
) -> Plan:
    """Compile ``recipe`` for one scheduler (its ``timesteps`` after ``set_timesteps(recipe.steps)`` and its
    ``order``), one full-resolution latent size and one model. ``restart_repeat``: calls the scheduler repeats after
    it restarts at the resolution switch (PNDM starts over with its double first step: the call after the restart
    runs twice at one timestep, as its schedule's second call does)."""
    n = recipe.steps
    timesteps = [float(t) for t in timesteps]
    if len(timesteps) < n:
        raise PlanError(f"the scheduler gave {len(timesteps)} timesteps for {n} steps; expected at least one per step")
    if (len(timesteps) - 1) // order == n - 1:
        # one call per step, or `order` calls per step (Heun: 2, minus the last)
        def step_of(i: int) -> int:
            return i // order
    else:
        # schedulers with warm-up calls (PNDM's Runge-Kutta start): spread the calls evenly over the steps
        def step_of(i: int) -> int:
            return min(n - 1, i * n // len(timesteps))

    h, w = latent_hw
    if h < 1 or w < 1:
        raise RecipeError(f"latent size {h}x{w} is not positive; use a larger image")
    # Any full size the UNet runs (diffusers upsamples to the skip connections' sizes where a side is not a
    # multiple of the factor, and so does UNetSplit): the baseline and caching-only plans run where vanilla does.
    full_hw = (h, w)
    switch_k = switch_step(n, recipe.low_res.until) if recipe.low_res is not None and recipe.low_res.scale < 1 else 0
    low_hw = first_latent_hw(recipe, full_hw, model)
    check_recipe_fits(recipe, model)
    dc, gate = recipe.deepcache, recipe.xattn_gate

    # The UNet calls, in order: those of the inference steps before the switch at low resolution, then those from
    # step switch_k - shift on at full resolution (shift 0: every call once). A call's position among the plan's
    # inference steps (q) is its step k before the switch and k + shift after it: caching counts positions.
    shift = recipe.low_res.renoise_shift if switch_k > 0 else 0
    calls = [(i, step_of(i)) for i in range(len(timesteps))]
    sequence = [(i, k, k, low_hw) for i, k in calls if k < switch_k]
    sequence += [(i, k, k + shift, full_hw) for i, k in calls if k >= switch_k - shift]
    repeats: set[int] = set()  # positions in ``sequence`` that repeat the call before them
    first_full = next((p for p, entry in enumerate(sequence) if entry[3] == full_hw), None)
    if restart_repeat and first_full and first_full + 1 < len(sequence):
        sequence[first_full + 2 : first_full + 2] = [sequence[first_full + 1]] * restart_repeat
        repeats = set(range(first_full + 2, first_full + 2 + restart_repeat))
    stage_starts = [0] + ([switch_k] if 0 < switch_k < n else [])
    full = _full_steps(dc, n + shift, stage_starts)

    raw: list[dict[str, Any]] = []
    for p, (i, k, q, hw) in enumerate(sequence):
        raw.append(
            dict(
                index=p,
                inference_step=k,
                timestep=timesteps[i],
                latent_hw=hw,
                unet="full" if q in full else "shallow",
                guidance="cond" if gate is not None and k >= gate.after else "cfg",
                xattn="compute",
                events=("switch_resolution",) if p > 0 and hw != raw[p - 1]["latent_hw"] else ("repeat_step",) if p in repeats else (),
                schedule_index=None if i == p else i,
            )
        )
    # Cross-attention caching: keep the conditional outputs on the last CFG call before the gate (same size),
    # or on the first gated call at a new size; every later gated call reuses them. A capture needs a full pass.
    for i, s in enumerate(raw):
        nxt = raw[i + 1] if i + 1 < len(raw) else None
        if s["guidance"] == "cfg":
            if nxt is not None and nxt["guidance"] == "cond" and nxt["latent_hw"] == s["latent_hw"]:
                s["xattn"] = "capture"
        else:
            prev = raw[i - 1]
            have = prev["latent_hw"] == s["latent_hw"] and prev["xattn"] in ("capture", "cached")
            s["xattn"] = "cached" if have else "capture"
        if s["xattn"] == "capture":
            s["unet"] = "full"
    plan = Plan(
        recipe=recipe,
        latent_hw=full_hw,
        steps=tuple(Step(**s) for s in raw),
        scheduler=scheduler,
        order=order,
    )
    validate_plan(plan, model)
    return plan


def validate_plan(plan: Plan, model: ModelSpec | None = None) -> None:
    """Every rule a backend relies on; raises PlanError naming the first step that breaks one."""
    if not plan.steps:
        raise PlanError("plan has no steps")
    have_deep: set[tuple[int, int]] = set()
    have_xattn: set[tuple[int, int]] = set()
    prev_hw = None
    for i, s in enumerate(plan.steps):
        where = f"plan step {i}"
        if s.index != i:
            raise PlanError(f"{where}: index is {s.index}; steps must be numbered 0, 1, 2, ... in order")
        if i == 0 and s.scheduler_index != 0:
            raise PlanError(f"{where}: schedule_index is {s.scheduler_index}; a plan starts at the schedule's first timestep (0)")
        repeat = "repeat_step" in s.events
        if repeat and (i == 0 or s.scheduler_index != plan.steps[i - 1].scheduler_index):
            raise PlanError(f"{where}: a repeat_step runs at the previous step's point of the schedule ({s.scheduler_index} is not)")
        if i > 0 and not s.switches_resolution and not repeat and s.scheduler_index != plan.steps[i - 1].scheduler_index + 1:
            raise PlanError(
                f"{where}: schedule_index {s.scheduler_index} does not follow the previous step's "
                f"({plan.steps[i - 1].scheduler_index}); only a resolution switch may move to another point of the schedule"
            )
        if s.scheduler_index < 0:
            raise PlanError(f"{where}: schedule_index {s.scheduler_index} is negative")
        if s.unet not in UNET_KINDS:
            raise PlanError(f"{where}: unet must be one of {UNET_KINDS}, got {s.unet!r}")
        if s.guidance not in GUIDANCE_KINDS:
            raise PlanError(f"{where}: guidance must be one of {GUIDANCE_KINDS}, got {s.guidance!r}")
        if s.xattn not in XATTN_KINDS:
            raise PlanError(f"{where}: xattn must be one of {XATTN_KINDS}, got {s.xattn!r}")
        for e in s.events:
            if e not in EVENTS:
                raise PlanError(f"{where}: unknown event {e!r}; known events: {EVENTS}")
        if s.latent_hw[0] <= 0 or s.latent_hw[1] <= 0:
            raise PlanError(f"{where}: latent size {s.latent_hw} is not positive")
        low = tuple(s.latent_hw) != tuple(plan.latent_hw)
        if low and model is not None and (s.latent_hw[0] % model.downsample_factor or s.latent_hw[1] % model.downsample_factor):
            raise PlanError(
                f"{where}: latent size {s.latent_hw[0]}x{s.latent_hw[1]} is not a multiple of the UNet's "
                f"downsampling factor {model.downsample_factor}"
            )
        switched = prev_hw is not None and s.latent_hw != prev_hw
        if switched != s.switches_resolution:
            raise PlanError(
                f"{where}: the latent size changes from {prev_hw} to {s.latent_hw} without a 'switch_resolution' "
                f"event (or the event is set without a change)"
            )
        if switched:
            have_deep.clear()
            have_xattn.clear()
        if s.unet == "shallow" and s.latent_hw not in have_deep:
            raise PlanError(
                f"{where}: a shallow step with no DeepCache feature at {s.latent_hw[0]}x{s.latent_hw[1]}: a full "
                f"step must come first at this resolution"
            )
        if s.xattn != "compute" and model is not None and not model.has_cross_attention:
            raise PlanError(f"{where}: xattn={s.xattn!r} needs cross-attention, and {model.name} has none")
        if s.xattn == "capture" and s.unet != "full":
            raise PlanError(f"{where}: a cross-attention capture needs a full UNet pass")
        if s.xattn == "cached":
            if s.guidance != "cond":
                raise PlanError(f"{where}: cached cross-attention is only defined with guidance 'cond'")
            if s.latent_hw not in have_xattn:
                raise PlanError(
                    f"{where}: cached cross-attention at {s.latent_hw[0]}x{s.latent_hw[1]} but nothing was captured at this resolution"
                )
        if s.unet == "full":
            have_deep.add(s.latent_hw)
        if s.xattn == "capture":
            have_xattn.add(s.latent_hw)
        prev_hw = s.latent_hw
    if plan.steps[-1].latent_hw != plan.latent_hw:
        raise PlanError(f"the last step runs at {plan.steps[-1].latent_hw}, not at the plan's size {plan.latent_hw}")


def step_batch(guidance: str, images: int = 1, cfg: bool = True) -> int:
    """UNet batch of a step: two branches per image under CFG, one when CFG is dropped (or off)."""
    return 2 * images if cfg and guidance == "cfg" else images
