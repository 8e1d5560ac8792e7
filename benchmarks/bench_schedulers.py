"""Every scheduler users pick, on an embedded model: what the baseline and the ``postdiff`` plan give with each, and
the paper's question (cheaper steps or fewer steps?) per solver.

    python benchmarks/bench_schedulers.py check [--model reference] [--samples 300] [--seed 11]
    python benchmarks/bench_schedulers.py solvers [--model reference] [--samples 2000] [--budgets 0.25,0.4,0.6]
    python benchmarks/bench_schedulers.py matched [--model reference] [--samples 2000] [--seed 1]

``check``: ``postdiff eval --plans baseline,postdiff`` once per scheduler name the model can run (every name
``--scheduler`` takes but ``lcm``: the ``flow-*`` names on a flow-matching model, the others elsewhere): class
accuracy, in-domain FID and MACs ratio per scheduler.
``solvers``: ``postdiff sweep`` once per solver (DDIM, Euler a, DPM++ 2M Karras, UniPC at 20 steps): at each budget the
best ``steps:N`` plan against the best cheaper-steps plan from the sweep's grid, chosen on calibration samples and
measured on held-out ones.
``matched``: the ``postdiff`` plan itself against the fewer-steps plan at its MACs (the most steps that cost no more),
``postdiff eval --plans baseline,postdiff,steps:N`` once per solver, on the sweeps' held-out seed.
Each command runs in its own process (the CLI as a user runs it); its JSON is kept beside the table, and ``--resume``
keeps a scheduler's finished sweep or eval when it ran with the same arguments. Prints a Markdown table; writes JSON
and the table (``--out``, default under benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SOLVERS = ["ddim", "euler-a", "dpmpp-2m-karras", "unipc"]
FLOW_SOLVERS = ["flow-euler", "flow-heun", "flow-dpmpp-2m"]  # a flow-matching model (reference-flow) runs only these


def is_flow_model(model: str) -> bool:
    from postdiff.families.model import load_model
    from postdiff.plan.schedulers import is_flow_config

    config = load_model(model).scheduler_config
    return is_flow_config(config.get("_class_name", ""), config)


def postdiff(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "postdiff"), *args]
    print("$ postdiff " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def kept(out: Path, run_args: list[str], resume: bool) -> bool:
    """Whether ``out`` is a finished run with the same arguments that --resume keeps (its arguments in
    ``out.args.json``, written once it finished); when not, the stale record is removed before the run."""
    done = out.with_suffix(".args.json")
    if resume and out.exists() and done.exists() and json.loads(done.read_text()) == run_args:
        print(f"kept from {out} (same arguments)", file=sys.stderr, flush=True)
        return True
    done.unlink(missing_ok=True)
    return False


def evals(args, work: Path, names: list[str], plans: str, prefix: str) -> list[dict]:
    """``postdiff eval --plans PLANS`` once per scheduler name, each in its own process; its JSON kept in ``work``.
    With --resume, a name whose eval ran with the same arguments is read back instead of run again."""
    rows = []
    for name in names:
        out = work / f"{prefix}_{args.model}_{name}.json"
        eval_args = ["--model", args.model, "--scheduler", name, "--plans", plans, "--samples", str(args.samples), "--seed", str(args.seed)]
        if not kept(out, eval_args, args.resume):
            postdiff("eval", *eval_args, "--no-progress", "--json", str(out), "--grid", str(out.with_suffix(".png")))
            out.with_suffix(".args.json").write_text(json.dumps(eval_args) + "\n")
        result = json.loads(out.read_text())
        rows.append({"scheduler": name, "plans": {p["plan"]: p for p in result["plans"]}})
    return rows


def check(args, work: Path) -> tuple[dict, str]:
    from postdiff.plan.schedulers import NAMES, is_flow_scheduler

    flow = is_flow_model(args.model)
    names = [n for n in NAMES if n != "lcm" and is_flow_scheduler(n) == flow]
    rows = evals(args, work, names, "baseline,postdiff", "check")
    data = {"mode": "check", "model": args.model, "samples": args.samples, "seed": args.seed, "rows": rows}
    return data, check_table(data)


def fewer_steps_at(model: str, plan: str, scheduler: str) -> str:
    """The ``steps:N`` plan with the most steps whose MACs under ``scheduler`` do not exceed ``plan``'s."""
    from postdiff.families.model import load_model
    from postdiff_lab.generation import source_for

    source = source_for(load_model(model), scheduler=scheduler)
    ratio = source.cost(source.compile(plan)).ratio
    return f"steps:{max(n for n in range(1, 21) if source.cost(source.compile(f'steps:{n}')).ratio <= ratio + 1e-9)}"


