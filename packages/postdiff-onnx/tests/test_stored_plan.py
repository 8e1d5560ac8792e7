"""The stored plan (``manifest.plan.steps``) is what a bundle runtime executes, as an app would."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from postdiff.errors import PlanError
from postdiff_onnx.runtime import load_bundle


@pytest.fixture
def editable(bundles, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(bundles("reference"), folder)
    return folder


def _edit_plan(folder, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["plan"]["steps"])
    path.write_text(json.dumps(manifest))


def test_editing_the_stored_plan_changes_the_output(editable):
    pipe = load_bundle(editable)
    plan = pipe.compile()
    assert pipe.plan_note is None and plan.to_dict() == pipe.manifest.plan  # the stored plan, as stored
    before = pipe.generate([7, 1], plan, seed=0)

    def cfg_off_after_step_1(steps):  # a valid edit: every step after the first two conditional-only
        for step in steps[2:]:
            step["guidance"] = "cond"

    _edit_plan(editable, cfg_off_after_step_1)
    after_pipe = load_bundle(editable)
    after = after_pipe.generate([7, 1], after_pipe.compile(), seed=0)
    assert np.abs(after - before).max() > 1e-3


def test_an_invalid_stored_plan_is_refused_before_any_graph_runs(editable):
    def shallow_first(steps):  # a shallow step needs the deep feature of an earlier full step
        steps[0]["unet"] = "shallow"

    _edit_plan(editable, shallow_first)
    pipe = load_bundle(editable)
    calls = []
    pipe.runner.inner.run = lambda *a, **k: calls.append(a)  # nothing may run
    with pytest.raises(PlanError, match="step 0"):
        pipe.generate([7], seed=0)
    assert calls == []


def test_asking_for_other_steps_recompiles_and_says_so(editable):
    pipe = load_bundle(editable)
    plan = pipe.compile(steps=16)
    assert len(plan.steps) == 16 and "steps differ from the bundle's" in pipe.plan_note
