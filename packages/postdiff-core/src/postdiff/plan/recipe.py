"""Recipes: what a user writes to ask for an acceleration plan.

A recipe is small, model-independent data. ``compile_plan`` (plan.py) turns it into a per-step plan for one
scheduler and one image size. Every knob can be set from JSON; unknown keys are an error, never ignored.

    {"steps": 20,
     "low_res": {"scale": 0.5, "until": 0.5},
     "deepcache": {"interval": 2, "block": 0, "schedule": "uniform"},
     "xattn_gate": {"after": 10, "mode": "cond"}}
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postdiff.errors import RecipeError, brief
from postdiff.files import read_text

DEFAULT_STEPS = 20


@dataclass(frozen=True)
class LowRes:
    """Mixed-resolution denoising: the first ``until`` fraction of the steps runs at ``scale`` × the latent side.

    ``renoise_shift``: where the switch re-noises the upsampled x0. 0 (the paper's choice, the default): to the
    noise level of the next step. s > 0: to the level of s steps earlier in the schedule, so the full-resolution
    phase runs s more steps (those noise levels run once at each resolution: more noise to refine what the low
    resolution could not hold, as latent-upsampling work such as RALU matches the noise level to the resolution);
    s < 0: to the level -s steps later, skipping them (fewer UNet calls, less noise)."""

    scale: float = 0.5
    until: float = 0.5
    renoise_shift: int = 0


@dataclass(frozen=True)
class DeepCache:
    """DeepCache-style reuse of the deep UNet features.

    ``interval``: a full UNet pass every ``interval`` steps, shallow passes in between (1 = always full).
    ``block``: where the UNet is cut. The shallow pass runs down block ``block``'s first layer and every layer
    above it, and the mirrored up layers. In the official ``deepcache`` helper's terms (``DeepCacheSDHelper.
    set_params``) ``block = b`` is ``cache_branch_id = 3b + 1`` (checked bit for bit in the test suite), **not**
    ``cache_block_id = b``. A recipe may say ``"cache_branch_id": 3b + 1`` instead of ``"block"``; other branch ids
    (DeepCache's default 0, a shallower cut) are cuts PostDiff's UNet split does not offer, and are refused.
    On a transformer (PixArt) the cut is a **span** of blocks ``[start, end)`` (``"span": [4, 24]``): a full step
    keeps the residual the span adds (hidden state after block ``end - 1`` minus before block ``start``, Δ-DiT's
    Δ-cache); a shallow step runs the blocks outside the span and adds the kept residual. Without ``span``, ``block``
    b keeps the outer b + 1 blocks at each end (span ``[b + 1, layers - b - 1)``), the transformer's analogue of
    DeepCache's outermost cut.
    ``schedule``: ``uniform`` (every ``interval``-th step is full) or ``nonuniform`` (DeepCache's own
    non-uniform schedule, ``compiler.nonuniform_full_steps``: the same number of full steps, placed densely around
    ``center`` (a fraction of the steps) and sparsely away from it, on a power curve of exponent ``power``).
    """

    interval: int = 2
    block: int = 0
    schedule: str = "uniform"
    center: float = 0.3
    power: float = 1.4
    span: tuple[int, int] | None = None  # transformers only: the blocks [start, end) whose residual is cached


@dataclass(frozen=True)
class XAttnGate:
    """Cross-attention caching with classifier-free guidance gated off.

    The first ``after`` steps run normally with CFG; from step ``after`` on only the conditional branch runs,
    and its cross-attention outputs are the ones recorded on the last CFG step (the paper's "Cond" mode).
    """

    after: int = 10
    mode: str = "cond"


@dataclass(frozen=True)
class Recipe:
    steps: int = DEFAULT_STEPS
    low_res: LowRes | None = None
    deepcache: DeepCache | None = None
    xattn_gate: XAttnGate | None = None
    name: str | None = None

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        out["steps"] = self.steps
        for key in ("low_res", "deepcache", "xattn_gate"):
            value = getattr(self, key)
            if value is not None:
                out[key] = dataclasses.asdict(value)
                if out[key].get("span", 0) is None:  # recipes without a span read as they always did
                    del out[key]["span"]
                elif "span" in out[key]:
                    out[key]["span"] = list(out[key]["span"])
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "recipe") -> Recipe:
        return _parse_recipe(data, where)

    @classmethod
    def from_json(cls, text: str, *, where: str = "recipe") -> Recipe:
        return cls.from_dict(parse_json(text, where, RecipeError), where=where)

    def with_steps(self, steps: int) -> Recipe:
        """The same recipe for another number of steps (the gate step stays where the user put it)."""
        return _validated(dataclasses.replace(self, steps=steps), "recipe")

    def for_partial_run(self, steps: int) -> Recipe:
        """The recipe for a run that denoises only the last ``steps`` of its schedule (img2img's ``strength``, SDXL's
        ``denoising_start`` / ``denoising_end``): ``low_res.until`` is already a fraction of the steps that run, and the
        gate keeps CFG for the same fraction of them as of the whole schedule (at least one step; no gate when a
        single step runs)."""
        if steps == self.steps:
            return self
        gate = self.xattn_gate
        if gate is not None:
            after = min(max(1, round(gate.after * steps / self.steps)), steps - 1)
            gate = dataclasses.replace(gate, after=after) if after >= 1 else None
        return _validated(dataclasses.replace(self, steps=steps, xattn_gate=gate), "recipe")

    @property
    def cache_block(self) -> int:
        """The DeepCache cut a UNet split needs for this recipe (block 0 when DeepCache is off)."""
        return self.deepcache.block if self.deepcache else 0

    @property
    def cache_span(self) -> tuple[int, int] | None:
        """The transformer blocks a block-cache split caches, when the recipe names them (else derived from the block)."""
        return self.deepcache.span if self.deepcache else None

    @property
    def label(self) -> str:
        return self.name or "custom"


def display_name(spec: str, recipe: Recipe) -> str:
    """The name a plan is shown under in tables: the built-in name it was asked by, or a recipe file's own name."""
    return recipe.label if str(spec).endswith(".json") else str(spec)


def parse_json(text: str, where: str, error: type[Exception]):
    """json.loads with a one-line error that says where the JSON is broken."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); fix the file") from None


# -- parsing with messages that name the field ----------------------------------------------------------------------
_SECTIONS = {"low_res": LowRes, "deepcache": DeepCache, "xattn_gate": XAttnGate}
_TOP_KEYS = {"name", "steps", *_SECTIONS}


def _check_keys(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed keys are {', '.join(sorted(allowed))}")


def _number(value: Any, where: str, *, integer: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise RecipeError(f"{where} must be {kind}, got {brief(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where} must be a finite number, got {value}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise RecipeError(f"{where} must be an integer, got {brief(value)}")
        return int(value)
    return float(value)


def _parse_section(cls: type, data: Any, where: str):
    if data is None:
        return None
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be an object (or null to turn it off), got {brief(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(data, set(fields), where)
    values: dict[str, Any] = {}
    for name, value in data.items():
        default = fields[name].default
        if name == "span":
            values[name] = _span(value, f"{where}.span")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise RecipeError(f"{where}.{name} must be a string, got {brief(value)}")
            values[name] = value
        else:
            values[name] = _number(value, f"{where}.{name}", integer=isinstance(default, int))
    return cls(**values)


def _span(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RecipeError(f"{where} must be a list [start, end] of transformer block indices (end excluded), got {brief(value)}")
    a, b = (_number(v, f"{where}[{i}]", integer=True) for i, v in enumerate(value))
    if not 0 <= a < b:
        raise RecipeError(f"{where}=[{a}, {b}] is empty or negative; give 0 <= start < end (blocks start to end - 1 are cached)")
    return (a, b)


def _parse_recipe(data: Any, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f'{where} must be a JSON object like {{"steps": 20}}, got {type(data).__name__}')
    _check_keys(data, _TOP_KEYS, where)
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise RecipeError(f"{where}.name must be a string, got {brief(name)}")
    steps = _number(data.get("steps", DEFAULT_STEPS), f"{where}.steps", integer=True)
    sections = {key: _parse_section(cls, data.get(key), f"{where}.{key}") for key, cls in _SECTIONS.items() if key != "deepcache"}
    sections["deepcache"] = _parse_section(
        DeepCache, _branch_id_as_block(data.get("deepcache"), f"{where}.deepcache"), f"{where}.deepcache"
    )
    return _validated(Recipe(steps=steps, name=name, **sections), where)


def _branch_id_as_block(section: Any, where: str) -> Any:
    """A ``deepcache`` section written with the official helper's ``cache_branch_id``, as PostDiff's ``block``."""
    if not isinstance(section, dict) or "cache_branch_id" not in section:
        return section
    if "block" in section:
        raise RecipeError(f"{where}: give block or cache_branch_id, not both (block b is cache_branch_id 3b + 1)")
    section = dict(section)
    branch = _number(section.pop("cache_branch_id"), f"{where}.cache_branch_id", integer=True)
    if branch < 1 or (branch - 1) % 3:
        raise RecipeError(
            f"{where}.cache_branch_id={branch} is a cut PostDiff's UNet split does not offer: it offers branch ids 1, 4, 7, ... "
            f"(3b + 1 for block b; DeepCache's default 0 is a shallower cut). Use cache_branch_id 1 (block 0)"
        )
    section["block"] = (branch - 1) // 3
    return section


def _validated(r: Recipe, where: str) -> Recipe:
    """Checks that need no model. Model-dependent checks (latent sizes, cross-attention) live in compile_plan."""
    if r.steps <= 0:
        raise RecipeError(f"{where}.steps must be at least 1, got {r.steps}")
    if r.low_res is not None:
        lr = r.low_res
        if not 0 < lr.scale <= 1:
            raise RecipeError(f"{where}.low_res.scale must be in (0, 1] (a fraction of the latent side), got {lr.scale}")
        if not 0 <= lr.until <= 1:
            raise RecipeError(f"{where}.low_res.until must be in [0, 1] (a fraction of the steps), got {lr.until}")
        k = switch_step(r.steps, lr.until)
        if lr.scale < 1 and k >= r.steps:
            raise RecipeError(
                f"{where}.low_res.until={lr.until} leaves no step at full resolution with {r.steps} steps; "
                f"use a value below {1 - 0.5 / r.steps:.3g}"
            )
        if lr.renoise_shift and (lr.scale >= 1 or k == 0):
            raise RecipeError(f"{where}.low_res.renoise_shift={lr.renoise_shift} shifts the switch, and this recipe has none; set it to 0")
        if lr.renoise_shift and not k - r.steps + 1 <= lr.renoise_shift <= k:
            raise RecipeError(
                f"{where}.low_res.renoise_shift={lr.renoise_shift} is outside the schedule: the switch comes after step {k} "
                f"of {r.steps}, so the shift must be from {k - r.steps + 1} (the last step only) to {k} (back to the first)"
            )
    if r.deepcache is not None:
        dc = r.deepcache
        if dc.interval < 1:
            raise RecipeError(f"{where}.deepcache.interval must be at least 1 (1 = a full pass every step), got {dc.interval}")
        if dc.block < 0:
            raise RecipeError(f"{where}.deepcache.block must be 0 or more, got {dc.block}")
        if dc.schedule not in ("uniform", "nonuniform"):
            raise RecipeError(f"{where}.deepcache.schedule must be 'uniform' or 'nonuniform', got {dc.schedule!r}")
        if not 0 <= dc.center <= 1:
            raise RecipeError(f"{where}.deepcache.center must be in [0, 1] (a fraction of the steps), got {dc.center}")
        if dc.power <= 1:
            raise RecipeError(f"{where}.deepcache.power must be above 1, got {dc.power}")
    if r.xattn_gate is not None:
        g = r.xattn_gate
        if g.mode != "cond":
            raise RecipeError(
                f"{where}.xattn_gate.mode must be 'cond' (the conditional branch's cross-attention is cached); "
                f"got {g.mode!r}. The paper's 'cfg' mode collapses (FID 103.7) and 'ave' is T-GATE's, not offered"
            )
        if g.after < 1:
            raise RecipeError(f"{where}.xattn_gate.after must be at least 1 (steps that keep CFG), got {g.after}")
        if g.after >= r.steps:
            raise RecipeError(
                f"{where}.xattn_gate.after={g.after} is beyond the last step (steps={r.steps}): nothing would be "
                f"gated; use a value from 1 to {r.steps - 1}, or drop xattn_gate"
            )
    return r


def switch_step(steps: int, until: float) -> int:
    """The first (inference) step that runs at full resolution."""
    return int(round(until * steps))


# -- built-in plans ---------------------------------------------------------------------------------------------------
def _builtins() -> dict[str, Recipe]:
    lr, dc, gate = LowRes(), DeepCache(), XAttnGate()
    return {
        "baseline": Recipe(name="baseline"),
        "deepcache": Recipe(name="deepcache", deepcache=dc),
        "deepcache-nonuniform": Recipe(name="deepcache-nonuniform", deepcache=DeepCache(schedule="nonuniform")),
        "mixed-res": Recipe(name="mixed-res", low_res=lr),
        "xattn-gate": Recipe(name="xattn-gate", xattn_gate=gate),
        "postdiff": Recipe(name="postdiff", low_res=lr, deepcache=dc, xattn_gate=gate),
        # The paper uses beta = 3/4 for SDXL (and PixArt-alpha).
        "postdiff-xl": Recipe(name="postdiff-xl", low_res=LowRes(scale=0.75), deepcache=dc, xattn_gate=gate),
        # PixArt-α (a DiT): the paper's levers at its beta 3/4, CFG dropped and cross-attention cached for the last 5
        # steps. On arch:pixart-alpha at 1024 px this costs 0.603 of the baseline's MACs (-39.7%; the paper reports
        # -36.1%, and says nothing of caching transformer blocks). Block caching is opt-in: add
        # "deepcache": {"interval": 2, "span": [4, 24]} for 0.397 (docs/recipes.md).
        "postdiff-dit": Recipe(name="postdiff-dit", low_res=LowRes(scale=0.75), xattn_gate=XAttnGate(after=15)),
        # LCM runs 4 to 8 steps with guidance embedded (no CFG batch): the same levers at 4 steps, two of them at half
        # resolution, the gate (cross-attention caching only: there is no CFG to drop) from step 2. Not measured on a
        # trained LCM (none is reachable offline); a starting point to sweep, not a tuned plan.
        "postdiff-lcm": Recipe(name="postdiff-lcm", steps=4, low_res=lr, deepcache=dc, xattn_gate=XAttnGate(after=2)),
        # The flow-matching DiTs, SD3 (an MMDiT) and SANA (linear attention): beta 3/4 as for the other DiTs for the
        # first half, then CFG dropped with what stands for cross-attention cached for the second half (SD3: the text
        # stream's keys and values, postdiff.pytorch.mmdit; SANA: its attn2 outputs). At 1024 px: 0.492 of the
        # baseline's MACs on arch:sd3-medium, 0.496 on arch:sana-1600m. No trained SD3 or SANA is reachable offline:
        # starting points to sweep, not tuned plans (docs/recipes.md). Block caching is opt-in, as for PixArt.
        **{
            name: Recipe(name=name, low_res=LowRes(scale=0.75), xattn_gate=XAttnGate(after=10))
            for name in ("postdiff-sd3", "postdiff-sana")
        },
        # FLUX.1-dev (costs and plans only: arch:flux-dev): guidance-distilled, so no CFG to gate; beta 3/4 for the
        # first half and block caching of blocks 4-52 of its 57 every other step. 0.446 of the MACs at 1024 px.
        "postdiff-flux": Recipe(name="postdiff-flux", low_res=LowRes(scale=0.75), deepcache=DeepCache(interval=2, block=3)),
    }


BUILTIN_PLANS: dict[str, Recipe] = _builtins()
_STEPS_RE = re.compile(r"^steps:(\d+)$")


def builtin_names() -> list[str]:
    return [*BUILTIN_PLANS, "steps:N"]


def load_recipe(spec: str | Path | Recipe | dict) -> Recipe:
    """A built-in name (``baseline``, ``steps:8``, ``postdiff``, ...), a JSON file, a dict or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return Recipe.from_dict(spec)
    text = str(spec)
    if text in BUILTIN_PLANS:
        return BUILTIN_PLANS[text]
    m = _STEPS_RE.match(text)
    if m:
        steps = int(m.group(1))
        if steps <= 0:
            raise RecipeError(f"plan {text!r}: steps must be at least 1")
        return Recipe(name=text, steps=steps)
    path = Path(text).expanduser()
    if path.suffix == ".json" or path.exists():
        shown = brief(text)
        if path.is_dir():
            raise RecipeError(f"plan {shown} is a folder; give a recipe JSON file or one of: {', '.join(builtin_names())}")
        if not path.is_file():
            raise RecipeError(f"plan file {shown} does not exist; give a JSON file or one of: {', '.join(builtin_names())}")
        data = read_text(path, f"plan file {shown}", RecipeError, hint="a recipe is a JSON file")
        recipe = Recipe.from_json(data, where=f"plan file {path.name}")
        return recipe if recipe.name else dataclasses.replace(recipe, name=path.stem)
    raise RecipeError(f"unknown plan {brief(text)}; use one of: {', '.join(builtin_names())}, or a JSON file")
