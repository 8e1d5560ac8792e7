"""OpenVINO running ONNX bundles: each graph and the whole image against ONNX Runtime (f32 by default), the
precision and device options, and the NPU's need for static graphs."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino runtime is not installed (pip install -e packages/postdiff-openvino)")

from postdiff_openvino import OpenVINORunner, load_bundle  # noqa: E402

from postdiff.bundle.manifest import read_manifest  # noqa: E402
from postdiff.errors import BundleError, PostDiffError  # noqa: E402
from postdiff_lab.metrics import psnr, tensor_psnr  # noqa: E402
from postdiff_onnx.runtime import OrtRunner  # noqa: E402
from postdiff_onnx.runtime import load_bundle as load_onnx  # noqa: E402


@pytest.fixture(scope="module")
def bundle(export_once):
    return export_once("onnx", "reference", "postdiff", static=True, golden=True)  # the ONNX tests' bundle, exported once


class BothRunners:
    """Runs every graph call of a generation in ONNX Runtime and OpenVINO on the same inputs; keeps the lowest PSNR
    per graph and hands ONNX Runtime's outputs on."""

    def __init__(self, folder):
        self.ov, self.ort = OpenVINORunner(folder), OrtRunner(folder)
        self.scores: dict[str, float] = {}

    def load(self, graph):
        self.ov.load(graph)
        self.ort.load(graph)

    def run(self, graph, feeds):
        a, b = self.ov.run(graph, feeds), self.ort.run(graph, feeds)
        score = min(tensor_psnr(a[n], b[n]) for n in graph.output_names)
        self.scores[graph.name] = min(score, self.scores.get(graph.name, float("inf")))
        return b


def test_every_graph_agrees_with_onnx_runtime_at_f32(bundle):
    """Each graph the postdiff plan runs (full, capture, shallow, cached, at both sizes; the class encoder), on the
    inputs a real generation feeds it."""
    from postdiff.bundle.runtime import BundlePipeline

    folder, manifest = read_manifest(bundle, "onnx")
    both = BothRunners(folder)
    BundlePipeline(folder, manifest, both).generate([3, 9], seed=2)
    assert len(both.scores) >= 5, both.scores
    assert min(both.scores.values()) >= 60.0, both.scores


def test_whole_image_agrees_with_onnx_runtime_and_bf16_is_opt_in(bundle):
    a = load_bundle(bundle).generate([3, 9], seed=2)
    b = load_onnx(bundle).generate([3, 9], seed=2)
    scores = [psnr(x, y) for x, y in zip(a, b)]
    assert min(scores) >= 60.0, scores
    c = load_bundle(bundle, precision="bf16").generate([3], seed=2)
    assert np.isfinite(c).all() and c.shape == a[:1].shape


def test_static_graphs_run_and_npu_needs_them(bundle):
    a = load_bundle(bundle, static=True).generate([3], seed=1)
    b = load_onnx(bundle, static=True).generate([3], seed=1)
    assert psnr(a[0], b[0]) >= 60.0
    with pytest.raises(BundleError, match="NPU compiles fixed shapes only.*--static"):
        load_bundle(bundle, device="NPU")
    with pytest.raises(BundleError, match="unknown OpenVINO device 'TPU'"):
        load_bundle(bundle, device="TPU")
    with pytest.raises(PostDiffError, match="unknown precision 'fp8'"):
        load_bundle(bundle, precision="fp8")


def test_command_line(bundle, tmp_path, capsys):
    from postdiff_cli.main import main as cli

    out = tmp_path / "boot.png"
    assert cli(["generate", "--backend", "openvino", "--bundle", str(bundle), "--prompt", "Ankle boot", "-o", str(out)]) == 0
    assert out.is_file() and "openvino" in capsys.readouterr().out
    assert cli(["generate", "--backend", "openvino", "--bundle", str(bundle), "--device", "NPU", "-o", str(tmp_path / "n.png")]) == 2
    assert "--static" in capsys.readouterr().err and not (tmp_path / "n.png").exists()
    # --static belongs to both ONNX backends; --provider to ONNX Runtime only
    assert cli(["generate", "--backend", "openvino", "--bundle", str(bundle), "--static", "-o", str(tmp_path / "s.png")]) == 0
    assert cli(["generate", "--backend", "openvino", "--bundle", str(bundle), "--provider", "CPUExecutionProvider"]) == 2
    assert "--provider is for exported runtimes (onnx)" in capsys.readouterr().err


def test_the_precision_that_ran_is_read_back_and_a_substitute_is_warned(bundle, tmp_path, capsys):
    """OpenVINO's CPU plugin runs f16 as bf16 (or f32) where the CPU has no f16 arithmetic, silently: PostDiff reads
    the precision back after compiling, reports it, and warns in one line when it is not the one asked for."""
    import warnings

    import openvino

    import postdiff.errors
    from postdiff.errors import PostDiffWarning
    from postdiff_cli.main import main as cli

    postdiff.errors._WARNED_ONCE.clear()  # warned once per process: start this test from none
    caps = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    expected = "f16" if "FP16" in caps else "bf16" if "BF16" in caps else "f32"
    for asked, ran in (("f32", "f32"), ("f16", expected)):
        pipe = load_bundle(bundle, precision=asked)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.generate([3], seed=2)
        assert pipe.runner.executed == {"device": "CPU", "precision": ran}
        said = [str(w.message) for w in caught if w.category is PostDiffWarning]
        assert said == ([] if ran == asked else [said[0]]) and (ran == asked or f"--precision {asked} runs as {ran}" in said[0])
    out = tmp_path / "f16.png"
    assert cli(["generate", "--backend", "openvino", "--bundle", str(bundle), "--precision", "f16", "-o", str(out)]) == 0
    assert f"(device CPU, precision {expected})" in capsys.readouterr().out
