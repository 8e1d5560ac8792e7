"""Torch CPU benchmark of a plan against baseline: each UNet variant at each latent size, then whole plans.

    python benchmarks/bench_torch_cpu.py                       # arch:sd15 (random weights), 256 and 512 px
    python benchmarks/bench_torch_cpu.py --model toy-sd --sizes 32 --plan-runs 2   # a quick smoke run

For every image size it (1) times every (variant, latent size, batch) the plan uses, plus the baseline's full
pass, after a warm-up call; (2) times the whole plan and the whole baseline with ``run_plan`` (UNet only:
random text embeddings stand in for the text encoder, no VAE), alternating plan and baseline runs; and
reports the measured speedup next to the MACs speedup and their quotient (the "efficiency": 1.0 means the
wall clock follows the MACs exactly). Results go to a JSON file (written after every measurement, so a run
cut short keeps what it measured) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from postdiff import Conditioning, TorchDenoiser, UNetSplit, compile_for_scheduler, load_recipe, run_plan
from postdiff.families.model import load_model
from postdiff.plan.compiler import step_batch
from postdiff.plan.cost import plan_cost
from postdiff_lab.report import machine_info, write_json

HERE = Path(__file__).resolve().parent


def random_conditioning(model, batch: int, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    dim = int(model.unet_config["cross_attention_dim"])
    ehs = torch.randn(2 * batch, model.text_len, dim, generator=g)
    extra = {}
    if model.unet_config.get("addition_embed_type") == "text_time":
        extra = {"text_embeds": torch.randn(2 * batch, model.pooled_dim, generator=g)}
    return Conditioning(ehs, has_uncond=True, **extra)


def with_time_ids(cond: Conditioning, latent_hw, f: int) -> Conditioning:
    if cond.text_embeds is None:
        return cond
    h, w = latent_hw[0] * f, latent_hw[1] * f
    ids = torch.tensor([[h, w, 0, 0, h, w]] * cond.batch, dtype=torch.float32)
    return Conditioning(cond.encoder_hidden_states, cond.has_uncond, cond.text_embeds, ids)


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="arch:sd15")
    ap.add_argument("--plan", default="postdiff")
    ap.add_argument("--sizes", default="256,512", help="image sizes in pixels (square)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variant-runs", type=int, default=2, help="timed calls per variant (after one warm-up)")
    ap.add_argument("--plan-runs", type=int, default=1, help="timed whole runs per plan and size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--cpu-conv",
        default="onednn",
        choices=["onednn", "native", "auto"],
        help="CPU convolution path (postdiff/cpu_conv.py; default: onednn)",
    )
    ap.add_argument("--out", default=str(HERE / "results" / "torch_cpu_sd15.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variant_runs < 1 or args.plan_runs < 1:
        ap.error("--variant-runs and --plan-runs must be at least 1")

    model = load_model(args.model)
    t0 = time.perf_counter()
    unet = model.pipeline.unet if model.pipeline is not None else model.build_unet()
    build_s = time.perf_counter() - t0
    recipe = load_recipe(args.plan).with_steps(args.steps)
    base_recipe = load_recipe("baseline").with_steps(args.steps)
    counter = model.mac_counter(recipe)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": f"{model.name} ({'random weights, seed 0' if model.weights == 'random' else model.weights + ' weights'})",
        "plan": recipe.to_dict(),
        "scheduler": "DDIMScheduler",
        "machine": machine_info(),
        "unet_build_s": round(build_s, 2),
        "cpu_conv": args.cpu_conv,
        "sizes": {},
    }
    out_path = Path(args.out)

    def save() -> None:
        write_json(out_path, result)

    spec = model.spec()
    f = model.vae_scale_factor
    with UNetSplit(unet, block=recipe.cache_block, cpu_conv=args.cpu_conv) as split, torch.no_grad():
        for px in [int(s) for s in args.sizes.split(",")]:
            latent = (px // f, px // f)
            plan = compile_for_scheduler(recipe, model.scheduler("DDIMScheduler"), latent, spec)
            base = compile_for_scheduler(base_recipe, model.scheduler("DDIMScheduler"), latent, spec)
            cost = plan_cost(plan, counter, base)
            entry = {"latent": list(latent), "macs_ratio": cost.ratio, "variants": [], "whole": {}}
            result["sizes"][str(px)] = entry
            cond2 = random_conditioning(model, 1)
            # (1) every variant the plan (and baseline) uses, each at its latent size and batch
            needed = []
            for s in (*base.steps, *plan.steps):
                key = (s.variant, s.latent_hw, step_batch(s.guidance))
                if key not in needed:
                    needed.append(key)
            for variant, hw, batch in needed:
                cond = cond2 if batch == 2 else cond2.cond_half()
                cond = with_time_ids(cond, hw, f)
                x = torch.randn(batch, 4, *hw, generator=torch.Generator().manual_seed(1))
                t = torch.tensor(500)
                kw = dict(
                    sample=x,
                    timestep=t,
                    encoder_hidden_states=cond.encoder_hidden_states,
                    text_embeds=cond.text_embeds,
                    time_ids=cond.time_ids,
                )
                probe = split.forward("full_capture", **kw)
                if variant.startswith("shallow"):
                    kw["deep"] = probe[1]
                if variant.endswith("_cached"):
                    kw["xattn"] = [probe[2 + i] for i in split.xattn_indices(variant)]
                del probe
                split.forward(variant, **kw)  # warm-up (with --cpu-conv auto, also the choice of path)
                times = timed(lambda v=variant, k=kw: split.forward(v, **k), args.variant_runs)
                row = {
                    "variant": variant,
                    "latent": list(hw),
                    "batch": batch,
                    "macs": counter.macs(variant, hw, batch),
                    "median_s": statistics.median(times),
                    "runs_s": times,
                }
                entry["variants"].append(row)
                print(
                    f"[{px}px] {variant:15s} {hw[0]}x{hw[1]} b{batch}: {row['median_s']:.3f} s  ({row['macs'] / 1e9:.1f} GMACs)", flush=True
                )
                save()
            full = next(r for r in entry["variants"] if r["variant"] == "full" and tuple(r["latent"]) == latent and r["batch"] == 2)
            by_key = {(r["variant"], tuple(r["latent"]), r["batch"]): r for r in entry["variants"]}
            predicted = sum(by_key[(s.variant, s.latent_hw, step_batch(s.guidance))]["median_s"] for s in plan.steps)
            entry["predicted_from_variants"] = {"plan_s": predicted, "baseline_s": full["median_s"] * len(base.steps)}
            save()
            # (2) whole runs, alternating baseline and plan
            den = TorchDenoiser(split)
            runs: dict[str, list[float]] = {"baseline": [], plan.name: []}
            for _ in range(args.plan_runs):
                for name, p in (("baseline", base), (plan.name, plan)):
                    sch = model.scheduler("DDIMScheduler")
                    g = torch.Generator().manual_seed(0)
                    t = time.perf_counter()
                    run_plan(p, den, sch, with_time_ids(cond2, latent, f), generator=g, progress=False)
                    runs[name].append(time.perf_counter() - t)
                    print(f"[{px}px] whole {name}: {runs[name][-1]:.1f} s", flush=True)
                    entry["whole"] = {k: {"median_s": statistics.median(v), "runs_s": v} for k, v in runs.items() if v}
                    save()
            speedup = statistics.median(runs["baseline"]) / statistics.median(runs[plan.name])
            entry["speedup"] = speedup
            entry["macs_speedup"] = 1 / cost.ratio
            entry["efficiency"] = speedup * cost.ratio
            save()

    print()
    print(
        f"Torch CPU benchmark: {result['model']}, plan {recipe.label}, {args.steps} DDIM steps, CFG, {machine_info()['cpu']}, {args.threads} threads, CPU convolutions: {args.cpu_conv}"
    )
    print("| size | variant | latent | batch | GMACs | median s | s per GMAC (ms) |")
    print("|---|---|---|---|---|---|---|")
    for px, e in result["sizes"].items():
        for r in e["variants"]:
            print(
                f"| {px} | {r['variant']} | {r['latent'][0]}x{r['latent'][1]} | {r['batch']} | {r['macs'] / 1e9:.1f} | {r['median_s']:.3f} | {1e3 * r['median_s'] / (r['macs'] / 1e9):.2f} |"
            )
    print()
    print(f"| size | baseline s | {recipe.label} s | speedup | MACs speedup | efficiency (speedup x MACs ratio) | runs |")
    print("|---|---|---|---|---|---|---|")
    for px, e in result["sizes"].items():
        w = e["whole"]
        print(
            f"| {px} | {w['baseline']['median_s']:.1f} | {w[recipe.label]['median_s']:.1f} | {e['speedup']:.2f}x | "
            f"{e['macs_speedup']:.2f}x | {e['efficiency']:.2f} | {args.plan_runs} |"
        )
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
