"""``python -m postdiff_onnx run BUNDLE --prompt P --seed S -o OUT.png``: an image from an ONNX bundle with
ONNX Runtime and numpy only (``pip install postdiff-core postdiff-onnx``, no PyTorch).

The bundle's stored plan runs as it is; ``--steps``, ``--plan`` or ``--scheduler`` recompile it from its recipe
(and say so). A class-conditional bundle (``--model reference``) takes a class name or index as its prompt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from .session import PREPACK_HELP

    p = argparse.ArgumentParser(prog="python -m postdiff_onnx", description="Run PostDiff ONNX bundles without PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate an image from a bundle (made with: postdiff export onnx)")
    r.add_argument("bundle", help="the bundle folder")
    r.add_argument("--prompt", default=None, help="the prompt; for a class-conditional bundle a class name or index")
    r.add_argument(
        "--prompt-embeds",
        default=None,
        metavar="FILE.npz",
        help="the prompt already encoded (a PixArt bundle exported with --no-text-encoder): prompt_embeds, prompt_attention_mask "
        "and, for guidance, negative_prompt_embeds and negative_prompt_attention_mask",
    )
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("-o", "--output", default="postdiff.png", help="PNG file to write (default: postdiff.png)")
    r.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's plan)")
    r.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the bundle's)")
    r.add_argument("--plan", default=None, help="a built-in plan name or recipe JSON (default: the bundle's stored plan)")
    from postdiff.plan.schedulers import NAMES

    r.add_argument(
        "--scheduler",
        default=None,
        help=f"{', '.join(NAMES)}, or a scheduler class name (default: the bundle's; the plan is recompiled for it)",
    )
    r.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's choice)")
    r.add_argument("--provider", default=None, help="ONNX Runtime execution provider (default: CPUExecutionProvider)")
    r.add_argument("--static", action="store_true", help="run the bundle's fixed-shape graphs (exported with --static)")
    r.add_argument(
        "--prepack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=PREPACK_HELP,
    )
    from postdiff.bundle.runtime import LOW_MEMORY_HELP

    r.add_argument("--low-memory", action="store_true", help=LOW_MEMORY_HELP)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _missing(module: str, install: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec(module) else f"{module} is not installed: {install}"


def run(args) -> int:
    from postdiff.errors import PostDiffError

    from .runtime import load_bundle
    from .session import DEFAULT_PROVIDER

    for need in (("onnxruntime", "pip install onnxruntime"), ("PIL", "pip install pillow")):
        problem = _missing(*need)
        if problem:
            raise PostDiffError(problem)
    if args.steps is not None and args.steps < 1:
        raise PostDiffError(f"--steps must be at least 1, not {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise PostDiffError(f"--threads must be at least 1, not {args.threads}")
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise PostDiffError(f"{output}: the output is a PNG file; give a name ending in .png")
    pipe = load_bundle(
        args.bundle,
        provider=args.provider or DEFAULT_PROVIDER,
        threads=args.threads,
        static=args.static,
        prepack=args.prepack,
        low_memory=args.low_memory,
    )
    plan = pipe.compile(args.plan, args.steps, args.scheduler)
    if pipe.plan_note:
        print(f"postdiff_onnx: note: {pipe.plan_note}", file=sys.stderr)
    from postdiff.bundle.runtime import bundle_condition

    condition = bundle_condition(pipe, args.prompt, args.prompt_embeds)
    count = pipe.static_batch if pipe.static else 1
    start = time.perf_counter()
    images = pipe.generate([condition] * count, plan, seed=args.seed, guidance_scale=args.guidance, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    path = save_png(images[0], output)
    print(
        f"wrote {path} ({pipe.info['name']} bundle, {pipe.manifest.weights} weights, plan {plan.name}, "
        f"{plan.recipe.steps} steps of {plan.scheduler}, seed {args.seed}, {seconds:.2f} s)"
    )
    return 0


def save_png(image, path: Path) -> Path:
    """An H x W x C image of floats in [0, 1] as a PNG, written to a temporary name and renamed when complete."""
    from PIL import Image

    from postdiff.files import atomic_write
    from postdiff.loop.arrays import to_uint8

    return atomic_write(path, lambda tmp: Image.fromarray(to_uint8(image)).save(tmp, format="PNG"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from postdiff.errors import PostDiffError, warnings_in_one_line
    except ImportError:
        print("postdiff_onnx: error: postdiff-core is not installed: pip install postdiff-core postdiff-onnx", file=sys.stderr)
        return 2
    warnings_in_one_line("postdiff_onnx")
    try:
        return run(args)
    except PostDiffError as exc:
        print(f"postdiff_onnx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("postdiff_onnx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
