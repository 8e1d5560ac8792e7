"""Core ML bundles converted once per test session (coremltools converts on Linux; running needs macOS)."""

from __future__ import annotations

import pytest

from postdiff_coreml.export import export_coreml

BUNDLES = {
    "reference": ("reference", "postdiff", {}),
    "reference_single": ("reference", "baseline", {}),  # one function, the same weights: the size yardstick
    "sd": ("toy-sd", "postdiff", {}),
    "sdxl": ("toy-sdxl", "deepcache", {}),  # SDXL's low-res and gating paths are exercised by the ONNX tests
}


@pytest.fixture(scope="session")
def coreml_bundles(tmp_path_factory):
    made: dict[str, object] = {}

    def get(name: str):
        if name not in made:
            model, plan, opts = BUNDLES[name]
            made[name] = export_coreml(model, plan, tmp_path_factory.mktemp("coreml") / name, log=lambda m: None, **opts)
        return made[name]

    return get
