"""Edge-grade bundles: bytes, peak memory and agreement of fp32 ONNX bundles, `postdiff` against `baseline`.

    python benchmarks/bench_bundles.py                                   # reference model and arch:sd15 at 256 px
    python benchmarks/bench_bundles.py --models reference --out benchmarks/results/bundles_reference.json

For each model: exports the `baseline` and `postdiff` fp32 ONNX bundles (cached under benchmarks/.bundles/), then
- bytes: every file of each bundle;
- peak RSS: one whole run of each plan in a fresh process (ONNX Runtime through the numpy loop with default
  sessions, on the bundle's one copy of the weights, ``onnx``, and with ``--prepack`` sessions, ``onnx-prepack``; PyTorch through ``TorchDenoiser``),
  read from the child's VmHWM; a UNet-only model (``arch:``) runs the plan's
  UNet calls with random conditioning of its shape, a pipeline model generates images;
- agreement (pipeline models): the numpy loop against the torch loop on the same bundle and seed, and OpenVINO f32
  against ONNX Runtime per graph (every call of a generation) and for the whole image (PSNR, dB).
Prints a Markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLANS = ("baseline", "postdiff")
KINDS = ("onnx", "onnx-prepack", "torch")


def bundle_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def export(model: str, plan: str, px: int | None) -> Path:
    from postdiff.bundle.export import export_bundle

    folder = HERE / ".bundles" / f"edge-{model.replace(':', '-')}-{plan}-{px or 'default'}"
    if not (folder / "manifest.json").is_file():
        sizes = {"height": px, "width": px} if px else {}
        export_bundle("onnx", model, plan, folder, overwrite=folder.exists(), log=lambda m: print(f"  {m}", file=sys.stderr), **sizes)
    return folder


# -- one run in a child process ----------------------------------------------------------------------------------------
def child(kind: str, model_name: str, bundle: str, images: int) -> dict:
    """One whole run of the bundle's plan; what a process of this kind holds at its peak."""
    import numpy as np

    from postdiff.bundle.manifest import read_manifest
    from postdiff.families.registry import family_named

    folder, manifest = read_manifest(bundle, "onnx")
    start = time.perf_counter()
    if kind.startswith("onnx"):
        from postdiff_onnx.runtime import OrtRunner, load_bundle

        prepack = kind == "onnx-prepack"
        if not family_named(manifest.model["kind"]).generates:  # a bare UNet: its calls with random conditioning
            _unet_run(manifest, folder, OrtRunner(folder, prepack=prepack), images)
        else:
            load_bundle(folder, prepack=prepack).generate(list(range(images)), seed=0)
    else:
        from postdiff.families.model import load_model

        model = load_model(model_name, need_pipeline=None)
        if model.family.generates:
            from postdiff.plan.recipe import Recipe
            from postdiff_lab.generation import source_for

            source_for(model).generate(Recipe.from_dict(manifest.recipe), images, seed=0)
        else:
            _unet_run_torch(manifest, model, images)
    seconds = time.perf_counter() - start
    return {"peak_rss_mb": peak_rss_mb(), "seconds": seconds, "ok": bool(np.isfinite(seconds))}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ``ru_maxrss``: Linux keeps ``ru_maxrss`` across exec, so a
    child started from a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _random_cond(manifest, images: int, ops):
    import numpy as np

    from postdiff.loop.conditioning import Conditioning

    rng = np.random.default_rng(0)
    spec = next(t for g in manifest.graphs for t in g.inputs if t.name == "encoder_hidden_states")
    ehs = rng.standard_normal((2 * images, *[d for d in spec.shape[1:]])).astype(np.float32)
    return Conditioning(ops.asarray(ehs), has_uncond=True)


def _unet_run(manifest, folder, runner, images: int) -> None:
    from postdiff.bundle.runtime import CheckedRunner, GraphDenoiser
    from postdiff.loop.arrays import NUMPY
    from postdiff.loop.numpy_schedulers import numpy_scheduler
    from postdiff.loop.sampling import run_plan
    from postdiff.loop.torch_random import TorchGenerator
    from postdiff.plan.compiler import Plan

    plan = Plan.from_dict(manifest.plan, where="manifest")
    sch = numpy_scheduler(manifest.model["scheduler"], manifest.model["scheduler_config"])
    den = GraphDenoiser(manifest, CheckedRunner(runner))
    noise = NUMPY.randn((images, manifest.model["in_channels"], *plan.latent_hw), TorchGenerator(0))
    run_plan(plan, den, sch, _random_cond(manifest, images, NUMPY), latents=noise, generator=TorchGenerator(1), progress=False)


def _unet_run_torch(manifest, model, images: int) -> None:
    import torch

    from postdiff.loop.arrays import TORCH
    from postdiff.loop.sampling import run_plan
    from postdiff.plan.compiler import Plan
    from postdiff.pytorch.denoiser import TorchDenoiser
    from postdiff.pytorch.unet import UNetSplit

    plan = Plan.from_dict(manifest.plan, where="manifest")
    sch = model.scheduler(manifest.model["scheduler"])
    with UNetSplit(model.network(), block=plan.recipe.cache_block) as split, torch.no_grad():
        run_plan(
            plan,
            TorchDenoiser(split),
            sch,
            _random_cond(manifest, images, TORCH),
            generator=torch.Generator().manual_seed(0),
            progress=False,
        )


