"""Bad input, as a new user types it, through every subcommand: each is refused with exit status 2 and one line
(``postdiff: error: ...``, no traceback) before any work, and leaves no file behind in the working folder.

Every case here fails before a model generates anything: the whole table runs in seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from postdiff_cli.main import main

LONG_PROMPT = "a" * 100_000


def _fixtures(root: Path) -> dict[str, str]:
    """Files the cases point at, made outside the working folder (which must stay empty)."""
    root.mkdir()
    (root / "folder").mkdir()
    (root / "latin1.json").write_bytes('{"name": "caf\xe9", "steps": 20}'.encode("latin-1"))
    (root / "broken.json").write_text('{"steps": 20,')
    (root / "nan.json").write_text('{"steps": 20, "deepcache": {"interval": 2, "power": NaN}}')
    (root / "branch0.json").write_text('{"deepcache": {"interval": 2, "cache_branch_id": 0}}')
    (root / "afile").write_text("not a folder")
    (root / "nocenter.json").write_text(
        '{"steps": 10, "deepcache": {"interval": 2, "schedule": "nonuniform", "center": 0.5, "power": 1.02}}'
    )
    coreml = root / "coreml-bundle"
    coreml.mkdir()
    manifest = {
        "format": "postdiff.bundle/1",
        "backend": "coreml",
        "model": {},
        "recipe": {},
        "plan": {},
        "cache_block": 0,
        "latent_sizes": [],
        "precision": "fp16",
        "graphs": [],
    }
    (coreml / "manifest.json").write_text(json.dumps(manifest))
    return {
        k: str(root / v)
        for k, v in {
            "dir": "folder",
            "latin1": "latin1.json",
            "broken": "broken.json",
            "nan": "nan.json",
            "branch0": "branch0.json",
            "file": "afile",
            "coreml": "coreml-bundle",
            "nocenter": "nocenter.json",
        }.items()
    }


# (arguments with {placeholders} from _fixtures, a fragment the message must contain)
CASES = [
    # zero and non-finite numbers are refused, not taken as "not given"
    ("generate --steps 0", "--steps must be at least 1"),
    ("generate --steps -4", "--steps must be at least 1"),
    ("generate --steps 1.5", "invalid int value"),
    ("generate --height 0", "--height must be at least 1"),
    ("generate --width 0", "--width must be at least 1"),
    ("generate --width 100000", "--width must be at most"),
    ("generate --guidance nan", "--guidance must be a finite number"),
    ("generate --guidance inf", "--guidance must be a finite number"),
    ("generate --guidance -1", "--guidance must be a number of at least 0"),
    ("generate --seed -1", "--seed must be at least 0"),
    ("plan show postdiff --steps 0", "--steps must be at least 1"),
    ("plan show postdiff --steps 5000", "--steps must be at most 1000"),
    ("plan cost postdiff --height 0", "--height must be at least 1"),
    ("generate --plan steps:2000", "more than the 1000 timesteps"),
    ("demo --seeds 0", "--seeds must be at least 1"),
    ("eval --samples 0", "--samples must be at least 1"),
    ("eval --inception-reference 0", "--inception-reference must be at least 2"),
    ("bench --warmup -1", "--warmup must be at least 0"),
    ("bench --threads 0", "--threads must be at least 1"),
    ("export onnx --batch 0 -o bundle", "--batch must be at least 1"),
    ("export onnx --opset 12 -o bundle", "--opset must be at least 17"),
    # weight types: one flag for every backend, each refusing what it cannot store with what it can
    ("export onnx --weights int3 -o bundle", "invalid choice: 'int3' (choose from 'fp32', 'fp16', 'int8', 'int4')"),
    ("export onnx --min-psnr 30 -o bundle", "--min-psnr is the fidelity gate of quantized weights (int8, int4); --weights fp32"),
    ("export onnx --weights int8 --min-psnr nan -o bundle", "--min-psnr must be a number of dB"),
    ("export onnx --weights int4 --min-psnr -3 -o bundle", "--min-psnr must be a number of dB"),
    ("export coreml --weights int8 -o bundle", "Core ML's 8-bit weights (linear quantization) are --weights 8bit"),
    ("export coreml --weights fp32 -o bundle", "its widest weights are fp16"),
    ("export coreml --weights 3bit -o bundle", "--weights must be one of fp16, 8bit, 6bit, 4bit"),
    ("bench --weights int3", "--weights: unknown weight type 'int3'"),
    ("bench --weights ,", "--weights is empty"),
    ("generate --low-memory", "--low-memory runs an exported bundle"),
    ("plan search --budget nan", "in (0, 1]"),
    ("plan search --budget 0.4 --top 0", "--top must be at least 1"),
    ("sweep --budgets 0,0.5", "in (0, 1]"),
    ("plan search --budget 0.4 --betas 0", "--betas values must be in (0, 1]"),
    ("plan search --budget 0.4 --switches 1", "--switches values must be in (0, 1)"),
    ("plan search --budget 0.4 --gates 25", "--gates 25 is at or beyond the last of the 20 steps"),
    # output paths: checked for kind, suffix and writability before the work starts
    ("generate -o {dir}", "is a folder"),
    ("generate -o ''", "-o is empty"),
    ("generate -o x.gif", "must end in .png or .jpg or .jpeg"),
    ("generate -o {file}/x.png", "is a file, not a folder"),
    ("generate -o /proc/postdiff/x.png", "cannot write in /proc"),
    ("eval --grid {dir}", "--grid {dir} is a folder"),
    ("eval --json {dir}", "--json {dir} is a folder"),
    ("eval --json results.txt", "must end in .json"),
    ("demo -o {dir}", "is a folder"),
    ("bench --json {dir}", "is a folder"),
    ("sweep --plot plot.svg", "must end in .png"),
    ("plan search --budget 0.4 -o {dir}", "is a folder"),
    ("export onnx -o /proc/postdiff-bundle", "cannot write in /proc"),
    ("export onnx -o {file}", "is a file; give a folder path"),
    ("export coreml -o ''", "-o is empty"),
    # lists and names
    ("eval --plans ''", "--plans is empty"),
    ("eval --plans ,", "--plans is empty"),
    ("eval --sizes 16 --plans baseline", "leave out --plans"),
    ("bench --backends ''", "--backends is empty"),
    ("bench --backends cuda", "unknown backend 'cuda'"),
    ("demo --plans nosuch", "unknown plan 'nosuch'"),
    ("generate --plan nosuch", "unknown plan 'nosuch'"),
    ("generate --backend cuda", "invalid choice: 'cuda'"),
    ("generate --scheduler NoSuchScheduler", "unknown scheduler"),
    ("generate --scheduler dpm3", "use one of ddim, euler, euler-a, heun, dpmpp-2m, dpmpp-2m-karras"),
    ("generate --scheduler ''", "--scheduler is empty"),
    ("eval --scheduler lcm --samples 2", "LCMScheduler"),
    ("sweep --scheduler euler_x", "unknown scheduler"),
    ("export onnx --scheduler lcm -o new-bundle", "LCMScheduler"),
    ("generate --model ''", "--model is empty"),
    ("generate --model ./no/such/folder", "no/such/folder"),
    ("generate --prompt 'a red sneaker'", "unknown Fashion-MNIST class"),
    # recipe files
    ("generate --plan {dir}", "is a folder; give a recipe JSON file"),
    ("generate --plan {latin1}", "is not UTF-8 text"),
    ("plan show {broken}", "not valid JSON"),
    ("plan show {nan}", "must be a finite number"),
    ("plan show {branch0}", "cache_branch_id=0 is a cut"),
    ("plan show missing.json", "does not exist"),
    # flags that a mode ignores are refused, not dropped
    ("generate --backend onnx --bundle {coreml} --model reference", "--model cannot be used with --bundle"),
    ("generate --backend onnx --bundle {coreml} --height 32", "--height cannot be used with --bundle"),
    ("generate --bundle {coreml}", "--bundle is for exported runtimes"),
    ("generate --static", "--static is for exported runtimes"),
    ("generate --prepack", "--prepack is for exported runtimes (onnx)"),
    ("generate --no-prepack", "--no-prepack is for exported runtimes (onnx)"),
    ("generate --backend onnx", "pass --bundle DIR"),
    # a Core ML bundle on this machine: one message that leads out, not round in a circle
    ("generate --backend onnx --bundle {coreml}", "export an ONNX bundle"),
    # a distribution metric from one sample: refused before any plan runs (eval reports null with the reason instead)
    ("sweep --calibration 1 --budgets 0.4", "--calibration 1: FID needs at least 2 samples per plan"),
    ("sweep --samples 1 --budgets 0.4", "--samples 1: FID needs at least 2 samples per plan"),
    ("plan search --calibration 1 --budget 0.4", "--calibration 1: FID needs at least 2 samples per plan"),
    ("plan search --holdout 1 --budget 0.4", "--holdout 1: FID needs at least 2 samples per plan"),
    # a PyTorch device that is not here, or that is not a device: one line naming the devices found, on every command
    *(
        (f"{cmd} --device cuda", "PyTorch has no cuda device here (found: cpu")
        for cmd in ("generate", "eval", "demo", "sweep --budgets 0.4", "plan search --budget 0.4", "bench")
    ),
    ("generate --device cuda:7", "PyTorch has no cuda:7 device here"),
    ("generate --device tpu", "unknown PyTorch device 'tpu'"),
    ("generate --device mps", "PyTorch has no mps device here"),
    ("generate --dtype float8", "invalid choice: 'float8'"),
    ("generate --backend onnx --dtype float16", "--dtype is an option of --backend torch, not of --backend onnx"),
    # the command line itself: the program's name once, the sub-command named where there is one
    ("", "postdiff: error: the following arguments are required: command"),
    ("bogus", "postdiff: error: argument command: invalid choice: 'bogus'"),
    ("env --bogus", "postdiff: error: unrecognized arguments: --bogus"),
    ("plan cost", "postdiff: error: plan cost: the following arguments are required: plan"),
    # a non-uniform DeepCache schedule with no distinct full steps: refused before any model runs
    ("plan cost {nocenter} --model arch:sd15", "deepcache.schedule 'nonuniform' finds no"),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    return _fixtures(tmp_path_factory.mktemp("bad-input") / "fixtures")


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors exit
        return int(exc.code or 0)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_table_covers_every_subcommand():
    commands = {" ".join(c.split()[:2]) if c.split()[:1] in (["plan"], ["export"]) else " ".join(c.split()[:1]) for c, _ in CASES}
    assert {
        "generate",
        "demo",
        "eval",
        "bench",
        "sweep",
        "plan show",
        "plan cost",
        "plan search",
        "export onnx",
        "export coreml",
        "env",
        "",
    } <= commands
    assert len(CASES) >= 40


@pytest.mark.parametrize("command, fragment", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(command, fragment, fixtures, tmp_path, monkeypatch, capsys):
    import shlex

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = [a.format(**fixtures) for a in shlex.split(command)]
    before = _tree(tmp_path), _tree(Path(fixtures["dir"]).parent)
    assert _run(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("postdiff: error:") and "Traceback" not in err
    assert not lines[0].startswith("postdiff: error: postdiff")  # the program's name once
    assert fragment.format(**fixtures) in lines[0]
    assert len(lines[0]) < 600  # a 100k-character input is never echoed whole
    assert (_tree(tmp_path), _tree(Path(fixtures["dir"]).parent)) == before  # nothing written, nothing half-written


def test_a_huge_prompt_is_not_echoed_whole(capsys):
    assert _run(["generate", "--prompt", LONG_PROMPT]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and len(err) < 400 and "100000 characters" in err


def test_zero_guidance_means_no_guidance_not_the_default(tmp_path):
    """--guidance 0 is valid (no classifier-free guidance, as diffusers treats guidance_scale <= 1) and differs from the
    default 3; it equals --guidance 1."""
    images = {}
    for g in ("0", "1", "3"):
        out = tmp_path / f"g{g}.png"
        assert _run(["generate", "--plan", "steps:4", "--guidance", g, "-o", str(out)]) == 0
        images[g] = out.read_bytes()
    assert images["0"] == images["1"] != images["3"]


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "x.png"
        assert _run(["generate", "--plan", "steps:2", "-o", str(out)]) == 0
        assert out.stat().st_mode & 0o777 == 0o644
        jpg = tmp_path / "x.jpg"
        assert _run(["generate", "--plan", "steps:2", "-o", str(jpg)]) == 0
        assert jpg.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, as the suffix says
    finally:
        os.umask(old)
