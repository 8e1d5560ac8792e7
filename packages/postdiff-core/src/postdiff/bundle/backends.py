"""Runtimes as plug-ins: the ``Backend`` protocol, and the registry that finds the installed ones.

``torch`` is the engine itself (``postdiff generate --backend torch``). Every other runtime is a package that
declares a ``Backend`` under the entry-point group ``postdiff.backends``:

    [project.entry-points."postdiff.backends"]
    onnx = "postdiff_onnx.backend:OnnxBackend"

and implements the steps only it knows: convert one graph (``convert``), finish a bundle (``finish``), open a
runner over a bundle's graphs (``open_runner``), add its command-line options (``add_options``), and say why it
cannot run here (``unavailable``). The engine does the rest once for every backend: option checks, staging,
progress, tokenizers and the manifest (``postdiff.bundle.export.export_bundle``), the input checks of every graph call
and the sampling loop (``postdiff.bundle.runtime``). The CLI, ``postdiff bench`` and ``postdiff export`` list
what ``available()`` finds, so a new runtime needs no edit outside its own package.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postdiff.errors import BundleError, PostDiffError, brief

if TYPE_CHECKING:  # pragma: no cover
    from postdiff.bundle.manifest import Graph, Manifest

ENTRY_POINTS = "postdiff.backends"
TORCH = "torch"  # the engine's own runtime: no bundle, no plug-in


class Backend:
    """The base of every runtime plug-in; a backend overrides what it does and keeps the defaults for the rest."""

    name = ""
    package = ""  # the pip package that provides it, for messages
    runs_on: str | None = None  # the platform.system() it needs to run a model (None: any)
    fixed_shapes = False  # True: its graphs take one batch size, chosen at export (``--batch``)
    runner_options: tuple[str, ...] = ()  # names (argparse dests) of the run options ``add_options`` adds
    bundle_format = ""  # the backend whose bundles it runs, when not its own (OpenVINO runs ONNX bundles)
    exports = True  # False: it runs another backend's bundles and has no export of its own
    # the exporter: its module, imported only to export, and the modules it needs (the package's ``[export]`` extra);
    # a runtime-only install runs bundles without them
    export_module = ""
    export_needs: tuple[str, ...] = ("torch", "diffusers", "transformers")

    def exporter(self):
        """The exporter module, after checking that the ``[export]`` extra is installed (one clear line if not)."""
        missing = [name for name in self.export_needs if importlib.util.find_spec(name) is None]
        if missing:
            raise BundleError(
                f"exporting to {self.name} needs {', '.join(missing)}, which this install lacks: "
                f"pip install '{self.package}[export]' (the runtime alone runs bundles)"
            )
        return importlib.import_module(self.export_module)

    # -- command line -----------------------------------------------------------------------------------------------
    def add_options(self, parser, command: str) -> None:
        """Add this backend's flags to ``command``'s parser: "export" (its own sub-command), "generate", "bench"."""

    def options(self, args, command: str) -> dict[str, Any]:
        """The keyword options of ``export_bundle`` (command "export") or ``open_runner`` ("generate", "bench")
        from parsed arguments."""
        return {}

    # -- export ------------------------------------------------------------------------------------------------------
    def check_export(self, **options) -> None:
        """Refuse bad export option values before anything is loaded (raise ``ExportError``)."""

    def convert(self, src, job, folder: Path, log: Callable[[str], None], **options) -> list[Graph]:
        """Write the graph(s) of one ``GraphSource`` into ``folder``; the ``Graph`` entries of the manifest."""
        raise NotImplementedError

    def finish(self, folder: Path, job, graphs: list[Graph], log: Callable[[str], None], **options) -> dict[str, Any]:
        """After every graph: packaging (Core ML merges its functions). Returns the manifest's ``precision`` (what
        the activations compute in), ``weights`` (how the weights are stored; default: the precision),
        ``quantization`` (optional) and the backend's ``tools`` entries (versions, settings)."""
        return {"precision": "fp32", "tools": {}}

    # -- running -----------------------------------------------------------------------------------------------------
    def check_open(self, **options) -> None:
        """Refuse bad runner options, or a machine that cannot run this backend, before the bundle is read."""

    def export_weights(self, weights: str) -> dict[str, Any]:
        """The export options that store the weights as ``weights`` (``--weights``: fp32, fp16, int8, int4), for
        ``postdiff bench``; a ``PostDiffError`` when this backend cannot store them so."""
        if weights != "fp32":
            raise PostDiffError(f"{self.name} bundles hold fp32 weights only (asked for {weights})")
        return {}

    def check_bundle(self, manifest: Manifest, **options) -> None:
        """Refuse, before any graph runs, a bundle this backend cannot run as asked (a weight type it has no kernels
        for): one line that names what it can run (raise ``BundleError``)."""

    def open_runner(self, folder: Path, manifest: Manifest, *, low_memory: bool = False, **options):
        """A ``GraphRunner`` over the bundle's graphs, and whether it runs the fixed-shape graphs: (runner, static).
        ``low_memory``: the generation runs under ``bundle_runtime.LeanRunner``; a runner may trade speed for memory
        too (ONNX Runtime gives its arenas up)."""
        raise NotImplementedError

    def unavailable(self) -> str | None:
        """Why this backend cannot run a model here, or None when it can."""
        system = platform.system()
        if self.runs_on and system != self.runs_on:
            where = {"Darwin": "macOS"}.get(self.runs_on, self.runs_on)
            return f"{self.name} runs models only on {where} (this is {system}); export works here (postdiff export {self.name}), prediction does not"
        return None


