"""ONNX Runtime backend: a ``GraphRunner`` over a bundle's ``.onnx`` files, and ``load_bundle``.

Everything above "run this graph" (plan checks, caches, the sampling loop, prompt encoding) is
``postdiff.bundle.runtime``; this module only opens sessions and runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from postdiff.bundle.manifest import Graph
from postdiff.bundle.runtime import BundlePipeline, report_executed
from postdiff.bundle.runtime import load_bundle as open_bundle

from .session import DEFAULT_PROVIDER, default_prepack, make_session, run
from .weights import SharedInitializers


class OrtRunner:
    """One ONNX Runtime session per graph file, opened on first use and kept until ``release``.

    ``prepack``: True, each session re-lays out and pre-packs its own copy of the weights (faster kernels, more
    memory); False, every session keeps to the bundle's one copy; None (default), per graph
    (``session.default_prepack``): True for bundles with less than ``session.PREPACK_BELOW_BYTES`` of weights and
    for int4 graphs (``MatMulNBits`` is slow unpacked), False for the others, the fp32 VAE decoder of an int4
    bundle among them.

    Without pre-packing, the sessions of one phase (encoders, UNet, VAE: ``bundle_runtime.PHASES``) share one
    mapping of the weights file (``SharedInitializers``), dropped when the last of them is released. A pre-packing
    session instead reads its weights itself, so that ONNX Runtime can free each original once it is packed and the
    process holds the packed copy only.

    ``arena``: ONNX Runtime's CPU memory arena, which keeps each session's largest working set allocated between
    calls. Without it (``--low-memory``) memory goes back to the system after every call: measured on the SD1.5
    int8 UNet at 32x32, batch 1: 96 MB of activations held instead of 226 MB, calls about 10% slower."""

    def __init__(
        self,
        folder: Path,
        *,
        provider: str = DEFAULT_PROVIDER,
        threads: int | None = None,
        prepack: bool | None = None,
        arena: bool = True,
    ) -> None:
        self.folder, self.provider, self.threads, self.arena = Path(folder), provider, threads, arena
        self.prepack = None if prepack is None else bool(prepack)
        self.small = default_prepack(self.folder)  # under PREPACK_BELOW_BYTES: every graph pre-packs
        self.sessions: dict[str, object] = {}
        self.phase_of: dict[str, int] = {}
        self.shared: dict[int, SharedInitializers] = {}  # one copy of the weights for the sessions of a phase
        self.executed: dict[str, str] = {"provider": provider}  # what ONNX Runtime actually runs (read back)

    def session(self, graph: Graph):
        if graph.file not in self.sessions:
            from postdiff.bundle.runtime import PHASES

            path = self.folder / graph.file
            phase = self.phase_of[graph.file] = PHASES.get(graph.role, PHASES["unet"])
            prepack = self.prepacks(graph)
            shared = {} if prepack else self.shared.setdefault(phase, SharedInitializers(self.folder)).for_graph(path)
            session = self.sessions[graph.file] = make_session(
                path, provider=self.provider, threads=self.threads, initializers=shared, prepack=prepack, arena=self.arena
            )
            # a provider that cannot start (a CUDA library missing) leaves ONNX Runtime on the CPU, with a log line only
            ran = session.get_providers()[0]
            report_executed(self.executed, "provider", self.provider, ran, " (ONNX Runtime fell back to it)")
        return self.sessions[graph.file]

    def prepacks(self, graph: Graph) -> bool:
        """Whether the session of ``graph`` pre-packs its weights."""
        return self.prepack if self.prepack is not None else default_prepack(self.folder, graph.weights or "fp32", small=self.small)

    def load(self, graph: Graph) -> None:
        self.session(graph)

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run(self.session(graph), feeds)

    def release(self, graph: Graph) -> None:
        """Close the graph's session; the phase's mapping of the weights goes with the last session that used it."""
        if self.sessions.pop(graph.file, None) is None:
            return
        phase = self.phase_of.pop(graph.file)
        if phase not in self.phase_of.values():
            self.shared.pop(phase, None)


def load_bundle(
    folder: str | Path,
    *,
    provider: str = DEFAULT_PROVIDER,
    threads: int | None = None,
    static: bool = False,
    prepack: bool | None = None,
    verify: bool = True,
    low_memory: bool = False,
) -> BundlePipeline:
    """Open an ONNX bundle after checking its manifest and the checksum of every file (``prepack``: see
    ``session.make_session``; ``low_memory``: ``postdiff.bundle.runtime.LeanRunner``)."""
    from .backend import OnnxBackend

    return open_bundle(
        folder, OnnxBackend(), verify=verify, low_memory=low_memory, provider=provider, threads=threads, static=static, prepack=prepack
    )
