"""ONNX Runtime backend: a ``GraphRunner`` over a bundle's ``.onnx`` files, and ``load_bundle``.

Everything above "run this graph" (plan checks, caches, the sampling loop, prompt encoding) is
``postdiff.bundle_runtime``; this module only opens sessions and runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from postdiff.bundle import Graph, read_manifest
from postdiff.bundle_runtime import BundlePipeline

from .session import DEFAULT_PROVIDER, make_session, run


class OrtRunner:
    """One ONNX Runtime session per graph file, opened on first use and kept."""

    def __init__(self, folder: Path, *, provider: str = DEFAULT_PROVIDER, threads: int | None = None) -> None:
        self.folder, self.provider, self.threads = Path(folder), provider, threads
        self.sessions: dict[str, object] = {}

    def session(self, graph: Graph):
        if graph.file not in self.sessions:
            self.sessions[graph.file] = make_session(self.folder / graph.file, provider=self.provider, threads=self.threads)
        return self.sessions[graph.file]

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run(self.session(graph), feeds)


def load_bundle(
    folder: str | Path, *, provider: str = DEFAULT_PROVIDER, threads: int | None = None, static: bool = False, verify: bool = True
) -> BundlePipeline:
    """Open an ONNX bundle after checking its manifest and the checksum of every file."""
    folder, manifest = read_manifest(folder, "onnx", verify=verify)
    batches = sorted({g.batch for g in manifest.graphs if g.batch is not None})
    if static and not batches:
        from postdiff.errors import BundleError

        raise BundleError(f"{folder} has no static graphs; export it with --static, or run it without --static")
    runner = OrtRunner(folder, provider=provider, threads=threads)
    return BundlePipeline(folder, manifest, runner, static=static, static_batch=_images_per_call(batches))


def _images_per_call(batches: list[int]) -> int:
    """Static graphs are exported for N images per call: batch N (conditional-only steps) and 2N (CFG steps)."""
    return min(batches) if batches else 1
