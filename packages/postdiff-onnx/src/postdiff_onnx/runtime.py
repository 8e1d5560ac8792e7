"""ONNX Runtime backend: a ``GraphRunner`` over a bundle's ``.onnx`` files, and ``load_bundle``.

Everything above "run this graph" (plan checks, caches, the sampling loop, prompt encoding) is
``postdiff.bundle_runtime``; this module only opens sessions and runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from postdiff.bundle import Graph
from postdiff.bundle_runtime import BundlePipeline
from postdiff.bundle_runtime import load_bundle as open_bundle

from .session import DEFAULT_PROVIDER, default_prepack, make_session, run
from .weights import SharedInitializers


class OrtRunner:
    """One ONNX Runtime session per graph file, opened on first use and kept.

    ``prepack``: True, each session re-lays out and pre-packs its own copy of the weights (faster kernels, more
    memory); False, every session keeps to the bundle's one copy; None (default), True for bundles with less than
    ``session.PREPACK_BELOW_BYTES`` of weights."""

    def __init__(self, folder: Path, *, provider: str = DEFAULT_PROVIDER, threads: int | None = None, prepack: bool | None = None) -> None:
        self.folder, self.provider, self.threads = Path(folder), provider, threads
        self.prepack = default_prepack(self.folder) if prepack is None else bool(prepack)
        self.sessions: dict[str, object] = {}
        self.shared = SharedInitializers(self.folder)  # one copy of the weights for all the sessions

    def session(self, graph: Graph):
        if graph.file not in self.sessions:
            path = self.folder / graph.file
            self.sessions[graph.file] = make_session(
                path, provider=self.provider, threads=self.threads, initializers=self.shared.for_graph(path), prepack=self.prepack
            )
        return self.sessions[graph.file]

    def load(self, graph: Graph) -> None:
        self.session(graph)

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run(self.session(graph), feeds)


def load_bundle(
    folder: str | Path,
    *,
    provider: str = DEFAULT_PROVIDER,
    threads: int | None = None,
    static: bool = False,
    prepack: bool | None = None,
    verify: bool = True,
) -> BundlePipeline:
    """Open an ONNX bundle after checking its manifest and the checksum of every file (``prepack``: see
    ``session.make_session``)."""
    from .backend import OnnxBackend

    return open_bundle(folder, OnnxBackend(), verify=verify, provider=provider, threads=threads, static=static, prepack=prepack)
