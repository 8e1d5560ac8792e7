"""The runtimes PostDiff can run a plan on, and whether each can run here.

``torch`` is the core itself. ``onnx`` and ``coreml`` are separate packages (``postdiff-onnx``,
``postdiff-coreml``) that export a bundle and load it; the core reaches them by module name so that it never
depends on them. One table, so the CLI, the benchmark and the error messages agree on names and reasons.
"""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass

from .errors import PostDiffError


@dataclass(frozen=True)
class Backend:
    name: str
    package: str = ""  # the pip package that provides it ("" for torch: the core)
    export: str = ""  # "module:function" that writes a bundle
    load: str = ""  # "module:function" that opens a bundle as a BundlePipeline
    runs_on: str = ""  # platform.system() it needs to run a model ("" = any)


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch"),
    "onnx": Backend("onnx", "postdiff-onnx", "postdiff_onnx.export:export_onnx", "postdiff_onnx.runtime:load_bundle"),
    "coreml": Backend("coreml", "postdiff-coreml", "postdiff_coreml.export:export_coreml", "postdiff_coreml.runtime:load_bundle", "Darwin"),
}


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise PostDiffError(f"unknown backend {name!r}; use one of: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def function(name: str, which: str):
    """The export or load function of backend ``name``, or an error that says how to install the package."""
    b = backend(name)
    module, func = getattr(b, which).split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ImportError:
        raise PostDiffError(f"the {name} backend is not installed; pip install -e packages/{b.package} (scripts/setup.sh does)") from None


def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run a model on this machine, or None when it can."""
    b = backend(name)
    if not b.load:
        return None
    try:
        function(name, "load")
    except PostDiffError as exc:
        return str(exc)
    system = platform.system()
    if b.runs_on and system != b.runs_on:
        return f"{name} runs models only on macOS (this is {system}); export works here (postdiff export {name}), prediction does not"
    return None
