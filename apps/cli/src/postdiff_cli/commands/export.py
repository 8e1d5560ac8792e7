"""``postdiff export <backend>``: the graphs a plan needs, as a bundle for one installed backend."""

from __future__ import annotations

from ..common import log, model_args, plans_help


def add_parser(sub) -> None:
    from postdiff.bundle import backends

    x = sub.add_parser("export", help="export the graphs a plan needs as a bundle for another runtime")
    xsub = x.add_subparsers(dest="target", required=True)
    for name, backend in backends.available().items():
        if not backend.exports:  # it runs another backend's bundles (OpenVINO: ONNX ones)
            continue
        p = xsub.add_parser(name, help=(backend.__doc__ or f"a {name} bundle").strip().splitlines()[0])
        model_args(p)
        p.add_argument("--plan", default="postdiff", help=f"built-in plan ({plans_help()}) or a recipe JSON file (default: postdiff)")
        p.add_argument("-o", "--output", required=True, help="bundle folder to create (must not exist)")
        p.add_argument(
            "--batch",
            type=int,
            default=1,
            help="images per call of the fixed-shape graphs (default: 1)"
            + ("; every graph of this backend has fixed shapes" if backend.fixed_shapes else ""),
        )
        p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at -o (only once the new one is complete)")
        p.add_argument(
            "--golden",
            action="store_true",
            help="also save golden.npz: each graph's first inputs and outputs and the final latent for seed 0, to test an app against",
        )
        p.add_argument(
            "--no-text-encoder",
            action="store_true",
            help="leave the text encoder out (PixArt: T5-XXL is 4.7B parameters); the bundle then takes --prompt-embeds",
        )
        backend.add_options(p, "export")


def run(args) -> int:
    from postdiff.bundle import backends
    from postdiff.bundle.export import export_bundle

    backend = backends.get(args.target)
    path = export_bundle(
        backend,
        args.model,
        args.plan,
        args.output,
        height=args.height,
        width=args.width,
        steps=args.steps,
        scheduler=args.scheduler,
        batch=args.batch,
        overwrite=args.overwrite,
        golden=args.golden,
        without=("text_encoder",) if args.no_text_encoder else (),
        log=log,
        **backend.options(args, "export"),
    )
    print(f"wrote {path}")
    return 0
