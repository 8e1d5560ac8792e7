"""Exported bundles: a folder of graphs plus ``manifest.json``, the one format every exporter writes.

The manifest says what the bundle is and what it can serve, so a runtime checks a bundle before it runs it:

* ``model``: what the graphs come from (kind ``reference``/``sd``/``sdxl``, the planner's ``ModelSpec``, image and
  latent size, the scheduler configuration, what prompt encoding needs);
* ``recipe`` / ``plan``: the plan it was exported for; ``cache_block`` and ``latent_sizes`` bound the plans it serves;
* ``graphs``: one entry per graph (UNet variant, text encoder, VAE decoder, class encoder) with its file, the
  latent size and batch it is fixed to (``null``: dynamic), its inputs and outputs (name, shape, dtype), MACs per
  call at batch 1, and the PSNR against PyTorch measured at export;
* ``cache_tensors``: the tensors a runtime carries between steps (DeepCache feature, cross-attention outputs);
* ``tools``: versions of what made it; ``files``: the sha256 of every file.

Bundles are written to a temporary folder beside the destination and renamed into place only when complete
(``staged_bundle``): an interrupted export leaves nothing behind under the destination's name.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from postdiff.errors import BundleError, ExportError, PlanError
from postdiff.files import umask_mode
from postdiff.plan.compiler import Plan

BUNDLE_FORMAT = "postdiff.bundle/1"
MANIFEST = "manifest.json"
UNET = "unet"


def hw_key(hw) -> str:
    return f"{int(hw[0])}x{int(hw[1])}"


@dataclass
class TensorSpec:
    name: str
    shape: list  # ints, or strings for dynamic dimensions
    dtype: str


@dataclass
class Graph:
    name: str
    role: str  # "unet" | "class_encoder" | "text_encoder" | "text_encoder_2" | "vae_decoder"
    file: str  # path inside the bundle
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    variant: str | None = None  # UNet graphs: full, shallow, full_capture, full_cached, shallow_cached
    latent_hw: list[int] | None = None  # fixed latent size, or None (dynamic: every size in latent_sizes)
    batch: int | None = None  # fixed batch, or None (dynamic)
    function: str | None = None  # function inside a multifunction file (Core ML)
    exporter: str | None = None  # how it was made ("dynamo", "torchscript", ...)
    macs: dict[str, int] = field(default_factory=dict)  # latent size "HxW" -> MACs per call at batch 1
    psnr: dict[str, float] = field(default_factory=dict)  # latent size "HxW" -> min PSNR over outputs vs torch
    # quantized bundles: what the graph's large layers hold ("int8", "int4"; None: the bundle's precision), and the
    # min PSNR of its outputs against its own fp32 graph per latent size, measured at export (the fidelity gate)
    weights: str | None = None
    psnr_fp32: dict[str, float] = field(default_factory=dict)
    # the same graph written for another runtime over the same weights file ({"openvino": file}): int8 graphs
    # quantize activations per call for ONNX Runtime and keep them fp32 for OpenVINO (postdiff_onnx.quantize)
    alternates: dict[str, str] = field(default_factory=dict)

    def file_for(self, runtime: str) -> str:
        """The graph file ``runtime`` runs (its alternate, when the bundle has one)."""
        return self.alternates.get(runtime, self.file)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Graph:
        d = dict(d)
        d["inputs"] = [TensorSpec(**t) for t in d.get("inputs", [])]
        d["outputs"] = [TensorSpec(**t) for t in d.get("outputs", [])]
        return cls(**d)


@dataclass
class Manifest:
    backend: str
    model: dict[str, Any]
    recipe: dict[str, Any]
    plan: dict[str, Any]
    cache_block: int
    latent_sizes: list[list[int]]
    precision: str
    graphs: list[Graph]
    cache_tensors: list[TensorSpec] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)
    images_per_call: int = 1  # images per call of the fixed-shape graphs (batch 2N on CFG steps, N on the others)
    golden: dict[str, Any] | None = None  # what golden.npz holds (postdiff.bundle.golden), when exported with --golden
    cache_span: list[int] | None = None  # a transformer's cached blocks [start, end), when the recipe named them
    # what the weights are stored as (--weights: fp32, fp16, int8, int4; Core ML: fp16, 8bit, 6bit, 4bit), and for
    # quantized bundles how: scheme, layers {weight name: what it holds}, calibration, fidelity gate
    weights: str = "fp32"
    quantization: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: str = BUNDLE_FORMAT

    # -- lookup ----------------------------------------------------------------------------------------------------
    def graph(self, role: str) -> Graph:
        for g in self.graphs:
            if g.role == role:
                return g
        raise BundleError(f"the bundle has no {role} graph; re-export it with a current postdiff")

    def unet_graph(self, variant: str, latent_hw, batch: int | None = None, *, static: bool = False) -> Graph:
        """The graph that runs ``variant`` at ``latent_hw``: with ``static``, the copy fixed to that size and batch."""
        hw = [int(latent_hw[0]), int(latent_hw[1])]
        for g in self.graphs:
            if g.role != UNET or g.variant != variant:
                continue
            if static and g.latent_hw == hw and g.batch == batch:
                return g
            if not static and g.latent_hw is None and hw in self.latent_sizes:
                return g
        kind = f"static ({hw_key(hw)}, batch {batch})" if static else f"at {hw_key(hw)}"
        raise BundleError(f"the bundle has no {variant} UNet graph {kind}; it {self.serves()}")

    def serves(self) -> str:
        variants = sorted({g.variant for g in self.graphs if g.role == UNET})
        sizes = ", ".join(hw_key(s) for s in self.latent_sizes)
        cut = f"cached blocks {self.cache_span}" if self.cache_span else f"DeepCache block {self.cache_block}"
        return f"serves the variants {', '.join(variants)} at latent sizes {sizes} with {cut}"

    def check_plan(self, plan: Plan, *, static: bool = False, batch_of=None) -> None:
        """Refuse, naming what is missing, a plan this bundle cannot run (before anything runs)."""
        missing: list[str] = []
        span = list(plan.recipe.cache_span) if plan.recipe.cache_span else None
        if (plan.recipe.cache_block, span) != (self.cache_block, self.cache_span) and any(s.unet == "shallow" for s in plan.steps):
            if span or self.cache_span:
                missing.append(
                    f"cached blocks {span or 'by block ' + str(plan.recipe.cache_block)} (exported with {self.cache_span or 'block ' + str(self.cache_block)})"
                )
            else:
                missing.append(f"DeepCache block {plan.recipe.cache_block} (exported with block {self.cache_block})")
        for step in plan.steps:
            batch = batch_of(step) if (static and batch_of) else None
            try:
                self.unet_graph(step.variant, step.latent_hw, batch, static=static)
            except BundleError:
                what = f"{step.variant} at {hw_key(step.latent_hw)}" + (f" batch {batch}" if static else "")
                if what not in missing:
                    missing.append(what)
        if missing:
            raise PlanError(
                f"this bundle cannot run plan {plan.name!r}: it lacks {'; '.join(missing)}. The bundle {self.serves()}. "
                f"Export a bundle for this plan (postdiff export {self.backend} --plan ...)"
            )

    # -- serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Manifest:
        try:
            d = dict(d)
            d["graphs"] = [Graph.from_dict(g) for g in d["graphs"]]
            d["cache_tensors"] = [TensorSpec(**t) for t in d.get("cache_tensors", [])]
            if "images_per_call" not in d:  # bundles written before it was a field kept it in tools, as a string
                d["images_per_call"] = int(d.get("tools", {}).get("images_per_call", 1))
            if "weights" not in d:  # bundles written before --weights: their precision says it
                d["weights"] = "fp16" if "fp16" in str(d.get("precision", "")) else "fp32"
            return cls(**d)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where} is not a valid PostDiff manifest ({exc}); re-export the bundle") from None


def cache_tensors(graphs: list[Graph]) -> list[TensorSpec]:
    """The tensors a runtime carries between steps (every UNet output but ``eps``), once each by name, as the
    first graph that returns them declares them."""
    seen: dict[str, TensorSpec] = {}
    for g in graphs:
        if g.role == UNET:
            for t in g.outputs:
                if t.name != "eps":
                    seen.setdefault(t.name, t)
    return list(seen.values())


def tool_versions(*modules: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("postdiff-core", "torch", "diffusers", "transformers", *modules):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- writing ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def staged_bundle(destination: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``destination``; on success it becomes ``destination``.

    The caller writes every file and then ``write_manifest``. If anything fails, or the process is interrupted
    (Ctrl-C, SIGTERM or SIGHUP), the temporary folder is removed and ``destination`` is untouched (with
    ``overwrite``, an existing bundle is replaced only once the new one is complete). A process killed outright
    (SIGKILL, power loss) cannot clean up: the next export to the same destination removes what it left, which is
    recognised by the dead process id in the staging folder's name."""
    dest = Path(destination).expanduser().resolve()
    if dest.exists() and not overwrite:
        raise ExportError(f"output folder {dest} already exists; choose another -o, remove it, or pass --overwrite")
    if dest.exists() and not (dest / MANIFEST).is_file():
        raise ExportError(f"{dest} exists and is not a PostDiff bundle; refusing to replace it. Choose another -o")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dest)
    with terminate_as_interrupt():
        tmp = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(dest)}{os.getpid()}-", dir=dest.parent))
        try:
            os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes it 0700; a bundle is shared like any folder
            yield tmp
            if not (tmp / MANIFEST).is_file():
                raise ExportError("internal error: the export wrote no manifest")
            if dest.exists():
                old = dest.with_name(f"{_staging_prefix(dest, 'old')}{os.getpid()}")
                dest.rename(old)
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _staging_prefix(dest: Path, kind: str = "partial") -> str:
    return f".{dest.name}.{kind}-"


