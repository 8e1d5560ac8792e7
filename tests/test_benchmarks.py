"""The benchmark scripts run end to end (on the toy model, in seconds) and write what they claim."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torch_cpu_benchmark_smoke(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_torch_cpu
    finally:
        sys.path.pop(0)
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
