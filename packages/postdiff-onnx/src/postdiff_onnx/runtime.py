"""ONNX Runtime backend: a ``GraphRunner`` over a bundle's ``.onnx`` files, and ``load_bundle``.

Everything above "run this graph" (plan checks, caches, the sampling loop, prompt encoding) is
``postdiff.bundle_runtime``; this module only opens sessions and runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from postdiff.bundle import Graph, read_manifest
from postdiff.bundle_runtime import BundlePipeline
from postdiff.errors import BundleError

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

    def load(self, graph: Graph) -> None:
        self.session(graph)

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run(self.session(graph), feeds)


def load_bundle(
    folder: str | Path, *, provider: str = DEFAULT_PROVIDER, threads: int | None = None, static: bool = False, verify: bool = True
) -> BundlePipeline:
    """Open an ONNX bundle after checking its manifest and the checksum of every file."""
    folder, manifest = read_manifest(folder, "onnx", verify=verify)
    if static and not any(g.batch is not None for g in manifest.graphs):
        raise BundleError(f"{folder} has no static graphs; export it with --static, or run it without --static")
    runner = OrtRunner(folder, provider=provider, threads=threads)
    # static graphs take N images per call (batch 2N on CFG steps, N on conditional-only ones), N set at export
    images = int(manifest.tools.get("images_per_call", "1"))
    return BundlePipeline(folder, manifest, runner, static=static, static_batch=images)