def in_child(kind: str, model: str, bundle: Path, images: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, model, str(bundle), str(images)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- agreement ---------------------------------------------------------------------------------------------------------
def agreement(bundle: Path, images: int) -> dict:
    from postdiff.bundle.manifest import read_manifest
    from postdiff.bundle.runtime import BundlePipeline
    from postdiff_lab.metrics import psnr, tensor_psnr
    from postdiff_onnx.runtime import OrtRunner, load_bundle

    pipe = load_bundle(bundle)
    conditions = list(range(images))
    a = pipe.generate(conditions, seed=0, loop="numpy")
    latents = pipe.final_latents
    b = pipe.generate(conditions, seed=0, loop="torch")
    out = {
        "numpy_vs_torch_loop_image_psnr_db": min(psnr(x, y) for x, y in zip(a, b)),  # inf (JSON null): identical
        "numpy_vs_torch_loop_latent_psnr_db": tensor_psnr(latents, pipe.final_latents),
    }
    try:
        from postdiff_openvino import OpenVINORunner
    except ImportError:
        out["openvino"] = "not installed"
        return out
    folder, manifest = read_manifest(bundle, "onnx")
    scores: dict[str, float] = {}

    class Both:
        ov, ort = OpenVINORunner(folder), OrtRunner(folder)

        def load(self, graph):
            pass

        def run(self, graph, feeds):
            x, y = self.ov.run(graph, feeds), self.ort.run(graph, feeds)
            s = min(tensor_psnr(x[n], y[n]) for n in graph.output_names)
            scores[graph.name] = min(s, scores.get(graph.name, float("inf")))
            return y

    BundlePipeline(folder, manifest, Both()).generate(conditions, seed=0)
    from postdiff_openvino import load_bundle as load_ov

    c = load_ov(bundle).generate(conditions, seed=0)
    out["openvino_f32_per_graph_min_psnr_db"] = min(scores.values())
    out["openvino_f32_per_graph_psnr_db"] = scores
    out["openvino_f32_image_psnr_db"] = min(psnr(x, y) for x, y in zip(c, a))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="reference,arch:sd15@256", help="model[@px] list (default: reference,arch:sd15@256)")
    ap.add_argument("--images", type=int, default=2, help="images per run (default: 2)")
    ap.add_argument("--out", default=str(HERE / "results" / "bundles.json"))
    ap.add_argument("--child", nargs=4, metavar=("KIND", "MODEL", "BUNDLE", "IMAGES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, model, bundle, images = args.child
        print(json.dumps(child(kind, model, bundle, int(images))))
        return 0
    from postdiff_lab.report import machine_info, write_json

    result = {"machine": machine_info(), "images_per_run": args.images, "precision": "fp32", "models": {}}
    lines = [
        "| model | bundle MB baseline | postdiff | ratio | ONNX peak RSS MB baseline | postdiff | ratio | "
        "ONNX --prepack MB baseline | postdiff | ratio | torch peak RSS MB baseline | postdiff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for item in args.models.split(","):
        model, _, px = item.partition("@")
        px = int(px) if px else None
        from postdiff.families.model import load_model

        row: dict = {"weights": load_model(model, need_pipeline=False).weights}
        folders = {plan: export(model, plan, px) for plan in PLANS}
        row["bytes"] = {plan: bundle_bytes(f) for plan, f in folders.items()}
        row["rss"] = {f"{kind}/{plan}": in_child(kind, model, folders[plan], args.images) for kind in KINDS for plan in PLANS}
        r = {k: v["peak_rss_mb"] for k, v in row["rss"].items()}
        from postdiff.bundle.manifest import read_manifest
        from postdiff.families.registry import family_named

        if family_named(read_manifest(folders["postdiff"], "onnx")[1].model["kind"]).generates:
            row["agreement"] = agreement(folders["postdiff"], args.images)
        result["models"][item] = row
        b = row["bytes"]
        lines.append(
            f"| {item} ({row['weights']} weights) | {b['baseline'] / 1e6:.2f} | {b['postdiff'] / 1e6:.2f} | {b['postdiff'] / b['baseline']:.3f} | "
            f"{r['onnx/baseline']:.0f} | {r['onnx/postdiff']:.0f} | {r['onnx/postdiff'] / r['onnx/baseline']:.2f} | "
            f"{r['onnx-prepack/baseline']:.0f} | {r['onnx-prepack/postdiff']:.0f} | "
            f"{r['onnx-prepack/postdiff'] / r['onnx-prepack/baseline']:.2f} | "
            f"{r['torch/baseline']:.0f} | {r['torch/postdiff']:.0f} |"
        )
        write_json(Path(args.out), result)
    print("\n".join(lines))
    for item, row in result["models"].items():
        if "agreement" in row:
            print(
                f"{item}: " + ", ".join(f"{k} {v:.1f}" for k, v in row["agreement"].items() if isinstance(v, float)) + " (inf: identical)"
            )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
