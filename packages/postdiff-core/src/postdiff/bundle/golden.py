"""Golden tensors: what an app runs its own implementation of a bundle against (``postdiff export ... --golden``).

At export, the bundle's plan is run once, for one seed and the family's default condition, through the bundle's
own manifest and sampling loop (``postdiff.bundle.runtime``) with each graph computed by the PyTorch module it
was exported from. The inputs and outputs of every graph on its first call, the final latent and the image are
saved in ``golden.npz``; the manifest's ``golden`` entry says what is where:

    graph/<graph name>/in/<input name>      inputs of the graph's first call
    graph/<graph name>/out/<output name>    its outputs (PyTorch's: the reference a converted graph approximates)
    final_latent                            the latent the loop ends with (before the VAE, or the image itself)
    image                                   the image, H x W x C floats in [0, 1]

An app feeds a graph's recorded inputs to its runtime and compares the outputs (PSNR, ``postdiff.bundle.export.tensor_psnr``;
35 dB is the export gate), then runs the whole plan for the seed and compares ``final_latent``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from postdiff.bundle.manifest import UNET, Graph, Manifest
from postdiff.bundle.runtime import BundlePipeline

GOLDEN_FILE = "golden.npz"


class SourceRunner:
    """A ``GraphRunner`` that computes each graph of a bundle with the PyTorch module it was exported from."""

    def __init__(self, sources: list) -> None:
        self.by_variant = {s.variant: s for s in sources if s.role == UNET}
        self.by_name = {s.name: s for s in sources if s.role != UNET}

    def load(self, graph: Graph) -> None:
        pass

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        src = self.by_variant[graph.variant] if graph.role == UNET else self.by_name[graph.name]
        with torch.no_grad():
            out = src.module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in src.input_names])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {name: t.detach().cpu().numpy() for name, t in zip(src.output_names, out)}


class FirstCalls:
    """Records the inputs and outputs of each graph's first call (by graph name)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.arrays: dict[str, np.ndarray] = {}
        self.graphs: dict[str, dict[str, list[str]]] = {}

    def load(self, graph: Graph) -> None:
        self.runner.load(graph)

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.run(graph, feeds)
        if graph.name not in self.graphs:
            self.graphs[graph.name] = {"inputs": sorted(feeds), "outputs": sorted(out)}
            for kind, named in (("in", feeds), ("out", out)):
                for name, value in named.items():
                    self.arrays[f"graph/{graph.name}/{kind}/{name}"] = np.asarray(value)
        return out


def write_golden(folder: Path, manifest: Manifest, sources: list, *, seed: int = 0) -> dict[str, Any]:
    """Run the bundle in ``folder`` (manifest not yet written) on the PyTorch ``sources`` and save ``GOLDEN_FILE``;
    returns the manifest's ``golden`` entry."""
    recorder = FirstCalls(SourceRunner(sources))
    static = not any(g.role == UNET and g.latent_hw is None for g in manifest.graphs)  # Core ML: fixed shapes only
    pipe = BundlePipeline(folder, manifest, recorder, static=static)
    condition = pipe.parse_condition(None)
    images = pipe.generate([condition] * (pipe.static_batch if pipe.static else 1), seed=seed)
    arrays = {**recorder.arrays, "final_latent": np.asarray(pipe.final_latents), "image": images[0]}
    np.savez(Path(folder) / GOLDEN_FILE, **arrays)
    return {
        "file": GOLDEN_FILE,
        "seed": seed,
        "condition": condition,
        "guidance": float(manifest.model.get("guidance", 1.0)),
        "graphs": recorder.graphs,
        "note": "inputs/outputs of each graph's first call computed by the PyTorch modules the graphs were exported from",
    }


def read_golden(folder: Path) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / GOLDEN_FILE) as data:
        return {k: data[k] for k in data.files}
