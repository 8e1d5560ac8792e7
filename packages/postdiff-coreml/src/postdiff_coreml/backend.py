"""The Core ML backend, as the engine's ``Backend`` plug-in (entry point ``postdiff.backends: coreml``).

Exports on any OS; runs models only on macOS (coremltools cannot predict elsewhere).
"""

from __future__ import annotations

from pathlib import Path

from postdiff.bundle.backends import Backend
from postdiff.bundle.manifest import Manifest


class CoreMLBackend(Backend):
    """a Core ML bundle: one multifunction .mlpackage with shared weights (runs on macOS)"""

    name = "coreml"
    package = "postdiff-coreml"
    runs_on = "Darwin"
    fixed_shapes = True  # every Core ML function has fixed shapes: bench exports for its images per run
    runner_options = ("compute_units",)
    export_module = "postdiff_coreml.export"
    export_needs = (*Backend.export_needs, "coremltools")

    def add_options(self, parser, command: str) -> None:
        from .runtime import COMPUTE_UNITS

        if command == "export":
            export = self.exporter()
            parser.add_argument(
                "--target",
                dest="target_version",
                default="macos15",
                choices=list(export.TARGETS),
                help="macos15: one multifunction package; macos14: one package per function",
            )
            parser.add_argument(
                "--weights",
                default=None,
                metavar="{fp16,8bit,6bit,4bit}",
                help="how the weights are stored: fp16, 8bit (linear quantization), 6bit or 4bit (palettized) (default: fp16)",
            )
        else:  # generate, bench
            parser.add_argument("--compute-units", default=None, help=f"Core ML compute units: {', '.join(COMPUTE_UNITS)} (default: ALL)")

    def options(self, args, command: str) -> dict:
        if command == "export":
            return {"target": args.target_version, "weights": self.exporter().core_ml_weights(args.weights)}
        return {"compute_units": getattr(args, "compute_units", None) or "ALL"}

    def export_weights(self, weights: str) -> dict:
        # bench compares weight types across backends by size: Core ML's 8-bit (linear) and 4-bit (palettized) rows
        # stand beside ONNX's int8 and int4, its fp16 (its widest) beside fp32
        named = {"fp32": None, "fp16": None, "int8": "8bit", "int4": "4bit"}.get(weights, weights)
        return {"weights": self.exporter().core_ml_weights(named)}

    def check_export(self, **options) -> None:
        self.exporter().check_options(**options)

    def convert(self, src, job, folder: Path, log, **options) -> list:
        return self.exporter().convert(src, job, folder, log, **options)

    def finish(self, folder: Path, job, graphs: list, log, **options) -> dict:
        return self.exporter().finish(folder, job, graphs, log, **options)

    def check_open(self, *, compute_units: str = "ALL") -> None:
        from .runtime import check_compute_units, require_macos

        check_compute_units(compute_units)
        require_macos()

    def open_runner(self, folder: Path, manifest: Manifest, *, compute_units: str = "ALL", low_memory: bool = False):
        from .runtime import CoreMLRunner, inspect_bundle

        inspect_bundle(folder, verify=False)  # every package opens and has its functions (checksums: read_manifest)
        return CoreMLRunner(folder, compute_units), True  # Core ML graphs are all fixed-shape

    def unavailable(self) -> str | None:
        try:
            import coremltools  # noqa: F401
        except ImportError:
            return "coremltools is not installed; pip install -e packages/postdiff-coreml"
        return super().unavailable()