_FOUND: dict[str, Backend] | None = None


def available(*, refresh: bool = False) -> dict[str, Backend]:
    """The installed backends by name, from the ``postdiff.backends`` entry points (read once; ``refresh`` reads
    them again, for a plug-in installed in this process). A plug-in that fails to import is left out."""
    global _FOUND
    if _FOUND is None or refresh:
        from importlib.metadata import entry_points

        found: dict[str, Backend] = {}
        for ep in sorted(entry_points(group=ENTRY_POINTS), key=lambda e: e.name):
            try:
                obj = ep.load()
            except ImportError:
                continue
            backend = obj() if isinstance(obj, type) else obj
            found[backend.name or ep.name] = backend
        _FOUND = found
    return dict(_FOUND)


def names() -> list[str]:
    """Every runtime name: torch and the installed backends."""
    return [TORCH, *available()]


def get(name: str) -> Backend:
    """The installed backend ``name``, or an error that lists the installed ones and says how to add one."""
    found = available()
    if name in found:
        return found[name]
    hint = {"onnx": "packages/postdiff-onnx", "coreml": "packages/postdiff-coreml"}.get(name)
    install = f"; pip install -e {hint} (scripts/setup.sh does)" if hint else ""
    raise PostDiffError(f"unknown backend {brief(name)}; installed: {', '.join(names())}{install}")


def unavailable(name: str) -> str | None:
    """Why runtime ``name`` cannot run a model here (None: it can; torch always can)."""
    if name == TORCH:
        return None
    try:
        return get(name).unavailable()
    except PostDiffError as exc:
        return str(exc)


def lazy_package(package: str, exports: dict[str, str], backend: Callable[[], Backend]):
    """``(__getattr__, __dir__)`` for a backend package whose public names load on first use (``exports``: name ->
    submodule), so that importing it loads no PyTorch; a name from the backend's exporter module first checks the
    ``[export]`` extra (``Backend.exporter``), so a runtime-only install gets one clear line."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if f"{package}.{exports[name]}" == backend().export_module:
            backend().exporter()
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__() -> list[str]:
        return sorted({*vars(importlib.import_module(package)), *exports})

    return __getattr__, __dir__
