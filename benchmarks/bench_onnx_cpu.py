"""ONNX Runtime vs PyTorch on this CPU: per-call latency of every exported graph, and whole plans on ORT.

    python benchmarks/bench_onnx_cpu.py --size 256                     # arch:sd15 (random weights), 256 px
    python benchmarks/bench_onnx_cpu.py --model reference --images 100 --out benchmarks/results/onnx_cpu_reference.json

(1) Exports the plan's bundle (cached under benchmarks/.bundles/, reused when present). (2) For every (UNet
variant, latent size, batch) the plan and the baseline use, times the same inputs through the PyTorch module and
the ONNX Runtime session (CPU provider), same thread count, in blocks of calls after a warm-up, alternating for --rounds rounds. (3) Times the
whole plan and the whole baseline through ``run_plan`` on ORT (``GraphDenoiser``) and on PyTorch
(``TorchDenoiser``), alternating: UNet only, random conditioning of the model's shape, ``--images`` images per
call with CFG, --plan-runs times each after --plan-warmup untimed runs (sessions open on first use). Reports the speedup of the medians against the MACs speedup ("efficiency" =
speedup x MACs ratio; 1.0 means the wall clock follows the MACs) and the same from the fastest run of each ("fastest
runs") and the median over pairs of a baseline run and the plan run right after it ("paired runs"). JSON is rewritten after every measurement; a Markdown table goes to stdout.

    python benchmarks/bench_onnx_cpu.py --model reference --images 10 --plan-runs 9 --out benchmarks/results/onnx_cpu_reference_b20.json

--prepack adds a third backend to the per-graph calls and the whole runs, ORT sessions made with the runtime's
``--prepack`` option (per-session weight re-layout and pre-packing, ORT's own default), so that its speed is measured beside the
runtime's default sessions (``onnx``: pre-packed below 256 MB of weights, else every session on the bundle's one
copy). In results of 2026-12-04 and before, ``onnx`` is pre-packed and ``onnx-low-memory`` the shared sessions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from postdiff import Conditioning, TorchDenoiser, UNetSplit, compile_for_scheduler, load_recipe, run_plan
from postdiff.bundle.manifest import read_manifest
from postdiff.bundle.runtime import GraphDenoiser
from postdiff.families.model import load_model
from postdiff.plan.compiler import step_batch
from postdiff.plan.cost import plan_cost
from postdiff_lab.report import machine_info, write_json
from postdiff_onnx.export import export_onnx
from postdiff_onnx.runtime import OrtRunner

HERE = Path(__file__).resolve().parent


def conditioning(model, images: int, latent_hw, seed: int = 0) -> Conditioning:
    """Random conditioning of the model's shape (CFG batch: 2 x images), SDXL size ids for ``latent_hw``."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * images
    ehs = torch.randn(n, model.text_len, int(model.unet_config["cross_attention_dim"]), generator=g)
    if model.unet_config.get("addition_embed_type") != "text_time":
        return Conditioning(ehs, has_uncond=True)
    h, w = latent_hw[0] * model.vae_scale_factor, latent_hw[1] * model.vae_scale_factor
    ids = torch.tensor([[h, w, 0, 0, h, w]] * n, dtype=torch.float32)
    return Conditioning(ehs, has_uncond=True, text_embeds=torch.randn(n, model.pooled_dim, generator=g), time_ids=ids)


