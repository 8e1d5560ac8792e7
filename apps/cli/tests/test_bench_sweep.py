"""postdiff bench, postdiff sweep and postdiff plan search, run as a user would (small sizes; timings are not
asserted here: they are what benchmarks/ records)."""

import json
import math
import platform

import pytest
from cli_helpers import strict_loads

from postdiff_cli.main import main

SMALL_GRID = ["--betas", "1,0.5", "--intervals", "1,2", "--gates", "0,10"]


def _need_fashion_mnist():
    from postdiff_lab import data

    if not (data.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def test_bench_reference_torch_and_onnx_then_cached_exports(tmp_path, capsys):
    cache, out, grid = tmp_path / "cache", tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--model", "reference", "--plans", "baseline,postdiff", "--backends", "torch,onnx,coreml", "--runs", "1"]
    args += ["--warmup", "0", "--images", "10", "--cache-dir", str(cache), "--json", str(out), "--grid", str(grid)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "| onnx    | fp32    | postdiff" in captured.out and "LPIPS" in captured.out and "| full_cached" in captured.out
    result = strict_loads(out.read_text())
    rows = {(r["backend"], r["plan"]): r for r in result["results"]}
    assert set(rows) == {(b, p) for b in ("torch", "onnx") for p in ("baseline", "postdiff")}
    assert rows[("torch", "baseline")]["psnr"] is None  # identical to the reference every row is paired with: infinite
    onnx_psnr = rows[("onnx", "baseline")]["psnr"]  # the same images through ONNX Runtime: 8-bit images can match exactly
    assert onnx_psnr is None or onnx_psnr > 40
    for backend in ("torch", "onnx"):
        r = rows[(backend, "postdiff")]
        assert 0 < r["lpips"] < 1 and r["macs_ratio"] < 0.25 and r["speedup"] > 0
        assert {c["variant"] for c in r["unet_calls"]} == {"full", "shallow", "full_capture", "shallow_cached", "full_cached"}
        assert sum(c["calls"] for c in r["unet_calls"]) == 20
        assert r["memory"]["peak_rss_mb"] > 0 and r["first_run_s"] > 0
        assert rows[(backend, "baseline")]["speedup"] == 1.0
    assert rows[("onnx", "postdiff")]["export_cached"] is False and rows[("onnx", "postdiff")]["export_s"] > 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    if platform.system() != "Darwin":
        assert [s["backend"] for s in result["skipped"]] == ["coreml"] and "macOS" in result["skipped"][0]["reason"]
        assert "skipped coreml" in captured.out

    # a second run finds both bundles in the cache: nothing is exported again
    assert main([*args[:6], "onnx", *args[7:]]) == 0
    assert "export:" not in capsys.readouterr().err
    again = strict_loads(out.read_text())["results"]
    assert all(r["export_cached"] and r["export_s"] == 0 for r in again)


def test_plan_search_recipe_runs_and_fits_the_budget(tmp_path, capsys):
    recipe, report = tmp_path / "best.json", tmp_path / "search.json"
    args = ["plan", "search", "--budget", "0.4", "--metric", "lpips", "--calibration", "3", "--holdout", "4", "--top", "3"]
    assert main([*args, *SMALL_GRID, "-o", str(recipe), "--json", str(report)]) == 0
    capsys.readouterr()
    data = strict_loads(report.read_text())
    assert data["candidates"] and all(c["macs_ratio"] <= 0.4 for c in data["candidates"])
    assert {c["family"] for c in data["candidates"]} == {"fewer-steps", "cheaper-steps"}
    assert len(data["agreement"]["compared"]) == 3 and data["agreement"]["chosen_holdout_rank"] >= 1
    assert main(["plan", "cost", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ratio"] <= 0.4
    png = tmp_path / "x.png"
    assert main(["generate", "--plan", str(recipe), "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_writes_pareto_plot_and_json(tmp_path, capsys):
    _need_fashion_mnist()
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["sweep", "--budgets", "0.3,0.6", "--calibration", "4", "--samples", "6", *SMALL_GRID, "--json", str(out), "--plot", str(plot)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "fewer steps" in text and "cheaper steps" in text and "%" in text  # class accuracy beside each FID
    data = strict_loads(out.read_text())
    assert data["metric"] == "fid" and [r["budget"] for r in data["rows"]] == [0.3, 0.6]
    for row in data["rows"]:
        for family in ("fewer-steps", "cheaper-steps"):
            assert row[family]["macs_ratio"] <= row["budget"] + 1e-9 and math.isfinite(row[family]["holdout"])
            assert 0.0 <= row[family]["holdout_accuracy"] <= 1.0  # the class accuracy of the same held-out samples
        assert row["winner"] in ("fewer-steps", "cheaper-steps")
    assert 0.0 <= data["baseline"]["holdout_accuracy"] <= 1.0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_a_sweep_with_a_scores_cache_measures_each_plan_once_across_runs(tmp_path, capsys, monkeypatch):
    """--scores-cache: every score is kept as it is measured, so a run cut short (or run again) measures only what it
    had not; the results are the same numbers."""
    _need_fashion_mnist()
    from postdiff_lab import cluster

    cache = tmp_path / "scores"
    args = ["sweep", "--budgets", "0.4", "--calibration", "4", "--samples", "6", "--betas", "1,0.5", "--intervals", "1,2",
            "--gates", "0", "--plot", str(tmp_path / "p.png"), "--scores-cache", str(cache)]  # fmt: skip
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    kept = sorted(cache.glob("*.json"))
    first = strict_loads((tmp_path / "a.json").read_text())
    assert len(kept) == len(first["candidates"]) + 1 + len({first["rows"][0][f]["name"] for f in ("fewer-steps", "cheaper-steps")})
    measured = []
    real = cluster.run_requests
    monkeypatch.setattr(cluster, "run_requests", lambda *a, **k: measured.append(a[3]) or real(*a, **k))
    kept[0].unlink()  # as if the first run had stopped before measuring this one
    assert main([*args, "--json", str(tmp_path / "b.json")]) == 0
    again = strict_loads((tmp_path / "b.json").read_text())
    assert len(measured) == 1  # only the missing score was measured again
    assert again["rows"] == first["rows"] and again["baseline"] == first["baseline"]
    capsys.readouterr()


def test_sweep_with_shifts_puts_the_papers_switch_beside(tmp_path, capsys):
    _need_fashion_mnist()
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    grid = ["--betas", "0.5", "--switches", "0.5", "--intervals", "2", "--gates", "0", "--shifts=-1,0,2"]
    assert main(["sweep", "--budgets", "0.5", "--calibration", "3", "--samples", "4", *grid, "--json", str(out), "--plot", str(plot)]) == 0
    assert "cheaper steps, paper's switch" in capsys.readouterr().out
    data = strict_loads(out.read_text())
    names = {c["name"] for c in data["candidates"] if c["family"] == "cheaper-steps"}
    assert names == {"b0.5@0.5r-1-k2", "b0.5@0.5-k2", "b0.5@0.5r+2-k2"}
    shifts = {c["name"]: c["recipe"]["low_res"]["renoise_shift"] for c in data["candidates"] if c["family"] == "cheaper-steps"}
    assert shifts == {"b0.5@0.5r-1-k2": -1, "b0.5@0.5-k2": 0, "b0.5@0.5r+2-k2": 2}
    paper = data["rows"][0]["cheaper-steps-paper-switch"]
    assert paper["name"] == "b0.5@0.5-k2" and math.isfinite(paper["holdout"])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["bench", "--backends", "torch,tensorrt"], "unknown backend 'tensorrt'"),
        (["bench", "--plans", "baseline,turbo"], "unknown plan 'turbo'"),
        (["bench", "--runs", "0"], "--runs must be at least 1"),
        (["bench", "--images", "0"], "--images must be at least 1"),
        (["plan", "search", "--budget", "0"], "in (0, 1]"),
        (["plan", "search", "--budget", "1.5"], "in (0, 1]"),
        (["plan", "search", "--budget", "nan"], "in (0, 1]"),
        (["plan", "search", "--budget", "0.4", "--calibration", "0"], "--calibration must be at least 1"),
        (["plan", "search", "--budget", "0.4", "--model", "toy-sd", "--metric", "fid"], "use --metric lpips"),
        (["plan", "search", "--budget", "0.01", "--calibration", "2", "--holdout", "0"], "no plan in the grid fits"),
        (["sweep", "--budgets", "0.3,2"], "in (0, 1]"),
        (["sweep", "--budgets", "0.3,x"], "--budgets takes comma-separated numbers"),
        (["sweep", "--samples", "0"], "must be at least 1"),
        (["sweep", "--intervals", "0,2"], "--intervals values must be at least 1"),
        (["sweep", "--shifts", "0,1.5"], "--shifts takes comma-separated integers"),
    ],
)
def test_bench_sweep_search_bad_input(args, fragment, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("postdiff: error:") and fragment in err