def remove_stale_staging(dest: Path) -> list[Path]:
    """Remove the staging (``.NAME.partial-PID-*``) and replaced (``.NAME.old-PID``) folders of ``dest`` whose
    process is no longer running: what an export killed outright left behind. Another live export's are kept."""
    removed = []
    for kind in ("partial", "old"):
        prefix = _staging_prefix(dest, kind)
        for p in dest.parent.glob(f"{glob.escape(prefix)}*"):
            pid = p.name[len(prefix) :].split("-", 1)[0]
            if p.is_dir() and not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; raised like Ctrl-C so that every cleanup on the way out runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise ``Terminated`` (a ``KeyboardInterrupt``) instead of killing the process
    at once, so ``finally`` blocks remove half-written files. Only the main thread can set handlers: elsewhere this
    does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    signums = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Checksum every file in ``folder`` and write the manifest (last, so its presence means "complete")."""
    manifest.files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (folder / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))


# -- reading ---------------------------------------------------------------------------------------------------------
def read_manifest(folder: str | Path, backend: str, *, verify: bool = True) -> tuple[Path, Manifest]:
    """The bundle's manifest, after checking that every file it lists is present and unchanged."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BundleError(f"bundle folder {folder} does not exist; export one with `postdiff export {backend} -o {folder}`")
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} is not a PostDiff bundle (no {MANIFEST}); export one with `postdiff export {backend}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); the bundle is damaged, re-export it") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise BundleError(f"{path} has format {got!r}, this postdiff reads {BUNDLE_FORMAT!r}; re-export the bundle")
    manifest = Manifest.from_dict(data, str(path))
    if manifest.backend != backend:
        where = " on macOS" if manifest.backend == "coreml" and platform.system() != "Darwin" else ""
        elsewhere = (
            f"; on {platform.system()}, export an ONNX bundle (postdiff export onnx) and run that with --backend {backend}" if where else ""
        )
        raise BundleError(f"{folder} is a {manifest.backend} bundle: run it with --backend {manifest.backend}{where}{elsewhere}")
    if verify:
        verify_files(folder, manifest)
    return folder, manifest


def verify_files(folder: Path, manifest: Manifest) -> None:
    root = folder.resolve()
    for rel, digest in manifest.files.items():
        p = folder / rel
        if Path(rel).is_absolute() or not p.resolve().is_relative_to(root):
            raise BundleError(
                f"{MANIFEST} lists file {rel!r}, which lies outside the bundle folder; the manifest is damaged or forged, re-export the bundle"
            )
        if not p.is_file():
            raise BundleError(f"bundle file {rel} is missing from {folder}; the bundle is incomplete, re-export it")
        if sha256(p) != digest:
            raise BundleError(f"bundle file {rel} does not match its checksum in {MANIFEST} (truncated or modified); re-export the bundle")
    listed = set(manifest.files)
    for g in manifest.graphs:
        for file in (g.file, *g.alternates.values()):
            if file not in listed and not any(f.startswith(file.rstrip("/") + "/") for f in listed):
                raise BundleError(f"graph {g.name} names file {file}, which {MANIFEST} does not list; re-export the bundle")
