"""OpenVINO, as the engine's ``Backend`` plug-in (entry point ``postdiff.backends: openvino``). It exports nothing:
it runs the ONNX bundles ``postdiff export onnx`` writes."""

from __future__ import annotations

from pathlib import Path

from postdiff.bundle.backends import Backend
from postdiff.bundle.manifest import Manifest
from postdiff.errors import BundleError


class OpenVINOBackend(Backend):
    """ONNX bundles run by the OpenVINO runtime (Intel CPUs, GPUs, NPUs)."""

    name = "openvino"
    package = "postdiff-openvino"
    bundle_format = "onnx"
    exports = False
    runner_options = ("device", "precision", "static", "threads")

    def add_options(self, parser, command: str) -> None:
        from .runtime import DEVICES, PRECISIONS

        if command in ("generate", "bench"):
            if "--device" not in parser._option_string_actions:  # the PyTorch backend's --device names OpenVINO's too
                parser.add_argument("--device", default=None, help=f"OpenVINO device: {', '.join(DEVICES)} (default: CPU)")
            parser.add_argument(
                "--precision",
                default=None,
                choices=list(PRECISIONS),
                help="OpenVINO inference precision (default: f32, equal to ONNX Runtime; bf16 is faster where the CPU has it)",
            )
        if command == "generate":
            if not any("--static" in a.option_strings for a in parser._actions):  # the ONNX backend may have added it
                parser.add_argument("--static", action="store_true", default=None, help="run the bundle's fixed-shape graphs")
            if not any("--threads" in a.option_strings for a in parser._actions):
                parser.add_argument("--threads", type=int, default=None, help="inference threads")

    def options(self, args, command: str) -> dict:
        return {
            "device": (getattr(args, "device", None) or "CPU").upper(),  # --device is shared with PyTorch's lower-case names
            "precision": getattr(args, "precision", None) or "f32",
            "static": bool(getattr(args, "static", False)),
            "threads": getattr(args, "threads", None),
        }

    def export_weights(self, weights: str) -> dict:
        from postdiff.bundle import backends

        return backends.get(self.bundle_format).export_weights(weights)

    def check_open(self, *, device: str = "CPU", precision: str = "f32", static: bool = False, threads: int | None = None) -> None:
        from .runtime import check_options

        check_options(device, precision, static)

    def open_runner(
        self,
        folder: Path,
        manifest: Manifest,
        *,
        device: str = "CPU",
        precision: str = "f32",
        static: bool = False,
        threads=None,
        low_memory: bool = False,
    ):
        from .runtime import OpenVINORunner

        if static and not any(g.batch is not None for g in manifest.graphs):
            raise BundleError(f"{folder} has no static graphs; export it with postdiff export onnx --static")
        return OpenVINORunner(folder, device=device, precision=precision, threads=threads), static

    def unavailable(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino is not installed; pip install -e packages/postdiff-openvino"
        return super().unavailable()
