"""Recipes and compiled plans: parsing, validation, compilation rules, JSON both ways."""

import json

import pytest

from postdiff import PlanError, Recipe, RecipeError, compile_plan, load_recipe, validate_plan
from postdiff.plan.compiler import ModelSpec, Plan, nonuniform_full_steps
from postdiff.plan.recipe import BUILTIN_PLANS

SPEC = ModelSpec(name="sd-like", downsample_factor=8, num_down_blocks=4, has_cross_attention=True)
NO_XATTN = ModelSpec(name="no-xattn", downsample_factor=8, num_down_blocks=4, has_cross_attention=False)


def ddim_timesteps(n):
    return [999 - i * (1000 // n) for i in range(n)]


def heun_timesteps(n):
    t = [float(999 - i * (1000 / n)) for i in range(n)]
    return [t[0]] + [x for x in t[1:] for _ in range(2)]


def compile_(recipe, timesteps=None, hw=(64, 64), model=SPEC, order=1):
    recipe = load_recipe(recipe)
    return compile_plan(recipe, timesteps=timesteps or ddim_timesteps(recipe.steps), latent_hw=hw, model=model, order=order)


@pytest.mark.parametrize("name", [*BUILTIN_PLANS, "steps:8"])
def test_builtin_recipes_round_trip_through_json(name):
    recipe = load_recipe(name)
    assert Recipe.from_json(recipe.to_json()) == recipe
    plan = compile_(recipe)
    assert Plan.from_json(plan.to_json()) == plan


def test_baseline_is_all_full_cfg_at_full_size():
    plan = compile_("baseline")
    assert len(plan.steps) == 20
    assert {(s.unet, s.guidance, s.xattn, s.latent_hw, s.events) for s in plan.steps} == {("full", "cfg", "compute", (64, 64), ())}


def test_steps_n_plan():
    assert len(compile_("steps:8").steps) == 8


def test_deepcache_uniform_interval_2_alternates_and_interval_1_is_baseline():
    plan = compile_("deepcache")
    assert [s.unet for s in plan.steps[:4]] == ["full", "shallow", "full", "shallow"]
    one = compile_({"deepcache": {"interval": 1}})
    assert all(s.unet == "full" for s in one.steps)


def test_deepcache_nonuniform_keeps_the_number_of_full_steps():
    plan = compile_("deepcache-nonuniform")
    full = [s.inference_step for s in plan.steps if s.unet == "full"]
    assert len(full) == 10 and full[0] == 0
    # denser around the centre (30% of the steps) than at the end
    assert sum(1 for k in full if 3 <= k <= 9) > sum(1 for k in full if 13 <= k <= 19)
    assert nonuniform_full_steps(50, 10, 0.3, 1.4)[0] == 0


def test_mixed_res_switches_once_at_the_planned_step_and_restarts_deepcache():
    plan = compile_("postdiff")
    switches = [s.index for s in plan.steps if s.switches_resolution]
    assert switches == [10]
    assert {s.latent_hw for s in plan.steps[:10]} == {(32, 32)}
    assert {s.latent_hw for s in plan.steps[10:]} == {(64, 64)}
    assert plan.steps[10].unet == "full" and plan.steps[10].xattn == "capture"
    assert all(s.guidance == "cond" for s in plan.steps[10:])
    assert plan.steps[11].variant == "shallow_cached"


def test_gate_captures_on_the_last_cfg_step():
    plan = compile_("xattn-gate")
    assert [s.guidance for s in plan.steps[9:12]] == ["cfg", "cond", "cond"]
    assert plan.steps[9].xattn == "capture" and plan.steps[9].unet == "full"
    assert all(s.xattn == "cached" for s in plan.steps[10:])


def test_mixed_res_with_scale_1_is_baseline():
    assert compile_({"low_res": {"scale": 1.0, "until": 0.5}}).steps == compile_("baseline").steps


def test_heun_switch_lands_on_a_step_boundary():
    recipe = load_recipe({"steps": 6, "low_res": {"scale": 0.5, "until": 0.5}})
    plan = compile_(recipe, timesteps=heun_timesteps(6), order=2)
    assert len(plan.steps) == 11
    assert [s.index for s in plan.steps if s.switches_resolution] == [6]


@pytest.mark.parametrize(
    "recipe, fragment",
    [
        ({"stepz": 20}, "unknown key(s) 'stepz'"),
        ({"deepcache": {"intervall": 2}}, "recipe.deepcache: unknown key(s) 'intervall'"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"steps": -3}, "steps must be at least 1"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"low_res": {"scale": 0.0}}, "low_res.scale must be in (0, 1]"),
        ({"low_res": {"scale": 1.5}}, "low_res.scale must be in (0, 1]"),
        ({"low_res": {"until": -0.1}}, "low_res.until must be in [0, 1]"),
        ({"low_res": {"until": 1.2}}, "low_res.until must be in [0, 1]"),
        ({"low_res": {"until": 1.0}}, "leaves no step at full resolution"),
        ({"deepcache": {"interval": 0}}, "deepcache.interval must be at least 1"),
        ({"xattn_gate": {"after": 20}}, "beyond the last step"),
        ({"xattn_gate": {"after": 25}}, "beyond the last step"),
        ({"xattn_gate": {"mode": "ave"}}, "xattn_gate.mode must be 'cond'"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_recipes_are_refused_with_the_field_named(recipe, fragment):
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe) if isinstance(recipe, dict) else Recipe.from_dict(recipe)
    assert fragment in str(err.value)


def test_low_res_latent_is_the_nearest_size_the_unet_takes():
    """Per side, the multiple of the downsampling factor (8 here) nearest to scale x side, at least the factor."""
    low = {s.latent_hw for s in compile_({"low_res": {"scale": 0.3}}).steps} - {(64, 64)}
    assert low == {(16, 16)}  # 19.2 -> 16
    plan = compile_({"low_res": {"scale": 0.75}}, hw=(104, 152))
    assert plan.steps[0].latent_hw == (80, 112)  # 78 and 114 round to the nearest multiples of 8, ties up
    with pytest.raises(RecipeError, match="gives no lower resolution"):
        compile_({"low_res": {"scale": 0.95}})  # 60.8 -> 64: the full size
    # the full size need not be a multiple: the UNet upsamples to its skip connections there, as diffusers does
    assert compile_("baseline", hw=(60, 64)).latent_hw == (60, 64)
    assert {s.latent_hw for s in compile_("mixed-res", hw=(60, 68)).steps} == {(32, 32), (60, 68)}


def test_gating_needs_cross_attention():
    with pytest.raises(RecipeError, match="needs cross-attention"):
        compile_("xattn-gate", model=NO_XATTN)


def test_deepcache_block_must_exist():
    with pytest.raises(RecipeError, match="down blocks"):
        compile_({"deepcache": {"block": 4}})


def test_malformed_json_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": 20,, }')
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.json"))
    with pytest.raises(RecipeError, match="unknown plan"):
        load_recipe("warp-speed")


def test_recipe_file_is_loaded_and_named_after_the_file(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"steps": 12, "deepcache": {"interval": 3}}))
    r = load_recipe(str(f))
    assert r.name == "mine" and r.steps == 12 and r.deepcache.interval == 3


def test_hand_edited_plan_with_shallow_step_and_no_cache_is_refused():
    data = compile_("deepcache").to_dict()
    data["steps"][0]["unet"] = "shallow"
    with pytest.raises(PlanError, match="shallow step with no DeepCache feature at 64x64"):
        Plan.from_dict(data)
    data = compile_("mixed-res").to_dict()
    data["steps"][10]["events"] = []
    with pytest.raises(PlanError, match="switch_resolution"):
        Plan.from_dict(data)


def test_validate_plan_catches_cached_xattn_without_capture():
    plan = compile_("xattn-gate")
    data = plan.to_dict()
    data["steps"][9]["xattn"] = "compute"
    with pytest.raises(PlanError, match="nothing was captured"):
        Plan.from_dict(data)
    validate_plan(plan, SPEC)
