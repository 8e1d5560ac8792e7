"""A third runtime defined only here, found through the ``postdiff.backends`` entry point like any installed one:
``postdiff export``, ``generate`` and ``bench`` pick it up with no edit to the engine or the CLI.

The backend stores each graph as a pickled PyTorch module and runs it with torch: a real runtime (its bundles
round-trip through files and the manifest), small enough to live in a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import strict_loads

from postdiff.bundle import backends
from postdiff.bundle.backends import Backend
from postdiff.bundle.manifest import Graph, TensorSpec
from postdiff_cli.main import main


class PickledRunner:
    def __init__(self, folder: Path) -> None:
        self.folder, self.modules = Path(folder), {}

    def load(self, graph: Graph) -> None:
        if graph.file not in self.modules:
            self.modules[graph.file] = torch.load(self.folder / graph.file, weights_only=False)

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.load(graph)
        with torch.no_grad():
            out = self.modules[graph.file](*(torch.from_numpy(np.asarray(feeds[t.name])) for t in graph.inputs))
        return {t.name: o.numpy() for t, o in zip(graph.outputs, out)}


class PickledBackend(Backend):
    """PyTorch modules pickled into the bundle (a test backend)"""

    name = "pickled"
    runner_options = ("pickled_threads",)

    def add_options(self, parser, command: str) -> None:
        if command == "generate":
            parser.add_argument("--pickled-threads", type=int, default=None, help="a runner option of the test backend")

    def convert(self, src, job, folder: Path, log, **options) -> list[Graph]:
        example = src.example(job.latent_hw, 1)
        with torch.no_grad():
            out = src.module(*example.values())
        torch.save(src.module, folder / f"{src.name}.pt")

        def dims(name, x):  # every dimension but the channels of an image-like tensor may vary with batch and size
            return ["batch", x.shape[1], "h", "w"] if x.ndim == 4 else ["batch", *(f"{name}_dim{i}" for i in range(1, x.ndim))]

        inputs = [TensorSpec(n, dims(n, x), str(x.dtype).removeprefix("torch.")) for n, x in example.items()]
        outputs = [TensorSpec(n, dims(n, o), "float32") for n, o in zip(src.output_names, out)]
        macs = {f"{h}x{w}": job.counter.macs(src.variant, (h, w), 1) for h, w in job.sizes} if src.variant else {}
        return [Graph(src.name, src.role, f"{src.name}.pt", inputs, outputs, variant=src.variant, exporter="torch.save", macs=macs)]

    def open_runner(self, folder: Path, manifest, **options):
        return PickledRunner(folder), False


@pytest.fixture
def pickled(tmp_path, monkeypatch):
    """Install the backend the way a package does: a distribution whose entry point names this module's class."""
    site = tmp_path / "site"
    dist = site / "postdiff_test_pickled-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: postdiff-test-pickled\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[postdiff.backends]\npickled = {__name__}:PickledBackend\n")
    monkeypatch.syspath_prepend(str(site))
    assert "pickled" in backends.available(refresh=True)
    yield tmp_path
    monkeypatch.undo()
    backends.available(refresh=True)


def test_a_backend_defined_in_a_test_exports_generates_and_is_benchmarked(pickled, capsys):
    bundle = pickled / "bundle"
    assert main(["export", "pickled", "--model", "reference", "--plan", "postdiff", "-o", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backend"] == "pickled" and manifest["model"]["kind"] == "class-conditional"
    assert {g["role"] for g in manifest["graphs"]} == {"class_encoder", "unet"}

    # generate: the same image as PyTorch, since the graphs are the same modules
    out_bundle, out_torch = pickled / "bundle.png", pickled / "torch.png"
    assert main(["generate", "--backend", "pickled", "--bundle", str(bundle), "--prompt", "3", "-o", str(out_bundle)]) == 0
    assert main(["generate", "--prompt", "3", "-o", str(out_torch)]) == 0
    from PIL import Image

    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (out_bundle, out_torch))
    assert np.abs(a - b).max() <= 1

    # its runner flag is refused without it, like every backend's
    capsys.readouterr()
    assert main(["generate", "--pickled-threads", "2", "-o", str(pickled / "x.png")]) == 2
    assert "--pickled-threads is for exported runtimes (pickled)" in capsys.readouterr().err

    # bench lists and runs it beside torch
    result = pickled / "bench.json"
    argv = ["bench", "--backends", "torch,pickled", "--runs", "1", "--warmup", "0", "--images", "2"]
    argv += ["--cache-dir", str(pickled / "cache"), "--json", str(result), "--grid", str(pickled / "bench.png")]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| pickled " in table
    rows = strict_loads(result.read_text())["results"]
    assert {(r["backend"], r["plan"]) for r in rows} == {(b, p) for b in ("torch", "pickled") for p in ("baseline", "postdiff")}
    # fidelity is against the PyTorch baseline: the pickled graphs give PyTorch's images, so the same numbers
    psnr = {(r["backend"], r["plan"]): r["psnr"] for r in rows}  # null: identical to the PyTorch baseline
    assert psnr[("pickled", "baseline")] is None or psnr[("pickled", "baseline")] > 40
    assert psnr[("pickled", "postdiff")] == pytest.approx(psnr[("torch", "postdiff")], abs=0.5)
