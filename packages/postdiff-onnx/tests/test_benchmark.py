"""benchmarks/bench_onnx_cpu.py runs end to end on the reference bundle (seconds) and writes what it claims."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_onnx_cpu
    finally:
        sys.path.pop(0)
    return bench_onnx_cpu


def test_per_call_and_whole_runs(bench, bundles, tmp_path, capsys):
    out = tmp_path / "onnx.json"
    args = ["--model", "reference", "--bundle", str(bundles("reference")), "--out", str(out)]
    assert bench.main([*args, "--variant-runs", "1", "--rounds", "1", "--plan-runs", "2"]) == 0
    data = json.loads(out.read_text())
    graphs = {(g["graph"], tuple(g["latent"]), g["batch"]) for g in data["graphs"]}
    assert ("unet_full", (32, 32), 2) in graphs and ("unet_shallow_cached", (32, 32), 1) in graphs
    assert all(g["torch_median_s"] > 0 and g["onnx_median_s"] > 0 for g in data["graphs"])
    assert all(len(w["runs_s"]) == 2 for w in data["whole"].values())
    for backend in ("torch", "onnx"):
        assert data[f"{backend}_efficiency"] == pytest.approx(data[f"{backend}_speedup"] * data["macs_ratio"])
        assert data[f"{backend}_efficiency_fastest_runs"] > 0
        w = data["whole"]
        pairs = sorted(b / p for b, p in zip(w[f"{backend}/baseline"]["runs_s"], w[f"{backend}/postdiff"]["runs_s"]))
        assert data[f"{backend}_efficiency_paired"] == pytest.approx(sum(pairs) / 2 * data["macs_ratio"])
    assert "| paired runs |" in capsys.readouterr().out


def test_whole_runs_on_the_named_backends_only(bench, bundles, tmp_path, capsys):
    out = tmp_path / "onnx.json"
    args = ["--model", "reference", "--bundle", str(bundles("reference")), "--out", str(out), "--variant-runs", "1", "--rounds", "1"]
    assert bench.main([*args, "--graphs", "shallow", "--plan-runs", "1", "--plan-warmup", "0", "--backends", "onnx"]) == 0
    data = json.loads(out.read_text())
    assert sorted(data["whole"]) == ["onnx/baseline", "onnx/postdiff"] and "torch_efficiency" not in data
    with pytest.raises(SystemExit):
        bench.main([*args, "--backends", "tensorrt"])
    assert "--backends takes torch and/or onnx" in capsys.readouterr().err


def test_prepacked_sessions_are_timed_per_call_and_whole(bench, bundles, tmp_path, capsys):
    out = tmp_path / "onnx.json"
    args = ["--model", "reference", "--bundle", str(bundles("reference")), "--out", str(out), "--variant-runs", "1", "--rounds", "1"]
    assert bench.main([*args, "--graphs", "shallow", "--plan-runs", "1", "--plan-warmup", "0", "--backends", "onnx", "--prepack"]) == 0
    data = json.loads(out.read_text())
    assert data["graphs"] and all(len(g["onnx_prepack_runs_s"]) == 1 and g["onnx_prepack_median_s"] > 0 for g in data["graphs"])
    assert sorted(data["whole"]) == ["onnx-prepack/baseline", "onnx-prepack/postdiff", "onnx/baseline", "onnx/postdiff"]
    assert data["onnx-prepack_efficiency"] > 0 and "| ORT pre-packed s |" in capsys.readouterr().out


def test_only_the_named_graphs_and_no_whole_runs(bench, bundles, tmp_path, capsys):
    out = tmp_path / "onnx.json"
    args = ["--model", "reference", "--bundle", str(bundles("reference")), "--out", str(out), "--variant-runs", "1", "--rounds", "1"]
    assert bench.main([*args, "--graphs", "shallow", "--plan-runs", "0"]) == 0
    data = json.loads(out.read_text())
    assert [g["graph"] for g in data["graphs"]] == ["unet_shallow"]
    assert data["whole"] == {} and "onnx_efficiency" not in data
    assert "no whole runs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main([*args, "--graphs", "shallow,nope"])
    assert "nope not among this plan's variants" in capsys.readouterr().err