def blocks(fns: dict, runs: int, rounds: int = 2) -> dict[str, list[float]]:
    """Time each function in blocks (one warm-up, then ``runs`` calls), in turn, ``rounds`` times.

    Blocks rather than call-by-call alternation: torch's OpenMP workers and ORT's thread pool each keep spinning
    for a while after a call, so alternating single calls makes each slow the other down."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                out[k].append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="arch:sd15")
    ap.add_argument("--plan", default="postdiff")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (square); default: the model's")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=1, help="images per UNet call (the CFG batch is twice this)")
    ap.add_argument("--variant-runs", type=int, default=3, help="timed calls per graph, backend and round (after a warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of blocks per graph: torch's block, then ORT's, this many times")
    ap.add_argument("--plan-runs", type=int, default=3, help="timed whole runs per plan and backend (alternating); 0: none")
    ap.add_argument("--plan-warmup", type=int, default=1, help="untimed whole runs per plan and backend first (sessions open on first use)")
    ap.add_argument("--graphs", default=None, help="comma-separated UNet variants to time per call (default: every one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--prepack",
        action="store_true",
        help="also time each graph and whole runs on ORT --prepack sessions (adds onnx-prepack to --backends)",
    )
    ap.add_argument(
        "--backends",
        default="torch,onnx",
        help="comma-separated backends of the whole runs: torch, onnx, onnx-prepack (default: torch,onnx)",
    )
    ap.add_argument("--weights", default="fp32", help="weights of the exported bundle: fp32, fp16, int8, int4 (default: fp32)")
    ap.add_argument(
        "--bundle", default=None, help="bundle folder (default: benchmarks/.bundles/<model>-<plan>-<size>[-<weights>]; exported if missing)"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "onnx_cpu_sd15_256.json"))
    args = ap.parse_args(argv)
    if min(args.variant_runs, args.rounds, args.images, args.threads) < 1 or min(args.plan_runs, args.plan_warmup) < 0:
        ap.error("--variant-runs, --rounds, --images and --threads must be at least 1, --plan-runs and --plan-warmup at least 0")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] + (["onnx-prepack"] if args.prepack else [])
    if not backends or set(backends) - {"torch", "onnx", "onnx-prepack"}:
        ap.error(f"--backends takes torch and/or onnx (and onnx-prepack), comma-separated; got {args.backends!r}")
    torch.set_num_threads(args.threads)

    model = load_model(args.model, need_pipeline=None)
    px = args.size or model.default_latent * model.vae_scale_factor
    latent = model.latent_hw(px, px)
    recipe = load_recipe(args.plan).with_steps(args.steps)
    base_recipe = load_recipe("baseline").with_steps(args.steps)
    spec = model.spec()
    plan = compile_for_scheduler(recipe, model.scheduler("DDIMScheduler"), latent, spec)
    base = compile_for_scheduler(base_recipe, model.scheduler("DDIMScheduler"), latent, spec)
    counter = model.mac_counter(recipe)
    cost = plan_cost(plan, counter, base, images=args.images)

    suffix = "" if args.weights == "fp32" else f"-{args.weights}"
    bundle = Path(args.bundle or HERE / ".bundles" / f"{args.model.replace(':', '-')}-{recipe.label}-{px}{suffix}")
    t0 = time.perf_counter()
    if not (bundle / "manifest.json").is_file():
        export_onnx(model, args.plan, bundle, height=px, width=px, steps=args.steps, scheduler="DDIMScheduler", weights=args.weights)
    export_s = time.perf_counter() - t0
    folder, manifest = read_manifest(bundle, "onnx")
    runner = OrtRunner(folder, threads=args.threads)
    # --prepack: the same graphs on sessions that pre-pack their own copy of the weights, timed per call and whole
    prepack_runner = OrtRunner(folder, threads=args.threads, prepack=True) if "onnx-prepack" in backends else None

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": f"{model.name} ({'random weights, seed 0' if model.weights == 'random' else model.weights + ' weights'})",
        "image_px": px,
        "latent": list(latent),
        "images_per_call": args.images,
        "plan": recipe.to_dict(),
        "scheduler": "DDIMScheduler",
        "machine": machine_info(),
        "threads": args.threads,
        "prepack_sessions_timed": args.prepack,
        "plan_warmup_runs": args.plan_warmup,
        "onnxruntime_provider": "CPUExecutionProvider",
        "bundle": str(bundle),
        "export_s": round(export_s, 1),
        "macs_ratio": cost.ratio,
        "graphs": [],
        "whole": {},
    }
    out_path = Path(args.out)

    def save() -> None:
        write_json(out_path, result)

    unet = model.network()
    with UNetSplit(unet, block=recipe.cache_block) as split, torch.no_grad():
        needed = []
        for s in (*base.steps, *plan.steps):
            key = (s.variant, s.latent_hw, step_batch(s.guidance, args.images))
            if key not in needed:
                needed.append(key)
        if args.graphs:
            wanted, variants = set(args.graphs.split(",")), {v for v, _, _ in needed}
            if wanted - variants:
                ap.error(f"--graphs: {', '.join(sorted(wanted - variants))} not among this plan's variants ({', '.join(sorted(variants))})")
            needed = [k for k in needed if k[0] in wanted]
        for variant, hw, batch in needed:
            module = split.module(variant)
            ins = module.example_inputs(hw, batch, text_len=model.text_len, pooled_dim=model.pooled_dim)
            feeds = {k: v.numpy() for k, v in ins.items()}
            graph = manifest.unet_graph(variant, hw)
            session = runner.session(graph)
            fns = {"torch": lambda m=module, i=ins: m(*i.values()), "onnx": lambda s=session, f=feeds: s.run(None, f)}
            if prepack_runner is not None:
                fns["onnx-prepack"] = lambda s=prepack_runner.session(graph), f=feeds: s.run(None, f)
            t = time.perf_counter()
            times = blocks(fns, args.variant_runs, args.rounds)
            row = {
                "graph": graph.name,
                "latent": list(hw),
                "batch": batch,
                "macs": counter.macs(variant, hw, batch),
                "torch_median_s": statistics.median(times["torch"]),
                "onnx_median_s": statistics.median(times["onnx"]),
                "torch_runs_s": times["torch"],
                "onnx_runs_s": times["onnx"],
            }
            if "onnx-prepack" in times:
                row["onnx_prepack_median_s"] = statistics.median(times["onnx-prepack"])
                row["onnx_prepack_runs_s"] = times["onnx-prepack"]
            row["onnx_vs_torch"] = row["torch_median_s"] / row["onnx_median_s"]
            row["onnx_vs_torch_min"] = min(times["torch"]) / min(times["onnx"])
            result["graphs"].append(row)
            print(
                f"{graph.name:20s} {hw[0]}x{hw[1]} b{batch}: torch {row['torch_median_s']:.4f} s, onnx {row['onnx_median_s']:.4f} s "
                f"({row['onnx_vs_torch']:.2f}x; fastest calls {row['onnx_vs_torch_min']:.2f}x)  [{time.perf_counter() - t:.0f} s]",
                flush=True,
            )
            save()

        cond = conditioning(model, args.images, latent)
        make = {
            "torch": lambda: TorchDenoiser(split),
            "onnx": lambda: GraphDenoiser(manifest, runner),
            "onnx-prepack": lambda: GraphDenoiser(manifest, prepack_runner),
        }
        denoisers = {b: make[b]() for b in dict.fromkeys(backends)}
        # a scheduler per backend and plan, made before the clock starts (building one, its beta table, is not
        # denoising); run_plan sets its timesteps afresh on every run
        schedulers = {(b, n): model.scheduler("DDIMScheduler") for b in denoisers for n in ("baseline", plan.name)}
        runs: dict[str, list[float]] = {}
        for run in range(args.plan_warmup + args.plan_runs if args.plan_runs else 0):
            timed = run >= args.plan_warmup
            for backend, den in denoisers.items():
                for name, p in (("baseline", base), (plan.name, plan)):
                    g = torch.Generator().manual_seed(0)
                    t = time.perf_counter()
                    run_plan(
                        p,
                        den,
                        schedulers[backend, name],
                        cond,
                        generator=g,
                        channels=int(model.unet_config.get("in_channels", 4)),
                        progress=False,
                    )
                    seconds = time.perf_counter() - t
                    print(f"whole {backend}/{name}: {seconds:.2f} s{'' if timed else ' (warm-up, not counted)'}", flush=True)
                    if not timed:
                        continue
                    runs.setdefault(f"{backend}/{name}", []).append(seconds)
                    result["whole"] = {k: {"median_s": statistics.median(v), "runs_s": v} for k, v in runs.items()}
                    save()
        if args.plan_runs:
            for backend in denoisers:
                base_run, plan_run = result["whole"][f"{backend}/baseline"], result["whole"][f"{backend}/{plan.name}"]
                result[f"{backend}_speedup"] = base_run["median_s"] / plan_run["median_s"]
                result[f"{backend}_efficiency"] = result[f"{backend}_speedup"] * cost.ratio
                result[f"{backend}_efficiency_fastest_runs"] = min(base_run["runs_s"]) / min(plan_run["runs_s"]) * cost.ratio
                # each baseline run over the plan run right after it: drift of the machine's speed cancels in a pair
                paired = [b / p for b, p in zip(base_run["runs_s"], plan_run["runs_s"])]
                result[f"{backend}_efficiency_paired"] = statistics.median(paired) * cost.ratio
            save()

    print()
    print(
        f"ONNX Runtime vs PyTorch: {result['model']}, {px} px, plan {recipe.label}, {args.steps} DDIM steps, CFG, "
        f"{args.images} image(s) per call, {machine_info()['cpu']}, {args.threads} threads, N={args.rounds * args.variant_runs} per graph and backend ({args.rounds} alternating rounds)"
    )
    packed = prepack_runner is not None
    print(
        "| graph | latent | batch | GMACs | torch s | ORT s | ORT speedup over torch | fastest calls |"
        + (" ORT pre-packed s |" if packed else "")
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|" if packed else ""))
    for r in result["graphs"]:
        print(
            f"| {r['graph']} | {r['latent'][0]}x{r['latent'][1]} | {r['batch']} | {r['macs'] / 1e9:.2f} | {r['torch_median_s']:.4f} | "
            f"{r['onnx_median_s']:.4f} | {r['onnx_vs_torch']:.2f}x | {r['onnx_vs_torch_min']:.2f}x |"
            + (f" {r['onnx_prepack_median_s']:.4f} |" if packed else "")
        )
    if not args.plan_runs:
        print(f"\nwrote {out_path} (no whole runs: --plan-runs 0)")
        return 0
    print()
    print(f"| backend | baseline s | {recipe.label} s | speedup | MACs speedup | efficiency | fastest runs | paired runs | runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend in denoisers:
        w = result["whole"]
        print(
            f"| {backend} | {w[f'{backend}/baseline']['median_s']:.2f} | {w[f'{backend}/{plan.name}']['median_s']:.2f} | "
            f"{result[f'{backend}_speedup']:.2f}x | {1 / cost.ratio:.2f}x | {result[f'{backend}_efficiency']:.2f} | "
            f"{result[f'{backend}_efficiency_fastest_runs']:.2f} | {result[f'{backend}_efficiency_paired']:.2f} | {args.plan_runs} |"
        )
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
