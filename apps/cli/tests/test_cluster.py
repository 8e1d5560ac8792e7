"""Sweeps and plan searches on a real local Dask cluster on loopback give exactly the local numbers (issue 18)."""

import json

import pytest

from postdiff_cli.main import main

pytest.importorskip("dask.distributed", reason="the cluster test needs dask[distributed] (installed by scripts/setup.sh)")

GRID = ["--betas", "1,0.5", "--switches", "0.5", "--intervals", "1,2", "--gates", "0,10"]


def _need_fashion_mnist():
    from postdiff_lab import data

    if not (data.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def _result(path):
    data = json.loads(path.read_text())
    for volatile in ("measure_seconds", "command", "machine", "executor"):
        data.pop(volatile, None)
    return data


def test_a_sweep_on_a_dask_cluster_equals_the_local_sweep(tmp_path, capsys):
    """Two single-threaded Dask worker processes on 127.0.0.1; cells of 4 samples (calibration 6 and held-out 8 make
    uneven shards); one torch thread per cell on both sides."""
    _need_fashion_mnist()
    common = ["sweep", "--budgets", "0.3,0.6", "--calibration", "6", "--samples", "8", *GRID, "--shard", "4", "--cell-threads", "1"]
    local, cluster = tmp_path / "local.json", tmp_path / "dask.json"
    assert main([*common, "--json", str(local), "--plot", str(tmp_path / "l.png")]) == 0
    assert main([*common, "--executor", "dask", "--json", str(cluster), "--plot", str(tmp_path / "d.png")]) == 0
    assert "on the dask executor" in capsys.readouterr().err
    a, b = _result(local), _result(cluster)
    assert a == b  # same plans chosen, same numbers, to the last bit
    assert [r["winner"] for r in a["rows"]] and all(r["cheaper-steps"]["holdout"] > 0 for r in a["rows"])


@pytest.mark.slow
def test_plan_search_with_lpips_on_a_dask_cluster_equals_local(tmp_path, capsys):
    """LPIPS cells make their own baseline shard (a paired metric) on whichever worker runs them."""
    common = ["plan", "search", "--budget", "0.5", "--metric", "lpips", "--calibration", "3", "--holdout", "5", "--top", "2"]
    common += [*GRID, "--shard", "2", "--cell-threads", "1"]
    local, cluster = tmp_path / "local.json", tmp_path / "dask.json"
    assert main([*common, "-o", str(tmp_path / "a.json"), "--json", str(local)]) == 0
    assert main([*common, "--executor", "dask", "-o", str(tmp_path / "b.json"), "--json", str(cluster)]) == 0
    capsys.readouterr()
    assert _result(local) == _result(cluster)


def test_repeated_cells_are_computed_once():
    from postdiff.families.model import load_model
    from postdiff.plan.recipe import load_recipe
    from postdiff_lab.cluster import Executor, cells_for
    from postdiff_lab.generation import source_for

    source = source_for(load_model("reference", need_pipeline=True))
    cells = cells_for(source, load_recipe("postdiff"), 6, 0, "lpips", model_hash="h", shard=3)
    assert len(cells) == 2 and cells[0].key != cells[1].key
    assert cells_for(source, load_recipe("postdiff"), 6, 0, "lpips", model_hash="h", shard=3) == cells  # keyed by content
    ran = []

    class Counting(Executor):
        def _compute(self, todo, src):
            ran.extend(c.key for c in todo)
            return super()._compute(todo, src)

    ex = Counting()
    first = ex.run([*cells, cells[0]], source)
    again = ex.run(cells, source)
    assert ran == [c.key for c in cells] and first[0] is first[2] and again[0] is first[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--executor", "local", "--address", "tcp://127.0.0.1:1"], "give --executor dask or ray"),
        (["--executor", "dask", "--address", "tcp://127.0.0.1:1"], "cannot join the Dask scheduler"),
        (["--shard", "0"], "--shard must be at least 1"),
        (["--cell-threads", "0"], "--cell-threads must be at least 1"),
    ],
)
def test_executor_bad_input(args, fragment, capsys):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):  # a closed port: Dask retries until then
        assert main(["sweep", "--budgets", "0.5", "--calibration", "1", "--samples", "1", *GRID, *args]) == 2
    assert fragment in capsys.readouterr().err


def test_eval_on_a_dask_cluster_measures_the_same_samples_without_timings(tmp_path, capsys):
    common = ["eval", "--plans", "baseline,postdiff", "--samples", "6", "--shard", "4", "--cell-threads", "1", "--no-progress"]
    local, cluster = tmp_path / "local.json", tmp_path / "dask.json"
    assert main([*common, "--json", str(local), "--grid", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--executor", "dask", "--json", str(cluster), "--grid", str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    a, b = json.loads(local.read_text()), json.loads(cluster.read_text())
    assert all(r["seconds"] is None and r["speedup"] is None for r in b["plans"]) and "| -" in out
    assert any("not measured" in n for n in b["notes"])
    timing_free = ("seconds", "speedup")
    for ra, rb in zip(a["plans"], b["plans"]):
        assert {k: v for k, v in ra.items() if k not in timing_free} == {k: v for k, v in rb.items() if k not in timing_free}


def test_the_model_fingerprint_is_the_same_in_every_process():
    """Workers check their model against the driver's by this hash: diffusers' configuration bookkeeping
    (``_use_default_values``, a list in set order) must not make two processes disagree about the same model."""
    import os
    import subprocess
    import sys

    code = "from postdiff.families.model import load_model; from postdiff_lab.cluster import model_fingerprint; print(model_fingerprint(load_model('toy-sd', need_pipeline=True)))"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed}
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(seen) == 1, seen
