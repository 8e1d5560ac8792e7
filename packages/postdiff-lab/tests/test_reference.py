"""The embedded reference model, its data, its classifier and the evaluation built on them."""

from pathlib import Path

import numpy as np
import pytest

from postdiff import RecipeError
from postdiff_lab import data as fmnist
from postdiff_lab.reference.pipeline import ReferencePipeline, parse_label

HAVE_DATA = all((fmnist.DEFAULT_ROOT / f).is_file() for pair in fmnist.FILES.values() for f in pair)
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def pipe():
    return ReferencePipeline.load()


def test_shipped_weights_are_small_safetensors():
    weights = Path(__file__).resolve().parents[1] / "src/postdiff_lab/reference/weights"
    assert (weights / "model.safetensors").stat().st_size < 20e6
    assert (weights / "classifier.safetensors").is_file()


def test_generation_is_reproducible_and_batch_invariant(pipe):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same kernels for every batch size, so the images are bit-identical
    try:
        a = pipe.generate([0, 1, 2, 3], "postdiff", seed=3)
        b = pipe.generate([0, 1, 2, 3], "postdiff", seed=3, batch_size=3)
    finally:
        torch.set_num_threads(threads)
    c = pipe.generate([0, 1, 2, 3], "postdiff", seed=4)
    assert a.shape == (4, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(pipe.generate([0, 1, 2, 3], "postdiff", seed=3), pipe.generate([0, 1, 2, 3], "postdiff", seed=3))
    # with several threads oneDNN picks other convolution kernels for a batch of 1 than of 4, which round
    # differently in the last float bits: at most one grey level on a rare pixel (measured: 1 pixel of 4,096)
    many = pipe.generate([0, 1, 2, 3], "postdiff", seed=3, batch_size=3)
    diff = np.abs(many.astype(int) - pipe.generate([0, 1, 2, 3], "postdiff", seed=3).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001


def test_deepcache_interval_1_and_scale_1_are_the_baseline(pipe):
    base = pipe.generate([5, 7], "baseline", seed=1)
    assert np.array_equal(pipe.generate([5, 7], {"deepcache": {"interval": 1}}, seed=1), base)
    assert np.array_equal(pipe.generate([5, 7], {"low_res": {"scale": 1.0}}, seed=1), base)


def test_labels_and_class_names(pipe):
    assert parse_label("Sneaker") == 7 and parse_label("ankle boot") == 9 and parse_label("3") == 3
    with pytest.raises(RecipeError, match="unknown Fashion-MNIST class"):
        parse_label("spaceship")
    with pytest.raises(RecipeError, match="class indices"):
        pipe.generate([12], "baseline")


def test_missing_data_names_the_package(tmp_path):
    with pytest.raises(fmnist.DataError, match="apt-get install dataset-fashion-mnist"):
        fmnist.load("test", tmp_path)


@needs_data
def test_data_loads_with_checked_hashes():
    x, y = fmnist.load("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and set(np.unique(y)) == set(range(10))
    assert fmnist.to_model_space(x[:2]).shape == (2, 1, 32, 32)


@needs_data
def test_classifier_reaches_90_percent_on_the_test_set():
    from postdiff_lab.reference.classifier import classify

    x, y = fmnist.load("test")
    pred, probs, feats = classify(fmnist.pad32(x))
    assert (pred == y).mean() >= 0.90
    assert feats.shape == (10000, 128) and np.allclose(probs.sum(-1), 1, atol=1e-5)


@needs_data
def test_evaluate_reports_every_metric():
    from postdiff.families.model import load_model
    from postdiff_lab.evaluation import evaluate
    from postdiff_lab.generation import source_for

    result = evaluate(
        source_for(load_model("reference", need_pipeline=True)), ["steps:8", "postdiff"], 20, log=lambda m: None, progress=False
    )
    rows = {r["plan"]: r for r in result["plans"]}
    assert list(rows) == ["baseline", "steps:8", "postdiff"]
    assert rows["baseline"]["psnr"] == float("inf") and rows["baseline"]["lpips"] == pytest.approx(0, abs=1e-6)
    assert rows["steps:8"]["macs_ratio"] == pytest.approx(0.4)
    assert rows["postdiff"]["macs_ratio"] < 0.4
    for r in rows.values():
        assert 0 <= r["class_accuracy"] <= 1 and np.isfinite(r["fid_classifier"]) and r["seconds"] > 0