def matched(args, work: Path) -> tuple[dict, str]:
    rows = []
    for name in args.solvers.split(","):
        fewer = fewer_steps_at(args.model, "postdiff", name)
        rows += [r | {"fewer": fewer} for r in evals(args, work, [name], f"baseline,postdiff,{fewer}", "matched")]
    data = {"mode": "matched", "model": args.model, "samples": args.samples, "seed": args.seed, "rows": rows}
    return data, matched_table(data)


def matched_table(data: dict) -> str:
    """The Markdown table of a ``matched`` run: ``postdiff`` against the fewer-steps plan at its MACs, per solver."""
    lines = [
        f"{data['model']}, N = {data['samples']} per plan, seed {data['seed']}, 20 steps, the model's CFG; FID on the embedded "
        "classifier's 128-d features (lower is better), class accuracy by the classifier; fewer steps: the most steps at "
        "no more MACs than postdiff's",
        "| solver | baseline FID, accuracy | postdiff (MACs): FID, accuracy | fewer steps (MACs): FID, accuracy | better in FID |",
        "|---|---|---|---|---|",
    ]

    def entry(p: dict, macs: bool = True) -> str:
        return (f"({p['macs_ratio']:.3f}): " if macs else "") + f"{p['fid_classifier']:.2f}, {100 * p['class_accuracy']:.1f}%"

    for r in data["rows"]:
        b, p, f = r["plans"]["baseline"], r["plans"]["postdiff"], r["plans"][r["fewer"]]
        better = "cheaper steps" if p["fid_classifier"] < f["fid_classifier"] else "fewer steps"
        lines.append(f"| {r['scheduler']} | {entry(b, False)} | {entry(p)} | {r['fewer']} {entry(f)} | {better} |")
    return "\n".join(lines)


