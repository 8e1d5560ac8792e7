"""The engine's boundaries: what importing it loads, what it depends on, and where model knowledge lives."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from postdiff.bundle.manifest import Manifest
from postdiff.errors import BundleError, ModelError, RecipeError
from postdiff.families.base import FAMILIES, image_seed
from postdiff.families.registry import family_named
from postdiff.loop.arrays import scheduler_from_config

ROOT = Path(__file__).resolve().parents[3]
ENGINE = ROOT / "packages/postdiff-core"


# peft (installed for the LoRA tests) is imported by diffusers.hooks whenever it is installed, and it imports
# transformers' modeling code, which imports scipy: third-party, not the engine. Hidden from the probe, so the
# probe measures what PostDiff's own imports load.
_HIDE_PEFT = "import sys\nsys.modules['peft'] = None  # importlib.util.find_spec('peft') is None: not installed\n"


def _loaded_after(code: str) -> set[str]:
    """Top-level modules in sys.modules after running ``code`` in a fresh interpreter (peft hidden, see above)."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{_HIDE_PEFT}{code}\nimport sys, json; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_engine_loads_no_evaluation_library_and_no_weights():
    # the plan layer and the manifest: pure data
    plan_half = _loaded_after(
        "import postdiff, postdiff.plan.recipe, postdiff.plan.compiler, postdiff.plan.cost, postdiff.plan.schedulers, "
        "postdiff.bundle.manifest, postdiff.bundle.backends"
    )
    assert not plan_half & {"torch", "diffusers", "numpy", "scipy", "skimage", "matplotlib", "PIL", "postdiff_lab"}
    # the runtime half: a bundle's sampling loop on numpy, without PyTorch, diffusers or transformers
    runtime_half = _loaded_after(
        "import postdiff.bundle.runtime, postdiff.loop.sampling, postdiff.loop.numpy_schedulers, postdiff.loop.torch_random, "
        "postdiff.loop.conditioning, postdiff.loop.resolution, postdiff.loop.denoiser, postdiff.loop.arrays, postdiff.families.registry"
    )
    assert not runtime_half & {"torch", "diffusers", "transformers", "scipy", "postdiff_lab"}
    # the torch half: torch and diffusers (which itself imports pillow), nothing of the lab
    torch_half = _loaded_after(
        "import postdiff.loop.sampling, postdiff.pytorch.unet, postdiff.bundle.export, postdiff.bundle.runtime, postdiff.pytorch.graphs, postdiff.families.model, "
        "postdiff.pytorch.diffusers_hook, postdiff.pytorch.macs"
    )
    assert not torch_half & {"scipy", "skimage", "matplotlib", "postdiff_lab"}


def test_engine_package_declares_no_evaluation_dependency_and_ships_no_weights():
    project = tomllib.loads((ENGINE / "pyproject.toml").read_text())
    deps = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["project"]["dependencies"]}
    assert not deps & {"scipy", "scikit-image", "pillow", "matplotlib", "safetensors"}
    # PyTorch and its libraries are an extra: the base install runs bundles
    assert not deps & {"torch", "diffusers", "transformers"}
    torch_extra = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["project"]["optional-dependencies"]["torch"]}
    assert {"torch", "diffusers", "transformers"} <= torch_extra
    assert "package-data" not in project.get("tool", {}).get("setuptools", {})
    assert not [p for p in (ENGINE / "src").rglob("*") if p.suffix in {".safetensors", ".pt", ".bin", ".onnx"}]


# behaviour that depends on a model's name or kind: a comparison with, or a prefix test for, a model name
_MODEL_NAMES = r"(reference|digits|sd|sdxl|toy-sd|toy-sdxl|unet|class-conditional|sd15|sd21)"
_NAME_CHECKS = re.compile(
    rf"""(==|!=)\s*["']{_MODEL_NAMES}["']|["']{_MODEL_NAMES}["']\s*(==|!=)|\.startswith\(\(?["'](toy|arch:|reference|digits)"""
)


def test_no_behaviour_depends_on_a_model_name_outside_the_family_registry():
    # the two registries: the families (what a kind of model does) and the lab's resolver (which names it offers)
    families = ENGINE / "src/postdiff/families"
    sources = [
        p
        for folder in ("packages", "apps", "benchmarks")
        for p in (ROOT / folder).rglob("*.py")
        if ("/src/" in p.as_posix() or folder == "benchmarks") and p.parent != families and p.name != "builtin_models.py"
    ]
    assert len(sources) > 40
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in sources
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if _NAME_CHECKS.search(line)
    ]
    assert hits == []


def test_every_model_kind_has_one_registered_family():
    assert list(FAMILIES) == ["class-conditional", "sdxl", "sd", "lcm", "pixart", "sana", "sd3", "unet"]
    assert family_named("reference") is FAMILIES["class-conditional"]  # the kind bundles written before families
    with pytest.raises(BundleError, match="unknown model family 'dit'"):
        family_named("dit")


def test_family_conditions_guidance_seeds_and_schedulers_are_one_rule_each():
    cls, sd = FAMILIES["class-conditional"], FAMILIES["sd"]
    info = {"num_classes": 10, "class_names": ["T-shirt/top", "Ankle boot"], "class_aliases": {"boot": 1}, "class_noun": "thing"}
    assert cls.parse_condition("ankle boot", info) == 1 and cls.parse_condition("t-shirt top", info) == 0
    assert cls.parse_condition("BOOT", info) == 1 and cls.parse_condition(7, info) == 7 and cls.parse_condition(None, {}) == 9
    with pytest.raises(RecipeError, match="unknown thing 'hat'; use 0-9 or one of: T-shirt/top, Ankle boot"):
        cls.parse_condition("hat", info)
    with pytest.raises(RecipeError, match="unknown thing '12'"):
        cls.parse_condition("12", info)
    assert (cls.guidance(None), sd.guidance(None), sd.guidance(0.0)) == (3.0, 7.5, 0.0)
    assert cls.default_conditions(12, {})[10:] == [0, 1] and sd.parse_condition(None, {}).startswith("a photograph")
    a, b = cls.generator(3, 5), sd.generator(3, 5)
    assert a.initial_seed() == b.initial_seed() == image_seed(3, 5) == 3 * 1_000_003 + 5
    with pytest.raises(ModelError, match="unknown scheduler 'NoSuchScheduler'"):
        scheduler_from_config("NoSuchScheduler", {})
    with pytest.raises(ModelError, match="unknown scheduler 'DiffusionPipeline'"):  # a diffusers class, not a scheduler
        scheduler_from_config("DiffusionPipeline", {})


def test_images_per_call_is_a_manifest_field_and_old_bundles_keep_theirs():
    base = {
        "backend": "onnx",
        "model": {},
        "recipe": {},
        "plan": {},
        "cache_block": 1,
        "latent_sizes": [],
        "precision": "fp32",
        "graphs": [],
    }
    assert Manifest.from_dict({**base, "images_per_call": 3}, "m").images_per_call == 3
    assert Manifest.from_dict({**base, "tools": {"images_per_call": "4"}}, "m").images_per_call == 4  # written before the field
    assert Manifest.from_dict(base, "m").images_per_call == 1
    with pytest.raises(BundleError, match="not a valid PostDiff manifest"):
        Manifest.from_dict({**base, "tools": {"images_per_call": "four"}}, "m")
