"""Bundles exported once per test session (each export takes 0.5-2.5 minutes on 2 cores)."""

from __future__ import annotations

import pytest

from postdiff_onnx.export import export_onnx

BUNDLES = {
    # name: (model, plan, options)
    "reference": ("reference", "postdiff", {"static": True}),
    "sd": ("toy-sd", "postdiff", {}),
    "sdxl": ("toy-sdxl", "postdiff-xl", {}),
    "reference_fp16": ("reference", "deepcache", {"precision": "fp16"}),
}


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    made: dict[str, object] = {}

    def get(name: str):
        if name not in made:
            model, plan, opts = BUNDLES[name]
            made[name] = export_onnx(model, plan, tmp_path_factory.mktemp("bundles") / name, log=lambda m: None, **opts)
        return made[name]

    return get
