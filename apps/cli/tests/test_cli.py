"""The postdiff command, run as a user would (in-process for speed, and once as a subprocess)."""

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import strict_loads

from postdiff_cli.main import main


def test_plan_cost_sd15_reports_at_least_60_percent_and_json_agrees(capsys):
    args = ["plan", "cost", "postdiff", "--model", "arch:sd15", "--height", "512", "--width", "512", "--steps", "20"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reduction"] >= 0.60
    assert f"({data['reduction']:.1%} fewer MACs" in text
    assert data["total_macs"] == sum(s["macs"] for s in data["steps"])
    assert len(data["steps"]) == 20 and data["height"] == 512


def test_plan_show_json_is_a_compiled_plan(capsys):
    assert main(["plan", "show", "mixed-res", "--model", "arch:sdxl", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "postdiff.plan/1" and data["latent_hw"] == [128, 128]
    assert [s["index"] for s in data["steps"] if "switch_resolution" in s["events"]] == [10]


def test_plan_show_on_a_transformer_lists_patches_and_blocks(capsys, tmp_path):
    path = tmp_path / "dit.json"
    path.write_text('{"steps": 8, "low_res": {"scale": 0.75, "until": 0.5}, "deepcache": {"interval": 2, "span": [1, 3]}}')
    assert main(["plan", "show", str(path), "--model", "toy-pixart-sigma"]) == 0
    out = capsys.readouterr().out
    assert "8 transformer calls" in out and "| patches" in out and "| blocks run" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert "12x12=144" in rows[0] and "0-3" in rows[0] and "full" in rows[0]  # 24x24 latent at beta 3/4, patch 2
    assert "0,3 (+kept 1-2)" in rows[1] and "shallow" in rows[1]
    assert "16x16=256" in rows[-1]


def test_generate_writes_a_png(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", "toy-sd", "--plan", "postdiff", "--steps", "12", "--prompt", "a cat", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    # the line says what ran: the scheduler asked for, by the name the user knows
    argv = ["generate", "--model", "reference", "--plan", "postdiff", "--scheduler", "dpmpp-2m-karras", "--prompt", "3", "-o", str(out)]
    assert main(argv) == 0
    assert "20 steps of dpmpp-2m-karras" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_generate_in_half_precision_says_what_ran(tmp_path, capsys, dtype):
    from PIL import Image

    out = tmp_path / "img.png"
    assert main(["generate", "--model", "toy-sd", "--plan", "postdiff", "--dtype", dtype, "--device", "cpu", "-o", str(out)]) == 0
    assert f"torch on cpu in {dtype}" in capsys.readouterr().out
    assert Image.open(out).getextrema() != ((0, 0), (0, 0), (0, 0))  # not the black image NaNs would give


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["plan", "cost", "warp"], "unknown plan 'warp'"),
        (["plan", "cost", "postdiff", "--steps", "8"], "beyond the last step"),
        (["plan", "show", "baseline", "--model", "arch:sd99"], "unknown architecture"),
        (["plan", "show", "mixed-res", "--model", "arch:sd15", "--height", "64", "--width", "64"], "gives no lower resolution"),
        (["generate", "--model", "arch:sd15"], "random weights and no text encoder"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, fragment, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("postdiff: error:") and fragment in err and "\n" not in err


def test_console_script_runs_in_a_fresh_process(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    exe = os.path.join(os.path.dirname(sys.executable), "postdiff")
    proc = subprocess.run([exe, "plan", "show", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "not valid JSON" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_writes_table_json_and_grid(tmp_path, capsys):
    pytest.importorskip("postdiff_lab.reference.pipeline")
    from postdiff_lab import data

    if not (data.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    args = ["eval", "--plans", "baseline,postdiff", "--samples", "6", "--json", str(out), "--grid", str(grid), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| postdiff" in text and "FID (clf)" in text
    assert strict_loads(out.read_text())["samples"] == 6 and grid.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, fragment",
    [(["eval", "--samples", "0"], "--samples must be at least 1"), (["eval", "--plans", "baseline,turbo"], "unknown plan 'turbo'")],
)
def test_eval_bad_input(args, fragment, capsys):
    assert main(args) == 2
    assert fragment in capsys.readouterr().err


def test_local_diffusers_folder_as_model(tmp_path, capsys):
    """The path a Hub id takes, offline: a pipeline saved in diffusers' folder format."""
    from postdiff_lab.toy import toy_pipeline

    folder = tmp_path / "tiny-sd"
    toy_pipeline("sd").save_pretrained(folder)
    assert main(["plan", "cost", "deepcache", "--model", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ratio"] < 1
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(folder), "--plan", "mixed-res", "--steps", "4", "-o", str(out)]) == 0
    assert out.is_file()
    (folder / "model_index.json").write_text("{broken")
    assert main(["plan", "show", "baseline", "--model", str(folder)]) == 2
    assert "cannot load the diffusers pipeline" in capsys.readouterr().err


def test_untrained_size_warning_in_plan_show_generate_and_eval(tmp_path, capsys):
    """The shipped reference model was trained at 16, 24 and 32 px: its plans run quietly; a plan that goes to
    8x8 gets one warning line naming the size and the check to run, and still runs."""
    quarter = tmp_path / "quarter.json"
    quarter.write_text(json.dumps({"name": "quarter", "low_res": {"scale": 0.25, "until": 0.5}}))
    assert main(["plan", "show", "mixed-res"]) == 0
    assert "warning" not in capsys.readouterr().err
    for args in (
        ["plan", "show", str(quarter)],
        ["generate", "--plan", str(quarter), "--steps", "4", "-o", str(tmp_path / "q.png")],
    ):
        assert main(args) == 0
        err = capsys.readouterr().err
        assert "postdiff: warning: plan quarter runs steps at latent 8x8" in err and "--sizes 8,16,24,32" in err
    if not (tmp_path / "q.png").is_file():
        pytest.fail("generate did not write its image after the warning")
    if _have_fashion():
        args = ["eval", "--plans", f"baseline,{quarter}", "--samples", "2", "--grid", str(tmp_path / "g.png"), "--no-progress"]
        assert main(args) == 0
        assert capsys.readouterr().err.count("postdiff: warning: plan quarter") == 1


def _have_fashion() -> bool:
    from postdiff_lab import data

    return data.have("fashion")


def test_eval_sizes_table_and_json(tmp_path, capsys, monkeypatch):
    if not _have_fashion():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out, grid = tmp_path / "sizes.json", tmp_path / "sizes.png"
    assert main(["eval", "--sizes", "16,20", "--samples", "4", "--json", str(out), "--grid", str(grid), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "| 16x16" in captured.out and "| 20x20" in captured.out and "trained there" in captured.out
    # a size the weights were not trained at gets generate's one-line warning, the trained ones none
    assert (
        captured.err.count("where reference was not trained") == 1
        and "latent 20x20" in captured.err
        and "--sizes 16,20,24,32" in captured.err
    )
    assert captured.err.count("FID/KID on 4 samples") == 1  # too few for FID to mean much: said once, not per size
    result = strict_loads(out.read_text())
    assert [r["size"] for r in result["sizes"]] == [16, 20] and grid.read_bytes()[:4] == b"\x89PNG"
    # without --grid, no picture: only the files asked for
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["eval", "--sizes", "16", "--samples", "2", "--json", "e.json", "--no-progress"]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["e.json"]


def test_untrained_warning_suggests_the_sides_asked_for():
    from postdiff.families.model import untrained_warning
    from postdiff.plan.compiler import ModelSpec, compile_plan
    from postdiff.plan.recipe import load_recipe

    spec = ModelSpec(name="m", downsample_factor=4, num_down_blocks=2, has_cross_attention=True)
    plan = compile_plan(load_recipe("baseline"), timesteps=list(range(999, 0, -50)), latent_hw=(36, 40), model=spec)
    warning = untrained_warning("reference", (16, 24, 32), plan)
    assert "latent 36x40" in warning and "--sizes 16,24,32,36,40" in warning


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["eval", "--sizes", "16,32", "--plans", "postdiff"], "leave out --plans"),
        (["eval", "--sizes", "0"], "positive image sizes"),
        (["eval", "--sizes", "x"], "comma-separated integers"),
        (["eval", "--sizes", "16,100000"], "--sizes values must be at most 16384"),
        (["eval", "--plans", ","], "--plans is empty"),
        (["demo", "--seeds", "0"], "--seeds must be at least 1"),
        (["demo", "--plans", "baseline,nosuch"], "unknown plan 'nosuch'"),
        (["generate", "--model", "digits", "--prompt", "Sneaker", "-o", "x.png"], "unknown digit"),
    ],
)
def test_sizes_and_demo_bad_input(args, fragment, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("postdiff: error:") and fragment in err and "\n" not in err


@pytest.mark.parametrize("height, width, low", [(1216, 832, [116, 80]), (1344, 768, [128, 72]), (1024, 1024, [96, 96])])
def test_postdiff_xl_compiles_at_common_sdxl_sizes_and_shows_its_low_resolution(height, width, low, capsys):
    """beta = 3/4 of a 152x104 latent is 114x78, which SDXL's UNet (factor 4) cannot take: the nearest sides it can are used."""
    args = ["plan", "show", "postdiff-xl", "--model", "arch:sdxl", "--height", str(height), "--width", str(width)]
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps"][0]["latent_hw"] == low and data["latent_hw"] == [height // 8, width // 8]
    assert main(args) == 0
    assert f"| {low[0]}x{low[1]} " in capsys.readouterr().out


def test_version_and_env_say_what_a_bug_report_needs(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"postdiff {version('postdiff-cli')} (postdiff-core {version('postdiff-core')}")
    assert main(["env", "--json"]) == 0
    facts = strict_loads(capsys.readouterr().out)
    assert facts["postdiff"]["postdiff-core"] == version("postdiff-core")
    assert facts["libraries"]["torch"] == version("torch") and facts["libraries"]["numpy"] == version("numpy")
    assert "CPUExecutionProvider" in facts["devices"]["onnxruntime providers"] and "CPU" in facts["devices"]["openvino devices"]
    assert facts["devices"]["torch devices"][0] == "cpu" and facts["cores"] >= 1
    if os.path.exists("/proc/cpuinfo") and "avx2" in open("/proc/cpuinfo").read():
        assert "avx2" in facts["cpu features"]
    assert main(["env"]) == 0
    table = capsys.readouterr().out
    assert "| postdiff-onnx" in table and "| cpu features" in table


def test_eval_of_one_sample_reports_null_distribution_metrics_with_the_reason(tmp_path, capsys):
    if not _have_fashion():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "e.json"
    assert main(["eval", "--plans", "baseline,mixed-res", "--samples", "1", "--json", str(out), "--no-progress", "--steps", "4"]) == 0
    captured = capsys.readouterr()
    result = strict_loads(out.read_text())
    assert [p["fid_classifier"] for p in result["plans"]] == [None, None] and result["plans"][1]["class_accuracy"] is not None
    assert any("at least 2 samples" in n for n in result["notes"]) and "n/a" in captured.out and "Traceback" not in captured.err
