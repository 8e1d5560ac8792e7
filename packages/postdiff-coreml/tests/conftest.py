"""Core ML bundles converted once per test session (coremltools converts on Linux; running needs macOS)."""

from __future__ import annotations

import pytest

BUNDLES = {
    "reference": ("reference", "postdiff", {"golden": True}),
    "reference_single": ("reference", "baseline", {}),  # one function, the same weights: the size yardstick
    "sd": ("toy-sd", "postdiff", {}),
    "sdxl": ("toy-sdxl", "deepcache", {}),  # SDXL's low-res and gating paths are exercised by the ONNX tests
    "lcm": ("toy-lcm", "postdiff-lcm", {}),
    "pixart": ("toy-pixart", "postdiff-dit", {"height": 128, "width": 128}),
    "pixart-sigma": ("toy-pixart-sigma", "deepcache", {}),  # block caching: the shallow functions
}


@pytest.fixture(scope="session")
def coreml_bundles(export_once):
    """coreml_bundles(name) -> the folder of the bundle BUNDLES[name] (model, plan, options), exported once per session."""
    return lambda name: export_once("coreml", BUNDLES[name][0], BUNDLES[name][1], **BUNDLES[name][2])
