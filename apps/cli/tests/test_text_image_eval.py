"""``postdiff eval``, ``sweep`` and ``plan search`` on a text-to-image model with the user's prompts, reference images
and CLIP model, offline: ``toy-sd`` (random weights), a tiny random CLIP and reference images made here. The numbers
mean nothing; the test holds the plumbing: strict JSON with every metric per plan, the prompts the images were made
from, one-line refusals of bad inputs before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import strict_loads
from PIL import Image

from postdiff_cli.main import main
from postdiff_lab.text_image import load_prompts

PROMPTS = ["a red apple", "a lighthouse at dusk", "two cats on a sofa"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from postdiff_lab.toy import save_toy_clip

    root = tmp_path_factory.mktemp("t2i")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    refs = root / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # different sizes and modes, as a real folder has
        size = (40 + 8 * i, 32 + 4 * i)
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert("RGB" if i % 2 else "L").save(refs / f"{i}.png")
    (refs / "notes.txt").write_text("not an image: skipped")
    save_toy_clip(root / "clip")
    return root


def test_eval_writes_every_metric_per_plan(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POSTDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "e.json"
    argv = ["eval", "--model", "toy-sd", "--plans", "baseline,postdiff", "--samples", "8", "--no-progress"]
    argv += ["--prompts", str(data / "prompts.txt"), "--reference-images", str(data / "refs"), "--clip", str(data / "clip")]
    assert main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = strict_loads(out.read_text())
    assert [r["plan"] for r in result["plans"]] == ["baseline", "postdiff"]
    for r in result["plans"]:
        for key in ("ssim", "lpips", "fid_inception", "kid_inception", "clip_score", "clip_score_ci95"):
            assert key in r and np.isfinite(r[key]), key
        assert 0 <= r["clip_score"] <= 100
    assert result["plans"][0]["psnr"] is None and np.isfinite(result["plans"][1]["psnr"])  # identical: infinite, null
    assert "FID (Inception)" in text and "CLIP score" in text
    notes = " ".join(result["notes"])
    assert "3 from" in notes and "6 images" in notes and "random weights" in notes
    assert "no distribution metrics" not in notes and "stand-in for CLIP score" not in notes
    # the features of the reference folder are kept: a second run reads them back
    assert len(list((tmp_path / "cache" / "reference-features").glob("*.npy"))) == 1
    assert main([*argv, "--json", str(out)]) == 0
    again = strict_loads(out.read_text())
    assert again["plans"][1]["fid_inception"] == result["plans"][1]["fid_inception"]


def test_the_images_are_made_from_the_prompts(data):
    from postdiff.families.model import load_model
    from postdiff_lab.generation import source_for

    source = source_for(load_model("toy-sd", need_pipeline=True), prompts=load_prompts(data / "prompts.txt"))
    assert source.conditions_of(4) == [*PROMPTS, PROMPTS[0]] and source.conditions_of(2, first=3) == [PROMPTS[0], PROMPTS[1]]
    batch = source.generate("baseline", 2, 0, first=1)
    assert batch.conditions == PROMPTS[1:3]
    # a cluster cell carries its shard's prompts and generates from them without the driver's source
    import torch

    from postdiff.plan.recipe import load_recipe
    from postdiff_lab.cluster import cells_for, model_fingerprint, run_cell

    threads = torch.get_num_threads()  # as this process computes (float reductions split by thread)
    cells = cells_for(source, load_recipe("baseline"), 4, 0, "images", model_hash=model_fingerprint(source.model), shard=2, threads=threads)
    assert [c.prompts for c in cells] == [tuple(PROMPTS[:2]), (PROMPTS[2], PROMPTS[0])]
    remote = run_cell(cells[1])["images"]  # as a worker runs it: its own model, the cell's prompts
    assert np.array_equal(remote, source.generate("baseline", 2, 0, first=2).images)


def test_sweep_and_search_take_the_same_metrics(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POSTDIFF_CACHE", str(tmp_path / "cache"))
    # the random CLIP scores every image 0 (its cosines are mostly negative): a score that differs between plans shows
    # that the search keeps the highest
    from postdiff_lab.text_image import CLIPScorer

    monkeypatch.setattr(CLIPScorer, "scores", lambda self, images, prompts: 100 * np.asarray(images).mean(axis=(1, 2, 3)))
    common = ["--model", "toy-sd", "--prompts", str(data / "prompts.txt"), "--calibration", "2", "--seed", "1"]
    grid = ["--betas", "1", "--switches", "0.5", "--intervals", "2", "--gates", "0"]
    out = tmp_path / "s.json"
    argv = ["plan", "search", *common, "--budget", "0.6", "--holdout", "0", "--metric", "clip", "--clip", str(data / "clip"), *grid]
    assert main([*argv, "-o", str(tmp_path / "r.json"), "--json", str(out)]) == 0
    result = strict_loads(out.read_text())
    assert result["metric"] == "clip" and result["reference_set"] is None
    scores = [c["calibration"] for c in result["candidates"]]
    assert scores and all(0 <= s <= 100 for s in scores)
    assert len(set(scores)) > 1 and result["chosen"]["calibration"] == max(scores)  # CLIP score: higher is better
    argv = ["sweep", *common, "--budgets", "0.6", "--samples", "2", "--reference-images", str(data / "refs"), *grid]
    assert main([*argv, "--json", str(out), "--plot", str(tmp_path / "s.png")]) == 0
    result = strict_loads(out.read_text())
    assert result["metric"] == "fid" and result["reference_set"].startswith("Inception features of the 6 images")
    capsys.readouterr()


@pytest.mark.parametrize(
    "make, flag, words",
    [
        (lambda d: d / "missing.txt", "--prompts", "no such file"),
        (lambda d: (d / "empty.txt").write_text("\n  \n") and d / "empty.txt", "--prompts", "holds no prompts"),
        (lambda d: (d / "p.csv").write_text("id,url\n1,x\n") and d / "p.csv", "--prompts", "no column named caption"),
        (
            lambda d: (d / "p.jsonl").write_text('{"caption": "a"}\n{"id": 2}\n') and d / "p.jsonl",
            "--prompts",
            "line 2 has no string field",
        ),
        (lambda d: (d / "p.json").write_text("[]") and d / "p.json", "--prompts", "use a .txt"),
        (lambda d: d, "--reference-images", "0 images"),
        (lambda d: d / "nowhere", "--reference-images", "no such folder"),
        (lambda d: d, "--clip", "not a CLIP model folder"),
    ],
)
def test_bad_text_image_inputs_are_one_line_before_work(make, flag, words, tmp_path, capsys):
    arg = make(tmp_path)
    assert main(["eval", "--model", "toy-sd", "--samples", "4", flag, str(arg), "--json", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("postdiff: error:") and words in err and "\n" not in err, err
    assert not (tmp_path / "e.json").exists()


def test_one_reference_image_and_a_non_clip_folder_are_refused(data, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "a.png")
    assert main(["eval", "--model", "toy-sd", "--reference-images", str(one)]) == 2
    assert "1 image " in capsys.readouterr().err
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["eval", "--model", "toy-sd", "--clip", str(other)]) == 2
    assert "describes a 'bert' model, not a CLIP model" in capsys.readouterr().err
    assert main(["eval", "--model", "reference", "--prompts", str(data / "prompts.txt")]) == 2
    assert "--prompts is for text-to-image models" in capsys.readouterr().err


def test_prompt_files_of_each_kind(tmp_path):
    (tmp_path / "a.csv").write_text('image_id,Caption\n1,"a cat, sitting"\n2,\n3,a dog\n')
    (tmp_path / "a.jsonl").write_text('{"image_id": 1, "caption": "a cat"}\n\n{"prompt": "a dog"}\n')
    (tmp_path / "a.txt").write_bytes("\ufeffcafé au lait\r\n\r\na dog\r\n".encode())
    assert load_prompts(tmp_path / "a.csv") == ["a cat, sitting", "a dog"]
    assert load_prompts(tmp_path / "a.jsonl") == ["a cat", "a dog"]
    assert load_prompts(tmp_path / "a.txt") == ["café au lait", "a dog"]