def check_table(data: dict) -> str:
    """The Markdown table of a ``check`` run. No times: the runs are a quality check, not a benchmark."""
    lines = [
        f"{data['model']}, N = {data['samples']} per plan, seed {data['seed']}, 20 steps, the model's CFG; class accuracy by the "
        "embedded classifier, FID on its 128-d features against the 10,000 test images (not Inception FID)",
        "| scheduler | UNet calls | baseline acc | postdiff acc | baseline FID | postdiff FID | postdiff MACs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        b, p = r["plans"]["baseline"], r["plans"]["postdiff"]
        lines.append(
            f"| {r['scheduler']} | {b['unet_calls']} | {100 * b['class_accuracy']:.1f}% | {100 * p['class_accuracy']:.1f}% | "
            f"{b['fid_classifier']:.2f} | {p['fid_classifier']:.2f} | {p['macs_ratio']:.3f} |"
        )
    return "\n".join(lines)


def solvers(args, work: Path) -> tuple[dict, str]:
    from postdiff_lab.report import write_json

    rows = []
    for name in args.solvers.split(","):
        out = work / f"sweep_{args.model}_{name}.json"
        sweep_args = ["--model", args.model, "--scheduler", name, "--budgets", args.budgets, "--samples", str(args.samples),
                      "--calibration", str(args.calibration), "--seed", str(args.seed), *args.grid.split()]  # fmt: skip
        # A solver's sweep takes up to an hour here: a finished one is kept with the arguments it ran with, and a
        # --resume run with the same arguments reads it instead of running it again.
        if kept(out, sweep_args, args.resume):
            previous = json.loads(out.read_text())
            rows.append({"solver": name, "seconds": previous.get("bench_seconds"), "sweep": previous})
            continue
        t0 = time.perf_counter()
        # every score kept as it is measured: a sweep cut short (a session's end) resumes where it stopped
        postdiff("sweep", *sweep_args, "--json", str(out), "--plot", str(out.with_suffix(".png")), "--scores-cache", str(work / "scores"))
        seconds = round(time.perf_counter() - t0, 1)
        result = json.loads(out.read_text()) | {"bench_seconds": seconds}
        write_json(out, result)
        write_json(out.with_suffix(".args.json"), sweep_args)
        rows.append({"solver": name, "seconds": seconds, "sweep": result})
    meta = {"calibration": args.calibration, "budgets": args.budgets, "seed": args.seed, "grid": args.grid or "the sweep's default"}
    data = {"mode": "solvers", "model": args.model, "samples": args.samples, **meta, "rows": rows}
    return data, solvers_table(data)


def cell(plan: dict | None) -> str:
    """A sweep winner as ``name (MACs): FID, accuracy``, or why there is none (accuracy where the sweep recorded it)."""
    if plan is None:
        return "none in the grid fits"
    return f"{plan['name']} ({plan['macs_ratio']:.3f}): {plan['holdout']:.2f}{accuracy(plan)}"


def accuracy(entry: dict) -> str:
    return f", {100 * entry['holdout_accuracy']:.1f}%" if "holdout_accuracy" in entry else ""


def solvers_table(data: dict) -> str:
    """The Markdown table of a ``solvers`` run: per solver and budget, the best of each family on held-out samples."""
    seed = data["seed"]
    lines = [
        f"{data['model']}, 20 steps; plans chosen on {data['calibration']} calibration samples (seed {seed}) from the grid "
        f"{data['grid']}, measured on {data['samples']} held-out samples (seed {seed + 1}); FID on the embedded "
        "classifier's features (lower is better), then class accuracy where the sweep recorded it",
        "| solver | baseline FID | budget | fewer steps (MACs): FID | cheaper steps (MACs): FID | better |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        s = r["sweep"]
        for b in s["rows"]:
            few, cheap = b["fewer-steps"], b["cheaper-steps"]
            better = {"cheaper-steps": "cheaper steps", "fewer-steps": "fewer steps", None: "-"}[b["winner"]]
            base = f"{s['baseline']['holdout']:.2f}{accuracy(s['baseline'])}"
            lines.append(f"| {r['solver']} | {base} | {b['budget']} | {cell(few)} | {cell(cheap)} | {better} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from postdiff_lab.report import machine_info, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["check", "solvers", "matched"])
    ap.add_argument("--model", default="reference", help="an embedded model: reference, digits or reference-flow (default: reference)")
    ap.add_argument("--samples", type=int, default=None, help="samples per plan (check: 300; solvers: held-out, 2000; matched: 2000)")
    ap.add_argument(
        "--seed", type=int, default=None, help="seed (check: 11; solvers: the calibration seed, 0; matched: 1, the sweeps' held-out seed)"
    )
    ap.add_argument("--budgets", default="0.25,0.4,0.6", help="solvers: fractions of the baseline's MACs")
    ap.add_argument("--calibration", type=int, default=100, help="solvers: calibration samples per candidate plan")
    ap.add_argument(
        "--solvers",
        default=None,
        help=f"solvers, matched: scheduler names (default: {','.join(SOLVERS)}; on a flow model {','.join(FLOW_SOLVERS)})",
    )
    ap.add_argument("--grid", default="", help="solvers: sweep grid options, e.g. '--betas 1,0.5 --intervals 1,2,3' (default: the sweep's)")
    ap.add_argument("--out", default=None, help="JSON results (default: benchmarks/results/<mode>_<model>.json)")
    ap.add_argument("--resume", action="store_true", help="keep each scheduler's finished sweep or eval that ran with the same arguments")
    args = ap.parse_args(argv)
    from postdiff_lab.builtin_models import REFERENCE_MODELS

    if args.model not in REFERENCE_MODELS:
        ap.error(f"--model must be one of {', '.join(REFERENCE_MODELS)} (the embedded models with a classifier), got {args.model!r}")
    args.solvers = args.solvers or ",".join(FLOW_SOLVERS if is_flow_model(args.model) else SOLVERS)
    args.samples = args.samples or (300 if args.mode == "check" else 2000)
    args.seed = {"check": 11, "solvers": 0, "matched": 1}[args.mode] if args.seed is None else args.seed
    out = Path(args.out or HERE / "results" / f"schedulers_{args.mode}_{args.model}.json")
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data, table = {"check": check, "solvers": solvers, "matched": matched}[args.mode](args, work)
    data |= {"machine": machine_info(), "seconds": round(time.perf_counter() - t0, 1)}
    data["command"] = " ".join(["bench_schedulers.py", *(argv if argv is not None else sys.argv[1:])])
    write_results(out, data, table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
