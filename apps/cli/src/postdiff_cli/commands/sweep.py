"""``postdiff sweep``: fewer steps or cheaper steps? The best plan of each family at each MACs budget."""

from __future__ import annotations

from ..common import grid_args, numbers, ran_on, run_search, search_args
from ..render import print_table


def add_parser(sub) -> None:
    w = sub.add_parser("sweep", help="fewer steps or cheaper steps? The best plan of each family at each MACs budget")
    search_args(w)
    w.add_argument(
        "--budgets", default="0.3,0.4,0.5,0.6", help="comma-separated fractions of the baseline's MACs (default: 0.3,0.4,0.5,0.6)"
    )
    w.add_argument("--calibration", type=int, default=100, help="calibration samples per candidate plan (default: 100)")
    w.add_argument("--samples", type=int, default=500, help="held-out samples for each budget's winners and the baseline (default: 500)")
    grid_args(w)
    w.add_argument("--json", default="postdiff-sweep.json", help="JSON results file (default: postdiff-sweep.json)")
    w.add_argument("--plot", default="postdiff-sweep.png", help="Pareto plot PNG (default: postdiff-sweep.png)")


def run(args) -> int:
    from postdiff_lab.report import write_json
    from postdiff_lab.search import PAPER_SWITCH, check_budget, pareto_plot, sweep

    budgets = numbers(args.budgets, "--budgets")
    for b in budgets:
        check_budget(b)
    result = run_search(args, sweep, budgets, samples=args.samples)
    print(
        f"postdiff sweep on {result['model']} ({ran_on(result['torch'])}): {result['metric']} on {args.samples} held-out samples (plans chosen on {args.calibration} "
        f"calibration samples); baseline {result['baseline']['holdout']:.4g}"
    )

    def cell(c):
        if not c:
            return "-"
        accuracy = f", {100 * c['holdout_accuracy']:.1f}%" if "holdout_accuracy" in c else ""  # class models
        return f"{c['name']} ({c['macs_ratio']:.3f}): {c['holdout']:.4g}{accuracy}"

    paper = any(PAPER_SWITCH in r for r in result["rows"])  # --shifts: the paper's switch beside the shifted ones
    print_table(
        [
            "budget",
            "fewer steps (MACs): quality",
            "cheaper steps (MACs): quality",
            *(["cheaper steps, paper's switch"] if paper else []),
            "better",
        ],
        [
            (
                f"{r['budget']:g}",
                cell(r["fewer-steps"]),
                cell(r["cheaper-steps"]),
                *([cell(r.get(PAPER_SWITCH))] if paper else []),
                r["winner"] or "-",
            )
            for r in result["rows"]
        ],
    )
    write_json(args.json, result)
    pareto_plot(result, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0
