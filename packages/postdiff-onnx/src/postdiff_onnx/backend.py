"""The ONNX Runtime backend, as the engine's ``Backend`` plug-in (entry point ``postdiff.backends: onnx``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from postdiff.bundle.backends import Backend
from postdiff.bundle.manifest import Manifest
from postdiff.errors import BundleError, ExportError

from .session import DEFAULT_PROVIDER, PREPACK_HELP


class OnnxBackend(Backend):
    """an ONNX bundle: graphs with cache inputs and outputs, one weights file (ONNX Runtime, OpenVINO)"""

    name = "onnx"
    package = "postdiff-onnx"
    runner_options = ("provider", "threads", "static", "prepack")
    export_module = "postdiff_onnx.export"
    export_needs = (*Backend.export_needs, "onnx", "onnxscript")

    def add_options(self, parser, command: str) -> None:
        if command == "export":
            export = self.exporter()
            parser.add_argument(
                "--weights",
                default="fp32",
                choices=list(export.WEIGHTS),
                help="how the weights are stored: fp32; fp16 (and fp16 compute where ONNX Runtime has kernels); int8 (per "
                "channel, activations quantized per call: about 1/4 of fp32's bytes, faster on CPUs); int4 (4-bit blocks: "
                "about 1/7). The VAE decoder stays fp32 (default: fp32)",
            )
            parser.add_argument(  # the flag's name before --weights
                "--precision", dest="weights", choices=["fp32", "fp16"], default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
            parser.add_argument(
                "--min-psnr",
                type=float,
                default=None,
                metavar="DB",
                help="int8/int4: the export fails if a quantized graph's outputs differ from its fp32 graph's by less than DB "
                f"dB PSNR (default: {', '.join(f'{k} {v:g}' for k, v in export.quantize.DEFAULT_MIN_PSNR.items())})",
            )
            parser.add_argument(
                "--static", action="store_true", help="also one fixed-shape copy of each UNet graph per latent size and batch"
            )
            parser.add_argument(
                "--opset",
                type=int,
                default=export.DEFAULT_OPSET,
                help="ONNX opset (default: 23, with fused Attention; 18 for older runtimes)",
            )
            parser.add_argument("--no-verify", action="store_true", help="skip the PSNR check of every graph against PyTorch")
        elif command == "generate":
            parser.add_argument("--provider", default=None, help=f"ONNX Runtime execution provider (default: {DEFAULT_PROVIDER})")
            parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's choice)")
            parser.add_argument(
                "--static", action="store_true", default=None, help="run the bundle's fixed-shape graphs (exported with --static)"
            )
            parser.add_argument(
                "--prepack",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=PREPACK_HELP,
            )

    def options(self, args, command: str) -> dict:
        if command == "export":
            return {
                "weights": args.weights,
                "min_psnr": args.min_psnr,
                "static": args.static,
                "opset": args.opset,
                "verify": not args.no_verify,
            }
        return {
            "provider": getattr(args, "provider", None) or DEFAULT_PROVIDER,
            "threads": args.threads,
            "static": bool(getattr(args, "static", False)),
            "prepack": getattr(args, "prepack", None),
        }

    def export_weights(self, weights: str) -> dict:
        from .quantize import WEIGHT_TYPES

        if weights not in WEIGHT_TYPES:
            raise ExportError(f"ONNX bundles store weights as {', '.join(WEIGHT_TYPES)}; not {weights!r}")
        return {"weights": weights}

    def check_export(self, **options) -> None:
        self.exporter().check_options(**options)

    def convert(self, src, job, folder: Path, log, **options) -> list:
        return self.exporter().convert(src, job, folder, **options)

    def finish(self, folder: Path, job, graphs: list, log, *, weights="fp32", opset=None, min_psnr=None, **options) -> dict:
        from postdiff.bundle.manifest import tool_versions

        from . import quantize
        from .weights import WEIGHTS_FILE, share_weights

        facts = {}
        if weights in quantize.QUANTIZED:
            facts["quantization"] = quantize.manifest_entry(folder, graphs, weights, min_psnr)
        size, same = share_weights(folder, [f for g in graphs for f in (g.file, *g.alternates.values())])
        for g in graphs:
            g.file = same.get(g.file, g.file)
            g.alternates = {k: same.get(v, v) for k, v in g.alternates.items()}
        if options.get("verify", True):
            _check_loads(folder, dict.fromkeys(g.file for g in graphs))  # (OpenVINO twins: checked by the OpenVINO tests)
        log(
            f"weights: every tensor of the {len(graphs)} graphs stored once in {WEIGHTS_FILE} ({size / 1e6:.1f} MB)"
            + (f"; {', '.join(same)} kept once as {', '.join(same.values())} (identical graphs)" if same else "")
        )
        opset = self.exporter().DEFAULT_OPSET if opset is None else opset
        precision = "fp16" if weights == "fp16" else "fp32"  # what the activations compute in
        tools = {**tool_versions("onnx", "onnxruntime", "onnxscript"), "opset": str(opset)}
        return {"precision": precision, "weights": weights, "tools": tools, **facts}

    def open_runner(
        self,
        folder: Path,
        manifest: Manifest,
        *,
        provider: str = DEFAULT_PROVIDER,
        threads: int | None = None,
        static: bool = False,
        prepack: bool | None = None,
        low_memory: bool = False,
    ):
        from .runtime import OrtRunner

        if static and not any(g.batch is not None for g in manifest.graphs):
            raise BundleError(f"{folder} has no static graphs; export it with --static, or run it without --static")
        runner = OrtRunner(folder, provider=provider, threads=threads, prepack=prepack, arena=not low_memory)
        return runner, static


def _check_loads(folder: Path, files) -> None:
    """Open every rewritten graph the way the runtime does (on the shared weights): the graphs were checked against
    PyTorch before their tensors moved into the shared file, so a graph that no longer loads is caught here, at
    export, not on the user's device."""
    from .session import make_session
    from .weights import WEIGHTS_FILE, SharedInitializers

    shared = SharedInitializers(folder)
    for file in files:
        try:
            make_session(folder / file, initializers=shared.for_graph(folder / file), prepack=False)
        except BundleError as exc:
            raise ExportError(f"{file} does not load once its tensors are in {WEIGHTS_FILE} ({exc}); please report this") from None
