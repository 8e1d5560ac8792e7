"""The ``postdiff`` command.

    postdiff generate [--model M] [--prompt P] [--plan PLAN] [--seed S] [-o FILE]
    postdiff plan show|cost PLAN [--model M] [--height H --width W] [--steps N] [--json]
    postdiff demo

User errors print one line (``postdiff: error: ...``) and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"


def _common_model_args(p: argparse.ArgumentParser) -> None:
    from postdiff.models import DEFAULT_MODEL

    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"toy-sd, toy-sdxl, arch:sd15|sd21|sdxl, a local diffusers folder or a Hub id (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="number of inference steps (overrides the plan's)")
    p.add_argument(
        "--scheduler", default=None, help="diffusers scheduler class, e.g. DDIMScheduler, EulerDiscreteScheduler (default: the model's)"
    )


def build_parser() -> argparse.ArgumentParser:
    from postdiff.recipe import builtin_names

    plans = ", ".join(builtin_names())
    parser = argparse.ArgumentParser(prog="postdiff", description="Training-free diffusion acceleration: cheaper steps, not fewer.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image with a plan")
    _common_model_args(g)
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--plan", default="postdiff", help=f"built-in plan ({plans}) or a recipe JSON file (default: postdiff)")
    g.add_argument("--backend", default="torch", choices=["torch"], help="runtime (default: torch)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-o", "--output", default="postdiff.png", help="PNG file to write (default: postdiff.png)")

    p = sub.add_parser("plan", help="show a compiled plan or its cost")
    psub = p.add_subparsers(dest="plan_command", required=True)
    for name, text in (("show", "print the compiled per-step plan"), ("cost", "MACs per step, total, and the ratio to baseline")):
        q = psub.add_parser(name, help=text)
        q.add_argument("plan", help=f"built-in plan ({plans}) or a recipe JSON file")
        _common_model_args(q)
        q.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("demo", help="the main job: baseline and postdiff side by side on the default model")
    _common_model_args(d)
    d.add_argument("--plans", default="baseline,postdiff", help="comma-separated plans (default: baseline,postdiff)")
    d.add_argument("--seeds", type=int, default=4, help="images per plan (default: 4)")
    d.add_argument("-o", "--output", default="postdiff-demo.png", help="grid PNG to write")
    return parser


# -- helpers ----------------------------------------------------------------------------------------------------------
def _recipe(spec: str, steps: int | None):
    from postdiff import load_recipe

    recipe = load_recipe(spec)
    return recipe.with_steps(steps) if steps else recipe


def _compile(args, spec: str, model=None):
    from postdiff.models import load_model
    from postdiff.sampling import compile_for_scheduler

    model = model or load_model(args.model)
    latent_hw = model.latent_hw(args.height, args.width)
    recipe = _recipe(spec, args.steps)
    plan = compile_for_scheduler(recipe, model.scheduler(args.scheduler), latent_hw, model.spec())
    return model, plan


def _fmt_macs(m: int) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if m >= div:
            return f"{m / div:.2f}{unit}"
    return str(m)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


# -- commands -----------------------------------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    from postdiff.cost import MacCounter, plan_cost

    model, plan = _compile(args, args.plan)
    if args.plan_command == "show":
        if args.json:
            print(plan.to_json())
            return 0
        print(
            f"plan {plan.name} for {model.name}: {len(plan.steps)} UNet calls, latent {plan.latent_hw[0]}x{plan.latent_hw[1]}, {plan.scheduler}"
        )
        _print_table(
            ["step", "inference step", "timestep", "latent", "unet", "guidance", "xattn", "events"],
            [
                (
                    s.index,
                    s.inference_step,
                    f"{s.timestep:g}",
                    f"{s.latent_hw[0]}x{s.latent_hw[1]}",
                    s.unet,
                    s.guidance,
                    s.xattn,
                    ",".join(s.events),
                )
                for s in plan.steps
            ],
        )
        return 0
    _, baseline = _compile(args, "baseline", model)
    block = plan.recipe.deepcache.block if plan.recipe.deepcache else 0
    counter = MacCounter(model.unet_config, block=block, text_len=model.text_len, pooled_dim=model.pooled_dim)
    cost = plan_cost(plan, counter, baseline)
    h, w = plan.latent_hw[0] * model.vae_scale_factor, plan.latent_hw[1] * model.vae_scale_factor
    if args.json:
        print(
            json.dumps(
                {
                    "model": model.name,
                    "height": h,
                    "width": w,
                    "scheduler": plan.scheduler,
                    "steps_requested": plan.recipe.steps,
                    **cost.to_dict(),
                },
                indent=2,
            )
        )
        return 0
    print(f"plan {plan.name} on {model.name} at {h}x{w}, {plan.recipe.steps} steps ({plan.scheduler}); MACs of the UNet, CFG batch 2")
    groups: dict[tuple, list] = {}
    for s in cost.steps:
        groups.setdefault((s.variant, s.latent_hw, s.batch), []).append(s)
    _print_table(
        ["variant", "latent", "batch", "calls", "MACs per call", "MACs total"],
        [
            (v, f"{hw[0]}x{hw[1]}", b, len(ss), _fmt_macs(ss[0].macs), _fmt_macs(sum(x.macs for x in ss)))
            for (v, hw, b), ss in groups.items()
        ],
    )
    print(
        f"total {_fmt_macs(cost.total_macs)} MACs; baseline {_fmt_macs(cost.baseline_macs)}; ratio {cost.ratio:.3f} ({cost.reduction:.1%} fewer MACs, {1 / cost.ratio:.2f}x)"
    )
    return 0


def _generate_images(pipe, recipe, prompts_seeds, args, torch):
    import postdiff

    postdiff.apply(pipe, recipe)
    images = []
    start = time.perf_counter()
    for prompt, seed in prompts_seeds:
        out = pipe(
            prompt,
            negative_prompt=getattr(args, "negative_prompt", None),
            height=args.height,
            width=args.width,
            guidance_scale=getattr(args, "guidance", 7.5),
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
        images.append(out.images[0])
    return images, time.perf_counter() - start


def cmd_generate(args) -> int:
    import torch

    import postdiff
    from postdiff.images import save_png
    from postdiff.models import load_model

    model = load_model(args.model, need_pipeline=True)
    pipe = model.pipeline
    if args.scheduler:
        pipe.scheduler = model.scheduler(args.scheduler)
    recipe = _recipe(args.plan, args.steps)
    images, seconds = _generate_images(pipe, recipe, [(args.prompt, args.seed)], args, torch)
    postdiff.remove(pipe)
    path = save_png(images[0], args.output)
    print(f"wrote {path} ({model.name}, plan {recipe.label}, {recipe.steps} steps, seed {args.seed}, {seconds:.2f} s)")
    return 0


def cmd_demo(args) -> int:
    import torch

    import postdiff
    from postdiff.cost import MacCounter, plan_cost
    from postdiff.images import save_grid
    from postdiff.metrics import psnr
    from postdiff.models import load_model

    model = load_model(args.model, need_pipeline=True)
    pipe = model.pipeline
    if args.scheduler:
        pipe.scheduler = model.scheduler(args.scheduler)
    names = [n.strip() for n in args.plans.split(",") if n.strip()]
    if "baseline" not in names:
        names.insert(0, "baseline")
    prompts = ["a red apple on a table", "a lighthouse at dusk", "a cat wearing sunglasses", "a bowl of ramen"]
    jobs = [(prompts[i % len(prompts)], i) for i in range(args.seeds)]
    _, base_plan = _compile(args, "baseline", model)
    rows, labels, table, ref, base_time = [], [], [], None, None
    # warm-up so the first plan measured does not pay one-off costs
    _generate_images(pipe, _recipe("baseline", 2), jobs[:1], args, torch)
    for name in names:
        _, plan = _compile(args, name, model)
        counter = MacCounter(
            model.unet_config,
            block=plan.recipe.deepcache.block if plan.recipe.deepcache else 0,
            text_len=model.text_len,
            pooled_dim=model.pooled_dim,
        )
        ratio = plan_cost(plan, counter, base_plan).ratio
        images, seconds = _generate_images(pipe, plan.recipe, jobs, args, torch)
        if ref is None:
            ref, base_time = images, seconds
        fid = sum(min(psnr(a, b), 100.0) for a, b in zip(images, ref)) / len(images)
        table.append((name, f"{ratio:.3f}", f"{seconds:.2f}", f"{base_time / seconds:.2f}x", "identical" if fid >= 100 else f"{fid:.1f}"))
        rows.append(images)
        labels.append(name)
    postdiff.remove(pipe)
    path = save_grid(rows, args.output, row_labels=labels, scale=max(1, 128 // rows[0][0].shape[0]))
    print(f"PostDiff demo on {model.name} ({len(jobs)} images per plan, {base_plan.recipe.steps} steps, {base_plan.scheduler}, CPU)")
    _print_table(["plan", "MACs vs baseline", "seconds", "speedup", "PSNR vs baseline (dB)"], table)
    print(f"wrote {path}")
    if model.name.startswith("toy"):
        print("note: the toy model has random weights: speed and cost are real, the pictures are not meaningful")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from postdiff.errors import PostDiffError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "demo":
            return cmd_demo(args)
    except PostDiffError as exc:
        print(f"postdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("postdiff: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
