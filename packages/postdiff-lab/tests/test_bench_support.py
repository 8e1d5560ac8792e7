"""What the benchmark stands on: per-call timing, peak memory, the backend table, the export cache key and the
plan grid of the search."""

import platform

import numpy as np
import pytest

from postdiff.bundle import backends
from postdiff.errors import PostDiffError
from postdiff.families.model import load_model
from postdiff.plan.recipe import Recipe, load_recipe
from postdiff_lab.export_cache import bundle_key, cache_root
from postdiff_lab.generation import source_for
from postdiff_lab.profiling import PeakMemory, StepTimes
from postdiff_lab.search import Grid, candidates


@pytest.fixture(scope="module")
def reference_source():
    return source_for(load_model("reference", need_pipeline=True))


def test_step_times_record_every_unet_call_by_variant_only_while_active(reference_source):
    recipe = load_recipe("postdiff").with_steps(12)
    plan = reference_source.compile(recipe)
    reference_source.generate(recipe, 2, 0)  # inactive: nothing to record into
    with StepTimes() as times:
        reference_source.generate(recipe, 2, 0)
    rows = times.summary()
    assert sum(r["calls"] for r in rows) == len(plan.steps)
    expected = {(s.variant, f"{s.latent_hw[0]}x{s.latent_hw[1]}", 4 if s.guidance == "cfg" else 2) for s in plan.steps}
    assert {(r["variant"], r["latent"], r["batch"]) for r in rows} == expected
    assert all(0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in rows)


def test_peak_memory_sees_an_allocation_made_inside():
    import gc
    import time

    gc.collect()  # nothing of earlier tests is freed while we measure
    with PeakMemory(interval=0.001) as mem:
        block = np.ones(128 << 20, dtype=np.uint8)  # 128 MiB, every page written
        time.sleep(0.05)
    assert mem.to_dict()["growth_mb"] >= 96
    del block


def test_backend_table_names_and_reasons():
    with pytest.raises(PostDiffError, match="unknown backend 'tpu'"):
        backends.get("tpu")
    assert backends.unavailable("torch") is None and backends.unavailable("onnx") is None
    reason = backends.unavailable("coreml")
    assert (reason is None) == (platform.system() == "Darwin")
    if reason:
        assert "macOS" in reason


def test_bundle_key_follows_content(monkeypatch, tmp_path):
    base = bundle_key("onnx", "reference", load_recipe("postdiff"), {"height": None})
    assert base == bundle_key("onnx", "reference", load_recipe("postdiff"), {"height": None})
    assert base != bundle_key("onnx", "reference", load_recipe("deepcache"), {"height": None})
    assert base != bundle_key("onnx", "reference", load_recipe("postdiff"), {"height": 64})
    assert base != bundle_key("coreml", "reference", load_recipe("postdiff"), {"height": None})
    # a local folder enters by its files: change a byte, get another key
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x00" * 10)
    first = bundle_key("onnx", str(folder), load_recipe("baseline"), {})
    (folder / "weights.bin").write_bytes(b"\x01" * 10)
    assert first != bundle_key("onnx", str(folder), load_recipe("baseline"), {})
    monkeypatch.setenv("POSTDIFF_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and cache_root(tmp_path / "x") == tmp_path / "x"


def test_search_grid_has_both_families_within_the_budget(reference_source):
    pool = candidates(reference_source, Grid(betas=(1.0, 0.5), switches=(0.5,), intervals=(1, 2), gates=(0, 10)), 20, 0.6)
    names = {c.name for c in pool}
    assert {"steps:12", "k2", "k2-m10", "b0.5@0.5-k2-m10"} <= names and "steps:13" not in names
    assert all(c.macs_ratio <= 0.6 for c in pool)
    fewer = {c.name: c.macs_ratio for c in pool if c.family == "fewer-steps"}
    assert fewer["steps:10"] == pytest.approx(0.5)
    with pytest.raises(PostDiffError, match="--intervals"):
        candidates(reference_source, Grid(intervals=(0,)), 20)
    assert isinstance(pool[0].recipe, Recipe)
