"""Bundles exported once per test session (each export takes 0.5-2.5 minutes on 2 cores)."""

from __future__ import annotations

import pytest

PIXART_CACHE = {
    "steps": 20,
    "low_res": {"scale": 0.75, "until": 0.5},
    "deepcache": {"interval": 2, "span": [1, 3]},
    "xattn_gate": {"after": 15},
}
BUNDLES = {
    # name: (model, plan, options)
    "reference": ("reference", "postdiff", {"static": True, "golden": True}),
    "sd": ("toy-sd", "postdiff", {}),
    "sdxl": ("toy-sdxl", "postdiff-xl", {}),
    "lcm": ("toy-lcm", "postdiff-lcm", {}),
    "pixart": ("toy-pixart", "postdiff-dit", {"height": 128, "width": 128}),
    # PixArt-Σ with block caching (the shallow variants), resolution unconditioned, at its 256 px default
    "pixart-sigma": ("toy-pixart-sigma", {"name": "dit-cache", **PIXART_CACHE}, {}),
    "reference_fp16": ("reference", "deepcache", {"weights": "fp16"}),
}


@pytest.fixture(scope="session")
def bundles(export_once):
    """bundles(name, **more_options) -> the folder of the bundle BUNDLES[name] (model, plan, options), exported once
    per session."""
    return lambda name, **more: export_once("onnx", BUNDLES[name][0], BUNDLES[name][1], **{**BUNDLES[name][2], **more})
