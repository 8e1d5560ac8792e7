"""The benchmark scripts run end to end (on the toy model, in seconds) and write what they claim."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    """A script of benchmarks/ as a module (they import each other by file name, not as a package)."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_torch_cpu_benchmark_smoke(tmp_path, capsys):
    bench_torch_cpu = _benchmark("bench_torch_cpu")
    out = tmp_path / "bench.json"
    assert (
        bench_torch_cpu.main(
            ["--model", "toy-sd", "--sizes", "32", "--variant-runs", "1", "--plan-runs", "1", "--cpu-conv", "auto", "--out", str(out)]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["cpu_conv"] == "auto"
    entry = data["sizes"]["32"]
    variants = {(v["variant"], tuple(v["latent"]), v["batch"]) for v in entry["variants"]}
    assert ("full", (16, 16), 2) in variants and ("shallow_cached", (16, 16), 1) in variants
    assert entry["whole"]["baseline"]["median_s"] > 0 and entry["whole"]["postdiff"]["median_s"] > 0
    assert 0 < entry["macs_ratio"] < 0.5
    assert "| 32 |" in capsys.readouterr().out


def test_scheduler_benchmark_runs_the_cli_per_solver_and_writes_its_table(tmp_path, capsys):
    """bench_schedulers.py solvers on one solver and a tiny grid: one `postdiff sweep` per solver, its table per budget."""
    bench_schedulers = _benchmark("bench_schedulers")
    out = tmp_path / "solvers.json"
    grid = "--betas 1,0.5 --switches 0.5 --intervals 1,2 --gates 0"
    argv = [
        "solvers",
        "--solvers",
        "euler-a",
        "--samples",
        "4",
        "--calibration",
        "2",
        "--budgets",
        "0.4",
        "--grid",
        grid,
        "--out",
        str(out),
    ]
    assert bench_schedulers.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["samples"] == 4 and data["grid"] == grid and [r["solver"] for r in data["rows"]] == ["euler-a"]
    sweep = data["rows"][0]["sweep"]
    assert sweep["grid"]["betas"] == [1.0, 0.5] and [b["budget"] for b in sweep["rows"]] == [0.4]
    table = out.with_suffix(".txt").read_text()
    assert "| euler-a |" in table and "| 0.4 |" in table and "4 held-out samples" in table
    assert table.strip() in capsys.readouterr().out
    assert (tmp_path / "solvers" / "sweep_reference_euler-a.png").is_file()  # each sweep's own files, beside the results
    assert "%" in table  # the class accuracy beside each FID
    # --resume keeps a solver's finished sweep that ran with the same arguments: no sweep runs again
    kept = (tmp_path / "solvers" / "sweep_reference_euler-a.json").stat().st_mtime_ns
    assert bench_schedulers.main([*argv, "--resume"]) == 0
    assert (tmp_path / "solvers" / "sweep_reference_euler-a.json").stat().st_mtime_ns == kept
    assert "kept from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_schedulers.main(["check", "--model", "toy-sd"])  # no classifier: refused before any run


def test_scheduler_benchmark_matches_postdiff_to_the_most_steps_at_its_macs_and_resumes(tmp_path, capsys, monkeypatch):
    """matched: per solver, one eval of baseline, postdiff and the steps:N plan with the most steps at no more MACs
    (worked out from the cost model: steps:4 at 0.200 against postdiff's 0.210); --resume reads a finished eval back.
    The evals are stand-ins writing what ``postdiff eval --json`` writes (the slow test below runs them)."""
    bench_schedulers = _benchmark("bench_schedulers")
    calls = []
    # (MACs ratio, FID, class accuracy) per plan; any other plan (the steps:N one) gets the last
    scores, fewer = {"baseline": (1.0, 30.0, 0.99), "postdiff": (0.21, 20.0, 0.97)}, (0.2, 40.0, 0.98)
    keys = ("macs_ratio", "fid_classifier", "class_accuracy")

    def postdiff(*args):
        calls.append(args)
        plans = args[args.index("--plans") + 1].split(",")
        rows = [{"plan": n, "unet_calls": 20, **dict(zip(keys, scores.get(n, fewer)))} for n in plans]
        Path(args[args.index("--json") + 1]).write_text(json.dumps({"plans": rows}))

    monkeypatch.setattr(bench_schedulers, "postdiff", postdiff)
    out = tmp_path / "matched.json"
    argv = ["matched", "--solvers", "ddim,euler-a", "--samples", "3", "--out", str(out)]
    assert bench_schedulers.main(argv) == 0
    data = json.loads(out.read_text())
    assert [c[c.index("--scheduler") + 1] for c in calls] == ["ddim", "euler-a"]
    assert all(c[c.index("--plans") + 1] == "baseline,postdiff,steps:4" and c[c.index("--seed") + 1] == "1" for c in calls)
    assert [r["fewer"] for r in data["rows"]] == ["steps:4", "steps:4"]
    table = out.with_suffix(".txt").read_text()
    assert "| ddim | 30.00, 99.0% | (0.210): 20.00, 97.0% | steps:4 (0.200): 40.00, 98.0% | cheaper steps |" in table
    assert bench_schedulers.main([*argv, "--resume"]) == 0 and len(calls) == 2  # read back, not run again
    assert "kept from" in capsys.readouterr().err


@pytest.mark.slow
def test_scheduler_benchmark_holds_the_postdiff_plan_to_fewer_steps_at_its_macs(tmp_path, capsys):
    """bench_schedulers.py matched: `postdiff` against the steps:N plan with the most steps at no more MACs, per solver."""
    bench_schedulers = _benchmark("bench_schedulers")
    out = tmp_path / "matched.json"
    argv = ["matched", "--solvers", "ddim,euler-a", "--samples", "3", "--out", str(out)]
    assert bench_schedulers.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["seed"] == 1 and [r["scheduler"] for r in data["rows"]] == ["ddim", "euler-a"]
    assert {r["fewer"] for r in data["rows"]} == {"steps:4"}  # postdiff costs 0.210 of the MACs, steps:4 0.200, steps:5 0.250
    for row in data["rows"]:
        plans = row["plans"]
        assert set(plans) == {"baseline", "postdiff", "steps:4"}
        assert plans["steps:4"]["macs_ratio"] <= plans["postdiff"]["macs_ratio"] < 0.25
    table = out.with_suffix(".txt").read_text()
    assert "| ddim |" in table and "| euler-a |" in table and "N = 3 per plan, seed 1" in table
    assert table.strip() in capsys.readouterr().out
    eval_json = tmp_path / "matched" / "matched_reference_ddim.json"
    kept = eval_json.stat().st_mtime_ns
    assert bench_schedulers.main([*argv, "--resume"]) == 0  # the same arguments: read back, not run again
    assert eval_json.stat().st_mtime_ns == kept and "kept from" in capsys.readouterr().err


@pytest.mark.parametrize("model, flow", [("reference", False), ("reference-flow", True)])
def test_scheduler_benchmark_checks_the_solvers_of_the_models_objective(model, flow, tmp_path, monkeypatch):
    """check asks one eval per scheduler name the model's objective can run: the noise-prediction names on
    reference, the flow-matching names on reference-flow (the evals themselves are the slow test below)."""
    bench_schedulers = _benchmark("bench_schedulers")
    from postdiff.plan.schedulers import NAMES, is_flow_scheduler

    asked = []

    def evals(args, work, names, plans, prefix):
        asked.extend(names)
        plan = {"unet_calls": 20, "class_accuracy": 1.0, "fid_classifier": 1.0, "macs_ratio": 0.21}
        return [{"scheduler": n, "plans": {"baseline": plan, "postdiff": plan}} for n in names]

    monkeypatch.setattr(bench_schedulers, "evals", evals)
    out = tmp_path / "check.json"
    assert bench_schedulers.main(["check", "--model", model, "--samples", "2", "--out", str(out)]) == 0
    assert asked and all(is_flow_scheduler(n) == flow for n in asked) and "lcm" not in asked
    assert set(asked) == {n for n in NAMES if n != "lcm" and is_flow_scheduler(n) == flow}
    assert [r["scheduler"] for r in json.loads(out.read_text())["rows"]] == asked


@pytest.mark.slow
def test_scheduler_benchmark_on_the_flow_model_runs_the_flow_schedulers(tmp_path):
    """reference-flow has a classifier too: check runs every flow-matching name on it, and only those."""
    bench_schedulers = _benchmark("bench_schedulers")
    out = tmp_path / "check.json"
    assert bench_schedulers.main(["check", "--model", "reference-flow", "--samples", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["scheduler"] for r in rows] == ["flow-euler", "flow-heun", "flow-dpmpp-2m"]
    assert all(set(r["plans"]) == {"baseline", "postdiff"} for r in rows)
