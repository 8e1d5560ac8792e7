"""``postdiff bench``: plans x backends on one model, measured side by side (``postdiff_lab.bench``)."""

from __future__ import annotations

from ..common import guidance_arg, log, model_args, torch_args
from ..render import bench_step_table, bench_table, print_table


def add_parser(sub) -> None:
    from postdiff.bundle import backends

    b = sub.add_parser("bench", help="speed, memory, cost and fidelity of plans on several backends, side by side")
    model_args(b)
    torch_args(b, openvino=True)
    b.add_argument("--plans", default="baseline,postdiff", help="comma-separated plans (default: baseline,postdiff)")
    installed = ",".join(backends.names())
    b.add_argument("--backends", default=installed, help=f"comma-separated runtimes (default: every installed one: {installed})")
    b.add_argument("--runs", type=int, default=3, help="timed generations per backend and plan (default: 3)")
    b.add_argument("--warmup", type=int, default=1, help="untimed generations first (default: 1)")
    b.add_argument("--images", type=int, default=10, help="images per generation (default: 10)")
    b.add_argument("--seed", type=int, default=0)
    guidance_arg(b)
    b.add_argument("--threads", type=int, default=None, help="threads for PyTorch and ONNX Runtime (default: each library's own)")
    b.add_argument(
        "--weights",
        default="fp32",
        help="comma-separated weight types of the exported bundles, a row each: fp32, fp16, int8, int4 (default: fp32; "
        "Core ML stores int8 as 8bit and int4 as 4bit; PyTorch runs its --dtype)",
    )
    from postdiff.bundle.runtime import LOW_MEMORY_HELP

    b.add_argument("--low-memory", action="store_true", help=f"bundle backends: {LOW_MEMORY_HELP}")
    for backend in backends.available().values():  # each backend's runner flags (--compute-units, ...)
        backend.add_options(b, "bench")
    b.add_argument("--cache-dir", default=None, help="exported bundles cache (default: $POSTDIFF_CACHE or ~/.cache/postdiff)")
    b.add_argument("--json", default="postdiff-bench.json", help="JSON results file (default: postdiff-bench.json)")
    b.add_argument("--grid", default="postdiff-bench.png", help="PNG grid: a row per backend and plan (default: postdiff-bench.png)")


def run(args) -> int:
    import dataclasses

    from postdiff.bundle import backends
    from postdiff_lab.bench import BenchConfig, run_bench, split_list
    from postdiff_lab.images import save_grid
    from postdiff_lab.report import write_json

    lists = {"plans", "backends", "weights"}  # comma-separated flags
    given = {f.name for f in dataclasses.fields(BenchConfig)} - lists - {"options"}  # the flags of the same names
    options = {name: b.options(args, "bench") for name, b in backends.available().items()}
    cfg = BenchConfig(options=options, **{k: split_list(getattr(args, k)) for k in lists}, **{k: getattr(args, k) for k in given})
    result = run_bench(cfg, log=log)
    result["command"] = args.command_line
    grid, labels = result.pop("grid"), result.pop("grid_labels")
    print(
        f"postdiff bench on {result['model']} ({result['weights']} weights), {result['image_hw'][0]}x{result['image_hw'][1]} px, "
        f"{result['steps']} steps ({result['scheduler']}), {cfg.images} images per run, N = {cfg.runs} timed runs after {cfg.warmup} warm-up; "
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores"
    )
    print_table(*bench_table(result))
    print()
    print_table(*bench_step_table(result))
    for s in result["skipped"]:
        print(f"- skipped {s['backend']}: {s['reason']}")
    for note in result["notes"]:
        print(f"- {note}")
    write_json(args.json, result)
    path = save_grid(grid, args.grid, row_labels=labels, scale=max(1, 64 // grid[0][0].shape[0]))
    print(f"wrote {args.json} and {path}")
    return 0
