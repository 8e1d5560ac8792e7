"""``postdiff generate``: one image under a plan, with PyTorch or from an exported bundle on any installed backend."""

from __future__ import annotations

import time

from ..common import guidance_arg, log, make_source, model_args, plans_help, ran_on, recipe, torch_args, warn


def add_parser(sub) -> None:
    from postdiff.bundle import backends

    g = sub.add_parser("generate", help="generate an image with a plan")
    model_args(g)
    torch_args(g, openvino=True)
    g.add_argument(
        "--prompt",
        default=None,
        help="the prompt; for a class-conditional model a class name or index (--model reference: a Fashion-MNIST class, "
        "default Ankle boot; --model digits: a digit, default 9)",
    )
    g.add_argument("--negative-prompt", default=None)
    g.add_argument(
        "--prompt-embeds",
        default=None,
        metavar="FILE.npz",
        help="the prompt already encoded, for a bundle exported with --no-text-encoder (PixArt): prompt_embeds, "
        "prompt_attention_mask and, for guidance, negative_prompt_embeds and negative_prompt_attention_mask",
    )
    g.add_argument(
        "--plan",
        default=None,
        help=f"built-in plan ({plans_help()}) or a recipe JSON file (default: postdiff; with --bundle, the bundle's plan)",
    )
    g.add_argument("--backend", default=backends.TORCH, choices=backends.names(), help="runtime (default: torch)")
    g.add_argument("--bundle", default=None, help="exported bundle folder (any backend but torch); the bundle defines the model")
    for backend in backends.available().values():  # each backend's runner flags (--provider, --compute-units, ...)
        backend.add_options(g, "generate")
    from postdiff.bundle.runtime import LOW_MEMORY_HELP

    g.add_argument("--low-memory", action="store_true", help=f"with --bundle: {LOW_MEMORY_HELP}")
    guidance_arg(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-o", "--output", default="postdiff.png", help="image file to write, PNG or JPEG by suffix (default: postdiff.png)")


def run(args) -> int:
    from postdiff.bundle import backends
    from postdiff.errors import PostDiffError
    from postdiff_lab.images import save_png

    given = [(flag, owners) for flag, owners in _runner_flags(args).items() if args.backend not in owners]
    if given:
        flag, owners = given[0]
        if backends.TORCH in owners:
            raise PostDiffError(f"{flag} is an option of --backend {' or '.join(owners)}, not of --backend {args.backend}; leave it out")
        raise PostDiffError(f"{flag} is for exported runtimes ({', '.join(owners)}); add --backend {owners[0]} and --bundle DIR")
    if args.backend != backends.TORCH:
        return _from_bundle(args)
    if args.bundle:
        raise PostDiffError("--bundle is for exported runtimes; add --backend onnx (or another installed backend) and --bundle DIR")
    if args.prompt_embeds:
        raise PostDiffError("--prompt-embeds is for bundles exported with --no-text-encoder; add --backend onnx and --bundle DIR")
    if args.low_memory:
        raise PostDiffError("--low-memory runs an exported bundle graph by graph; add --backend onnx (or openvino) and --bundle DIR")
    src = make_source(args)
    plan_recipe = recipe(args.plan or "postdiff", args.steps)
    plan = src.compile(plan_recipe)
    warn(src.model.untrained_warning(plan))
    batch = src.generate(plan_recipe, 1, args.seed, conditions=[src.parse_condition(args.prompt)])
    path = save_png(batch.images[0], args.output)
    model = src.model
    print(
        f"wrote {path} ({model.name}, {ran_on(model.placement)}, plan {plan_recipe.label}, {plan_recipe.steps} steps of {plan.scheduler}, "
        f"seed {args.seed}, {batch.seconds:.2f} s)"
    )
    return 0


def _runner_flags(args) -> dict[str, list[str]]:
    """{flag: the backends that take it} for every runner flag given on the command line (a value other than its
    default); a flag such as --static can belong to several backends."""
    from postdiff.bundle import backends

    out: dict[str, list[str]] = {}
    for dest in ("device", "dtype"):  # PyTorch's own (--device is OpenVINO's too)
        if getattr(args, dest, None) is not None:
            out.setdefault(f"--{dest}", []).append(backends.TORCH)
    for name, backend in backends.available().items():
        for dest in backend.runner_options:
            value = getattr(args, dest, None)
            if value is not None:  # every runner flag defaults to None: given, even as --no-x (False)
                out.setdefault("--" + "no-" * (value is False) + dest.replace("_", "-"), []).append(name)
    return out


def _from_bundle(args) -> int:
    """Generation that builds no PyTorch model: every network runs in the bundle's runtime."""
    from postdiff.bundle import backends
    from postdiff.bundle.runtime import bundle_condition, load_bundle
    from postdiff.errors import PostDiffError
    from postdiff.families.model import untrained_warning
    from postdiff_lab.images import save_png

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
    backend = backends.get(args.backend)
    pipe = load_bundle(args.bundle, backend, low_memory=args.low_memory, **backend.options(args, "generate"))
    plan = pipe.compile(args.plan, args.steps, args.scheduler)
    if pipe.plan_note:
        log(f"postdiff: note: {pipe.plan_note}")
    info = pipe.info
    warn(untrained_warning(info["name"], info.get("training_sizes"), plan, info.get("vae_scale_factor", 1)))
    condition = bundle_condition(pipe, args.prompt, args.prompt_embeds)
    start = time.perf_counter()
    images = pipe.generate([condition] * (pipe.static_batch if pipe.static else 1), plan, seed=args.seed, guidance_scale=args.guidance)
    seconds = time.perf_counter() - start
    path = save_png(images[0], args.output)
    ran = ", ".join(f"{k} {v}" for k, v in getattr(pipe.runner, "executed", {}).items())  # read back from the runtime
    print(
        f"wrote {path} ({info['name']} bundle, {args.backend}{f' ({ran})' if ran else ''}, {pipe.manifest.weights} weights, "
        f"plan {plan.name}, {plan.recipe.steps} steps of {plan.scheduler}, seed {args.seed}, {seconds:.2f} s)"
    )
    return 0
