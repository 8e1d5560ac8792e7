"""``postdiff plan show|cost|search``: a compiled plan, its cost, or the best plan under a MACs budget."""

from __future__ import annotations

import json
import sys

from ..common import grid_args, make_source, model_args, plans_help, run_search, search_args, warn
from ..render import fmt_macs, print_table


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="show a compiled plan or its cost, or search for the best plan under a budget")
    psub = p.add_subparsers(dest="plan_command", required=True)
    for name, text in (("show", "print the compiled per-step plan"), ("cost", "MACs per step, total, and the ratio to baseline")):
        q = psub.add_parser(name, help=text)
        q.add_argument("plan", help=f"built-in plan ({plans_help()}) or a recipe JSON file")
        model_args(q)
        q.add_argument("--json", action="store_true", help="machine-readable output")

    q = psub.add_parser("search", help="the best plan under a MACs budget, chosen on a calibration set (a recipe JSON)")
    search_args(q)
    q.add_argument("--budget", type=float, required=True, help="MACs as a fraction of the 20-step baseline, in (0, 1]")
    q.add_argument("--calibration", type=int, default=100, help="calibration samples per candidate plan (default: 100)")
    q.add_argument("--holdout", type=int, default=500, help="held-out samples for the best --top plans (default: 500; 0 skips)")
    q.add_argument("--top", type=int, default=5, help="plans checked on the held-out samples (default: 5)")
    grid_args(q)
    q.add_argument("-o", "--output", default=None, help="write the chosen recipe JSON here (default: print it)")
    q.add_argument("--json", default=None, help="write the whole search (every candidate, the agreement) as JSON to this file")


def run(args) -> int:
    if args.plan_command == "search":
        return _search(args)
    source = make_source(args, need_pipeline=False)
    model = source.model
    plan = source.compile(args.plan, args.steps)
    warn(model.untrained_warning(plan))
    if args.plan_command == "show":
        if args.json:
            print(plan.to_json())
            return 0
        spec = model.spec()
        embedded = spec.guidance_embedded
        print(
            f"plan {plan.name} for {model.name}: {len(plan.steps)} {_network(spec)} calls, latent {plan.latent_hw[0]}x{plan.latent_hw[1]}, {plan.scheduler}"
            + ("; guidance embedded in the UNet (one branch per step: 'cfg' marks the steps before the gate)" if embedded else "")
        )
        shifted = any(s.schedule_index is not None for s in plan.steps)  # a shifted switch: where each call sits
        blocks = _transformer_columns(spec, plan) if spec.is_transformer else None
        rows = [
            (
                s.index,
                *([s.scheduler_index] if shifted else []),
                s.inference_step,
                f"{s.timestep:g}",
                f"{s.latent_hw[0]}x{s.latent_hw[1]}",
                *(blocks(s) if blocks else ()),
                s.unet,
                s.guidance,
                s.xattn,
                ",".join(s.events),
            )
            for s in plan.steps
        ]
        head = [
            "step",
            *(["schedule index"] if shifted else []),
            "inference step",
            "timestep",
            "latent",
            *(["patches", "blocks run"] if blocks else []),
            "unet",
            "guidance",
            "xattn",
            "events",
        ]
        print_table(head, rows)
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
    batch = "one branch per step (guidance embedded)" if model.spec().guidance_embedded else "CFG batch 2"
    print(
        f"plan {plan.name} on {model.name} at {h}x{w}, {plan.recipe.steps} steps ({plan.scheduler}); MACs of the {_network(model.spec())}, {batch}"
    )
    groups: dict[tuple, list] = {}
    for s in cost.steps:
        groups.setdefault((s.variant, s.latent_hw, s.batch), []).append(s)
    print_table(
        ["variant", "latent", "batch", "calls", "MACs per call", "MACs total"],
        [(v, f"{hw[0]}x{hw[1]}", b, len(ss), fmt_macs(ss[0].macs), fmt_macs(sum(x.macs for x in ss))) for (v, hw, b), ss in groups.items()],
    )
    print(
        f"total {fmt_macs(cost.total_macs)} MACs; baseline {fmt_macs(cost.baseline_macs)}; ratio {cost.ratio:.3f} ({cost.reduction:.1%} fewer MACs, {1 / cost.ratio:.2f}x)"
    )
    return 0


def _network(spec) -> str:
    return "transformer" if spec.is_transformer else "UNet"


def _transformer_columns(spec, plan):
    """A step's (patches, blocks run) on a transformer: the token grid at the step's latent size, and which blocks
    compute (a shallow step adds the residual kept for the cached span instead of running it)."""
    from postdiff.plan.compiler import block_span

    p, n = spec.downsample_factor, spec.num_layers
    a, b = block_span(n, plan.recipe.cache_block, plan.recipe.cache_span)

    def columns(step):
        gh, gw = step.latent_hw[0] // p, step.latent_hw[1] // p
        if step.unet == "full":
            run = f"0-{n - 1}"
        else:
            outside = [f"0-{a - 1}" if a > 1 else "0"] if a > 0 else []
            outside += [f"{b}-{n - 1}" if b < n - 1 else f"{b}"] if b < n else []
            run = ",".join(outside) + f" (+kept {a}-{b - 1})"
        return (f"{gh}x{gw}={gh * gw}", run)

    return columns


def _search(args) -> int:
    from postdiff.plan.recipe import Recipe
    from postdiff_lab.report import write_json
    from postdiff_lab.search import check_budget, search

    check_budget(args.budget)
    result = run_search(args, search, args.budget, holdout=args.holdout, top=args.top)
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
        print_table(
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
