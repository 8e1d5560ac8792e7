"""The ONNX runtime without PyTorch, run by ``nox -s runtime`` in a venv where only postdiff-core and postdiff-onnx
(no extras) are installed, on a bundle the main venv exported (``POSTDIFF_RUNTIME_BUNDLE``) and the images its
PyTorch-backed loop made (``POSTDIFF_RUNTIME_REFERENCE``, from ``reference_images.py``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

BUNDLE = os.environ.get("POSTDIFF_RUNTIME_BUNDLE")
REFERENCE = os.environ.get("POSTDIFF_RUNTIME_REFERENCE")
# the int8 and int4 bundles and their torch-loop images: "bundle=images.npz,..."
QUANTIZED = [tuple(pair.split("=", 1)) for pair in os.environ.get("POSTDIFF_RUNTIME_QUANTIZED", "").split(",") if pair]
pytestmark = pytest.mark.skipif(not BUNDLE, reason="runs in the runtime-only venv of nox -s runtime")


def test_pytorch_and_its_libraries_are_not_importable():
    for name in ("torch", "diffusers", "transformers", "onnx"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the runtime-only venv"


# installed only to run these tests (pytest and what it brings) or by venv itself (pip)
TEST_TOOLS = {"pytest", "pluggy", "iniconfig", "pygments", "pip", "setuptools", "wheel", "exceptiongroup", "tomli"}


def test_the_runtime_only_install_is_small():
    from importlib.metadata import distributions

    sizes: dict[str, int] = {}
    for dist in distributions():
        name = dist.metadata["Name"].lower()
        files = [dist.locate_file(f) for f in dist.files or ()]
        sizes[name] = sum(p.stat().st_size for p in map(Path, files) if p.is_file())
    runtime = {k: v for k, v in sizes.items() if k not in TEST_TOOLS}
    roots = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    total = sum(p.stat().st_size for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    top = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in sorted(runtime.items(), key=lambda kv: -kv[1])[:6])
    print(f"runtime packages: {sum(runtime.values()) / 1e6:.1f} MB ({top} MB); site-packages with the test tools: {total / 1e6:.1f} MB")
    assert sum(runtime.values()) <= 250e6


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def test_images_match_the_pytorch_backed_run_of_the_same_bundle():
    from postdiff_onnx import load_bundle

    ref = np.load(REFERENCE)
    pipe = load_bundle(BUNDLE)
    # nox exports this bundle with DPM++ 2M Karras: the numpy runtime's multistep solver on Karras sigmas
    assert pipe.manifest.model["scheduler"] == "dpmpp-2m-karras", pipe.manifest.model["scheduler"]
    images = pipe.generate([int(c) for c in ref["conditions"]], seed=int(ref["seed"]))
    scores = [_psnr(a, b) for a, b in zip(images, ref["images"])]
    # the final latents too: the reference model's images are uint8-rounded, its latents are not
    peak = float(np.abs(ref["latents"]).max())
    rmse = float(np.sqrt(np.mean((pipe.final_latents.astype(np.float64) - ref["latents"]) ** 2)))
    latent_db = float("inf") if rmse == 0 else 20 * np.log10(peak / rmse)
    print(f"numpy loop vs torch loop: images {', '.join(f'{s:.1f}' for s in scores)} dB, final latents {latent_db:.1f} dB")
    assert images.shape == ref["images"].shape
    assert min(scores) >= 60.0 and latent_db >= 60.0, (scores, latent_db)
    other = load_bundle(BUNDLE).generate([int(ref["conditions"][0])], seed=int(ref["seed"]) + 1)
    assert _psnr(other[0], ref["images"][0]) < 40.0  # another seed differs: the comparison can fail


@pytest.mark.parametrize("index", range(2))
def test_every_weight_type_runs_and_matches_its_pytorch_backed_run(index, tmp_path):
    """int8 and int4 bundles, plain and --low-memory, against the torch loop over the same graphs; and the command."""
    from postdiff_onnx import load_bundle

    assert len(QUANTIZED) == 2, "nox -s runtime exports an int8 and an int4 bundle"
    bundle, reference = QUANTIZED[index]
    ref = np.load(reference)
    runs = []
    for low_memory in (False, True):
        pipe = load_bundle(bundle, low_memory=low_memory)
        runs.append(pipe.generate([int(c) for c in ref["conditions"]], seed=int(ref["seed"])))
        assert pipe.manifest.weights == ("int8", "int4")[index]
        # 30 dB, not 60: activations are quantized per call, so the schedulers' 1e-7 rounding differences move a few
        # values across a quantization step (test_quantize.py measures it)
        assert min(_psnr(a, b) for a, b in zip(runs[-1], ref["images"])) >= 30.0
    assert np.array_equal(*runs)  # --low-memory changes the memory, not the image
    out = tmp_path / "x.png"
    cmd = [sys.executable, "-m", "postdiff_onnx", "run", bundle, "--prompt", "3", "--low-memory", "--no-progress", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    assert f"{('int8', 'int4')[index]} weights" in proc.stdout


def test_run_command_writes_the_image(tmp_path):
    out = tmp_path / "boot.png"
    cmd = [sys.executable, "-m", "postdiff_onnx", "run", BUNDLE, "--prompt", "Ankle boot", "--seed", "3", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "wrote" in proc.stdout
    assert "%" in proc.stderr or "it/s" in proc.stderr  # the progress bar
    proc = subprocess.run(
        [*cmd[:-2], "-o", str(tmp_path / "x.png"), "--steps", "16", "--no-progress"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "recompiled" in proc.stderr, proc.stderr[-2000:]


def test_a_missing_extra_or_a_bad_bundle_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import postdiff_onnx; postdiff_onnx.export_onnx"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "pip install 'postdiff-onnx[export]'" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "postdiff_onnx", "run", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("postdiff_onnx: error:") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
