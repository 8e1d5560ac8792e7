"""The export skeleton every backend shares: ``export_bundle(backend, model, plan, output, ...)``.

Checks (the backend's options, the batch, the image size), the compiled plan and its cost model, a staging folder
that becomes the bundle only when complete (``bundle.staged_bundle``), progress lines, the graphs the model's
family needs around the UNet variants the plan uses, the tokenizers, and the manifest are done here, once. A
backend (``postdiff.bundle.backends.Backend``) converts one graph at a time and finishes the bundle its own way.

``tensor_psnr`` and ``PSNR_GATE`` are the check every backend that can run a graph at export applies to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from postdiff.bundle import backends
from postdiff.bundle.golden import GOLDEN_FILE, write_golden
from postdiff.bundle.manifest import Manifest, cache_tensors, staged_bundle, tool_versions, write_manifest
from postdiff.errors import ExportError
from postdiff.families.model import Model, load_model
from postdiff.plan.compiler import Plan, step_batch
from postdiff.plan.schedulers import resolve
from postdiff.pytorch.backbone import downsample_factor, split_for
from postdiff.pytorch.graphs import unet_graphs
from postdiff.pytorch.macs import MacCounter

PSNR_GATE = 35.0  # dB, every output of every graph at every size (Apple's gate for converted models)


def tensor_psnr(output, reference) -> float:
    """PSNR of a model output against the reference output, in dB: 20·log10(max|reference| / RMSE).

    The signal peak is the reference's largest magnitude, the gate Apple's Core ML converter and its peers use
    (35 dB) to accept a converted model; ``inf`` when the outputs are identical. A NaN or infinity in one where the
    other has a different value gives ``-inf``, which every gate refuses (a NaN PSNR would compare as passing); the
    same non-finite value in both is left out of the error."""
    import numpy as np

    a = np.asarray(output, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired metrics need images of one shape, got {a.shape} and {b.shape}")
    finite = np.isfinite(a) & np.isfinite(b)
    if not finite.all():
        if not np.array_equal(a[~finite], b[~finite], equal_nan=True):
            return -math.inf
        a, b = a[finite], b[finite]
        if a.size == 0:
            return math.inf
    rmse = float(np.sqrt(np.mean((a - b) ** 2)))
    if rmse == 0.0:
        return math.inf
    peak = float(np.abs(b).max())
    return 20.0 * math.log10(max(peak, 1e-12) / rmse)


@dataclass
class ExportJob:
    """What every exporter starts from: the model, the plan compiled for the requested size, its latent sizes."""

    model: Model
    plan: Plan
    counter: MacCounter
    images: int = 1  # images per call of fixed-shape graphs

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.plan.latent_hw)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [tuple(hw) for hw in self.plan.latent_sizes]

    def batches(self, variant: str, hw, images: int | None = None) -> list[int]:
        """The UNet batch sizes at which the plan calls ``variant`` at ``hw`` with ``images`` images per call."""
        n = self.images if images is None else images
        cfg = self.counter.cfg
        return sorted({step_batch(s.guidance, n, cfg) for s in self.plan.steps if s.variant == variant and tuple(s.latent_hw) == tuple(hw)})


def prepare_export(model: str | Model, plan, *, height=None, width=None, steps=None, scheduler=None, images: int = 1) -> ExportJob:
    if isinstance(model, str):
        model = load_model(model, need_pipeline=None)  # the whole pipeline where there is one, else the UNet alone
    compiled = model.compile(plan, steps, scheduler=scheduler, height=height, width=width)
    _check_exportable_size(model, compiled)
    counter = model.mac_counter(compiled.recipe)
    return ExportJob(model, compiled, counter, images)


def _check_exportable_size(model: Model, plan: Plan) -> None:
    """Exported graphs take latent sides that are multiples of the UNet's downsampling factor (their dynamic shapes
    are written that way; Core ML's fixed shapes follow the same rule). PyTorch runs other sizes, exports do not:
    the error names the nearest image sizes that export."""
    f = downsample_factor(model.network())
    h, w = plan.latent_hw
    if h % f == 0 and w % f == 0:
        return
    px = f * model.vae_scale_factor

    def near(side: int) -> str:
        lo, hi = (side // f) * f, (side // f + 1) * f
        return " or ".join(str(v * model.vae_scale_factor) for v in (lo, hi) if v > 0)

    raise ExportError(
        f"image size {h * model.vae_scale_factor}x{w * model.vae_scale_factor} gives a {h}x{w} latent; exported graphs take "
        f"latent sides that are multiples of {f} (image sides that are multiples of {px}). PyTorch runs this size "
        f"(postdiff generate); to export, use height {near(h)} and width {near(w)}"
    )


def export_bundle(
    backend,
    model: str | Model,
    plan: str = "postdiff",
    output: str | Path = "bundle",
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    batch: int = 1,
    overwrite: bool = False,
    golden: bool = False,
    without: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
    **options,
) -> Path:
    """Export the graphs ``plan`` needs for ``model`` with ``backend`` (a ``Backend`` or its name) into the bundle
    folder ``output``; returns its path. ``options`` are the backend's own (``--weights``, ``--target``, ...).
    ``golden``: also save each graph's first inputs and outputs and the final latent for seed 0 (``postdiff.bundle.golden``).
    ``without``: graphs of the family's ``optional_roles`` to leave out (PixArt's ``text_encoder``: the bundle then
    takes prompt embeddings)."""

    backend = backends.get(backend) if isinstance(backend, str) else backend
    if batch < 1:
        raise ExportError(f"--batch (images per call) must be at least 1, got {batch}")
    backend.check_export(**options)
    job = prepare_export(model, plan, height=height, width=width, steps=steps, scheduler=scheduler, images=batch)
    model, compiled = job.model, job.plan
    refusal = model.family.bundle_refusal(model, backend.name)
    if refusal:
        raise ExportError(refusal)
    without = tuple(without)
    optional = model.family.optional_roles
    if any(role not in optional for role in without):
        raise ExportError(
            f"{model.name} ({model.family.name}) bundles need every graph around the network"
            + (f"; only {', '.join(optional)} may be left out" if optional else "")
            + " (--no-text-encoder is for PixArt, whose T5-XXL encoder is 4.7B parameters)"
        )
    if golden and without:
        raise ExportError("--golden runs the plan from a prompt, which a bundle without its text encoder cannot encode; drop one of them")
    start = time.perf_counter()
    with staged_bundle(output, overwrite=overwrite) as folder, split_for(model.network(), compiled.recipe) as split:
        # the small pipeline graphs (class or text encoders, VAE decoder) first: a bad option or an interruption
        # shows up in seconds, before the long UNet conversions
        around = [g for g in model.family.pipeline_graphs(model) if g.role not in without]
        sources = around + unet_graphs(split, compiled, text_len=model.text_len, pooled_dim=model.pooled_dim)
        graphs = []
        for i, src in enumerate(sources, 1):
            log(f"[{i}/{len(sources)}] {src.name}: converting")
            t0 = time.perf_counter()
            made = backend.convert(src, job, folder, log, **options)
            psnr = ", ".join(f"{k} {v:.1f} dB" for g in made[:1] for k, v in g.psnr.items())
            quantized = ", ".join(f"{k} {v:.1f} dB" for g in made[:1] for k, v in g.psnr_fp32.items())
            checks = [f"PSNR vs torch: {psnr}"] if psnr else []
            checks += [f"{made[0].weights} vs fp32: {quantized}"] if quantized else []
            log(
                f"[{i}/{len(sources)}] {src.name}: done in {time.perf_counter() - t0:.1f} s" + (f" ({'; '.join(checks)})" if checks else "")
            )
            graphs += made
        facts = backend.finish(folder, job, graphs, log, **options)
        if not without:
            save_tokenizers(model, folder)
        manifest = Manifest(
            backend=backend.name,
            model={**model_info(model, job.latent_hw, compiled, scheduler), **({"without": list(without)} if without else {})},
            recipe=compiled.recipe.to_dict(),
            plan=compiled.to_dict(),
            cache_block=compiled.recipe.cache_block,
            cache_span=list(compiled.recipe.cache_span) if compiled.recipe.cache_span else None,
            latent_sizes=[list(hw) for hw in job.sizes],
            precision=facts["precision"],
            weights=facts.get("weights", facts["precision"]),
            quantization=facts.get("quantization"),
            graphs=graphs,
            cache_tensors=cache_tensors(graphs),
            tools={**tool_versions(*([backend.package] if backend.package else [])), **facts.get("tools", {})},
            images_per_call=batch,
        )
        if golden:
            if not model.family.generates:
                raise ExportError(f"--golden runs the whole plan; {model.name} is a bare UNet with no pipeline to generate with")
            log(f"golden: running the plan once on the PyTorch modules (seed 0) into {GOLDEN_FILE}")
            manifest.golden = write_golden(folder, manifest, sources)
        write_manifest(folder, manifest)
    log(f"bundle written to {Path(output).resolve()} in {time.perf_counter() - start:.0f} s ({len(graphs)} graphs)")
    return Path(output).resolve()


def save_tokenizers(model: Model, folder) -> None:
    """The tokenizers the model's family names, as folders a bundle runtime loads with transformers' AutoTokenizer."""
    for name in model.family.tokenizers:
        getattr(model.pipeline, name).save_pretrained(str(Path(folder) / name))


def model_info(model: Model, latent_hw: tuple[int, int], plan: Plan, scheduler: str | None = None) -> dict[str, Any]:
    """What a runtime needs to know about the model to run its bundle without the PyTorch model code. The scheduler
    is recorded by the name it was asked for (``postdiff.plan.schedulers``: ``dpmpp-2m-karras`` carries its settings), with
    its class and the model's own configuration the settings apply over."""
    spec = model.spec()
    return {
        "name": model.name,
        "kind": model.family.name,
        "spec": asdict(spec),
        "latent_hw": list(latent_hw),
        "image_hw": [latent_hw[0] * model.vae_scale_factor, latent_hw[1] * model.vae_scale_factor],
        "vae_scale_factor": model.vae_scale_factor,
        "in_channels": int(model.unet_config.get("in_channels", 4)),
        "text_len": model.text_len,
        "pooled_dim": model.pooled_dim,
        "scheduler": scheduler or plan.scheduler,
        "scheduler_class": resolve(plan.scheduler)[0] if plan.scheduler else None,
        "scheduler_config": dict(model.scheduler_config),
        **model.family.bundle_info(model),
    }
