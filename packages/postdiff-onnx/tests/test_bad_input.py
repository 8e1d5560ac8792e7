"""Bad input: damaged bundles, plans a bundle cannot serve, wrong shapes, existing or interrupted outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import postdiff_onnx.export as export_mod
from postdiff.bundle.manifest import MANIFEST
from postdiff.errors import BundleError, ExportError, PlanError
from postdiff_cli.main import main as cli
from postdiff_onnx.export import export_onnx
from postdiff_onnx.runtime import load_bundle


@pytest.fixture
def copy(bundles, tmp_path):
    """A private copy of the reference bundle to damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(bundles("reference"), dst)
    return dst


def test_truncated_graph_is_caught_by_its_checksum(copy):
    f = copy / "unet_shallow.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(BundleError, match="unet_shallow.onnx does not match its checksum"):
        load_bundle(copy)


def test_corrupted_graph_without_checksum_check_is_a_clear_error(copy):
    f = copy / "unet_shallow.onnx"
    f.write_bytes(b"\x00garbage" * 10)
    pipe = load_bundle(copy, verify=False)
    with pytest.raises(BundleError, match="onnxruntime cannot load unet_shallow.onnx"):
        pipe.generate([1], seed=0)


def test_flipped_byte_in_weights_is_caught(copy):
    f = next(copy.glob("*.onnx.data"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its checksum"):
        load_bundle(copy)


def test_missing_file(copy):
    (copy / "class_encoder.onnx").unlink()
    with pytest.raises(BundleError, match="class_encoder.onnx is missing"):
        load_bundle(copy)


def test_damaged_or_foreign_manifest(copy, tmp_path):
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(copy)
    (copy / MANIFEST).write_text(json.dumps({"format": "something/9"}))
    with pytest.raises(BundleError, match="format 'something/9'"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="not a PostDiff bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_plan_needing_a_missing_variant_or_size_is_refused_before_running(bundles):
    small = load_bundle(bundles("reference_fp16"))  # exported for deepcache: full + shallow at 32x32
    with pytest.raises(PlanError, match=r"lacks .*full_capture at 32x32.*Export a bundle for this plan"):
        small.compile("xattn-gate")
    with pytest.raises(PlanError, match=r"lacks .*full at 16x16"):
        small.compile("mixed-res")
    big = load_bundle(bundles("reference"))
    with pytest.raises(PlanError, match=r"24x24"):
        big.compile({"steps": 10, "low_res": {"scale": 0.75}})
    with pytest.raises(PlanError, match="DeepCache block 1"):
        big.compile({"steps": 10, "deepcache": {"interval": 2, "block": 1}})


def test_wrong_input_shape_is_named(bundles):
    pipe = load_bundle(bundles("reference"))
    graph = pipe.manifest.unet_graph("full", (32, 32))
    feeds = {
        "sample": np.zeros((2, 3, 32, 32), np.float32),
        "timestep": np.zeros(2, np.float32),
        "encoder_hidden_states": np.zeros((2, 4, 32), np.float32),
    }
    with pytest.raises(BundleError, match=r"'sample' has shape \[2, 3, 32, 32\], the graph takes"):
        pipe.runner.run(graph, feeds)
    with pytest.raises(BundleError, match="'timestep' was not given"):
        pipe.runner.run(graph, {"sample": np.zeros((2, 1, 32, 32), np.float32)})


def test_unknown_provider_and_static_without_static_graphs(bundles):
    with pytest.raises(BundleError, match="execution provider 'NoSuchExecutionProvider' is not available"):
        load_bundle(bundles("reference"), provider="NoSuchExecutionProvider").generate([1], seed=0)
    with pytest.raises(BundleError, match="no static graphs"):
        load_bundle(bundles("sd"), static=True)


def test_existing_output_folder_is_refused(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_onnx("reference", "deepcache", out, log=lambda m: None)
    with pytest.raises(ExportError, match="not a PostDiff bundle; refusing to replace"):
        export_onnx("reference", "deepcache", out, overwrite=True, log=lambda m: None)
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_export_leaves_no_half_written_bundle(tmp_path, monkeypatch):
    real = export_mod._export_graph
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the second graph
        return real(*args, **kwargs)

    monkeypatch.setattr(export_mod, "_export_graph", interrupted)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        export_onnx("reference", "deepcache", out, log=lambda m: None)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary folder


def test_bad_options():
    with pytest.raises(ExportError, match="--weights"):
        export_onnx("reference", "deepcache", "x", weights="int3")
    with pytest.raises(ExportError, match="--batch"):
        export_onnx("reference", "deepcache", "x", batch=0)


def test_cli_errors_are_one_line(capsys, tmp_path, bundles):
    assert cli(["generate", "--backend", "onnx"]) == 2
    assert "pass --bundle DIR" in capsys.readouterr().err
    assert cli(["generate", "--bundle", str(bundles("reference"))]) == 2
    assert "add --backend onnx" in capsys.readouterr().err
    assert cli(["export", "onnx", "--model", "reference", "-o", str(bundles("reference"))]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert cli(["generate", "--backend", "onnx", "--bundle", str(bundles("reference_fp16")), "--plan", "postdiff"]) == 2
    assert "cannot run plan 'postdiff'" in capsys.readouterr().err


# SIGTERM delivered to this process at three points of an export: a real signal, sent the way `kill` sends it,
# arriving while the named step runs.
_TERM_AT = {
    "tracing": (torch.onnx, "export"),
    "writing": (export_mod, "_group_norm_as_layer_norm"),
    "checking": (export_mod, "_measure"),
}


def test_sigterm_during_export_leaves_nothing_and_the_next_export_succeeds(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import subprocess
    import sys

    target = tmp_path / "bundle"
    # what an export killed outright (SIGKILL, which no process can catch) leaves: recognised by its dead process id
    # and removed by the next export to the same target; a live export's staging folder is kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".bundle.partial-{dead}-abc123"
    stale.mkdir()
    (stale / "unet_full.onnx").write_bytes(b"half")
    live = tmp_path / f".bundle.partial-{os.getpid() + 0}-def456"
    live.mkdir()
    for point, (owner, name) in _TERM_AT.items():
        real = getattr(owner, name)

        def hit(*args, _real=real, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return _real(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(owner, name, hit)
            code = cli(["export", "onnx", "--model", "reference", "--plan", "baseline", "-o", str(target)])
        err = capsys.readouterr().err
        assert code == 128 + signal.SIGTERM and "terminated by signal 15" in err and "Traceback" not in err, (point, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name], point  # no bundle, no staging folder
    out = export_onnx("reference", "baseline", target, verify=False, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", live.name])
    assert load_bundle(out).manifest.backend == "onnx"
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the export's handler is gone again


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_manifest_files_outside_the_bundle_are_refused(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["../outside.txt"] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle folder"):
        load_bundle(copy)
