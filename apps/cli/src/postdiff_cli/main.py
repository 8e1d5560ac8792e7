"""The ``postdiff`` command: the parser, the checks every command shares, and dispatch to ``commands/<name>.py``.

    postdiff generate [--model M] [--prompt P] [--plan PLAN] [--seed S] [-o FILE]
    postdiff generate --backend onnx --bundle DIR [--prompt P] [--plan PLAN] [--seed S] [-o FILE]
    postdiff export onnx --model M --plan PLAN -o DIR [--weights fp32|fp16|int8|int4] [--static]
    postdiff export coreml --model M --plan PLAN -o DIR [--target macos14] [--weights 8bit]
    postdiff generate --backend coreml --bundle DIR [--compute-units CPU_AND_NE]      (macOS)
    postdiff plan show|cost PLAN [--model M] [--height H --width W] [--steps N] [--json]
    postdiff plan search --budget 0.4 [--model M] [--calibration N] [-o FILE]
    postdiff bench [--model M] [--plans P1,P2] [--backends torch,onnx,coreml] [--runs N --warmup W] [--json FILE]
    postdiff sweep [--model M] [--budgets 0.3,0.4,0.5,0.6] [--json FILE] [--plot FILE]
    postdiff eval [--model M] [--plans P1,P2] [--samples N] [--sizes 16,24,32] [--json FILE]
    postdiff demo
    postdiff env [--json]                  versions, CPU features and devices, for a bug report
    postdiff --version

Backends (``--backend``, ``export <backend>``) are the installed ``postdiff.backends`` plug-ins. User errors print
one line (``postdiff: error: ...``) and exit with status 2; no traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .commands import COMMANDS
from .common import Parser


def _command(name: str):
    return importlib.import_module(f"postdiff_cli.commands.{name}")


def _version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"postdiff {version('postdiff-cli')} (postdiff-core {version('postdiff-core')}; `postdiff env` for the rest)"
    except PackageNotFoundError:  # run from a source tree without installing
        import postdiff

        return f"postdiff {postdiff.__version__}"


def build_parser() -> Parser:
    parser = Parser(prog="postdiff", description="Training-free diffusion acceleration: cheaper steps, not fewer.")
    parser.add_argument("--version", action="version", version=_version_line(), help="print PostDiff's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        _command(name).add_parser(sub)
    return parser


# -- checks of every flag, before any model loads ----------------------------------------------------------------------
def _flag_checks():
    """{argument name: check(value, flag) -> value} for every numeric flag of every command (absent ones are skipped)."""
    from functools import partial

    from postdiff import validate as v

    def budget(value, flag):
        from postdiff_lab.search import check_budget

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
    from postdiff.families.model import DEFAULT_MODEL
    from postdiff.files import check_output, check_output_folder

    for name, check in _flag_checks().items():
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, check(value, "--" + name.replace("_", "-")))
    args.model_given = getattr(args, "model", None) is not None
    if args.model_given and not args.model.strip():
        raise PostDiffError("--model is empty; give a model name, a local diffusers folder or a Hub id")
    if hasattr(args, "model") and not args.model_given:
        args.model = DEFAULT_MODEL
    if getattr(args, "scheduler", None) is not None:
        from postdiff.plan.schedulers import resolve

        resolve(args.scheduler)  # an empty or unknown name: one line listing the names, before any model loads
    for (command, name), suffixes in _OUTPUTS.items():
        value = getattr(args, name, None)
        if args.command != command or value is None or isinstance(value, bool):
            continue
        flag = "-o" if name == "output" else "--" + name
        if suffixes == "image":
            from postdiff_lab.images import IMAGE_FORMATS

            suffixes = tuple(IMAGE_FORMATS)
        if suffixes is None:
            check_output_folder(value, flag)
        else:
            check_output(value, flag, suffixes=suffixes)
    for name in ("plans", "backends", "budgets", "sizes", "betas", "switches", "intervals", "gates", "shifts"):
        value = getattr(args, name, None)
        if value is not None and not value.replace(",", "").strip():
            raise PostDiffError(f"--{name} is empty; give comma-separated values (see postdiff {args.command} --help)")


def main(argv: Sequence[str] | None = None) -> int:
    from postdiff.errors import PostDiffError, warnings_in_one_line

    warnings_in_one_line("postdiff")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = " ".join(["postdiff", *(argv if argv is not None else sys.argv[1:])])
    try:
        _check_args(args)
        return _command(args.command).run(args)
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


if __name__ == "__main__":
    sys.exit(main())
