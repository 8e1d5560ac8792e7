"""OpenVINO as a ``GraphRunner`` over an ONNX bundle's graphs: one compiled model per graph file, compiled on first
use for the chosen device and precision. Everything above "run this graph" is ``postdiff.bundle.runtime``.

Precision: OpenVINO's CPU plugin computes in bf16 by default on CPUs that have it, which moves a whole image by
up to 3e-2; PostDiff asks for f32 unless ``precision="bf16"`` is chosen, so that an OpenVINO image equals the
ONNX Runtime one. NPUs compile fixed shapes only: they need the bundle's ``--static`` graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from postdiff.bundle.manifest import Graph
from postdiff.bundle.runtime import BundlePipeline, report_executed
from postdiff.bundle.runtime import load_bundle as open_bundle
from postdiff.errors import BundleError

DEVICES = ("CPU", "GPU", "NPU")
PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}  # --precision -> INFERENCE_PRECISION_HINT


def check_options(device: str = "CPU", precision: str = "f32", static: bool = False) -> None:
    if device.split(".")[0] not in DEVICES:
        raise BundleError(f"unknown OpenVINO device {device!r}; use one of {', '.join(DEVICES)} (GPU.1 picks a second GPU)")
    if precision not in PRECISIONS:
        raise BundleError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)} (default f32)")
    if device.startswith("NPU") and not static:
        raise BundleError(
            "the NPU compiles fixed shapes only: run the bundle's static graphs with --static (export it with "
            "postdiff export onnx --static)"
        )


def core():
    import openvino as ov

    return ov.Core()


class OpenVINORunner:
    """One ``CompiledModel`` per graph file of an ONNX bundle, on ``device`` with ``precision``."""

    def __init__(self, folder: Path, *, device: str = "CPU", precision: str = "f32", threads: int | None = None) -> None:
        self.folder, self.device, self.precision, self.threads = Path(folder), device, precision, threads
        self.core = core()
        if device.split(".")[0] not in {d.split(".")[0] for d in self.core.available_devices}:
            raise BundleError(f"OpenVINO has no {device} device here (it has {', '.join(self.core.available_devices) or 'none'})")
        self.compiled: dict[str, object] = {}
        self.executed: dict[str, str] = {"device": device}  # what OpenVINO actually runs (read back after compiling)

    def config(self) -> dict:
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[self.precision]}
        if self.threads and self.device == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        return config

    def model(self, graph: Graph):
        if graph.file not in self.compiled:
            # an int8 bundle's graphs have an OpenVINO twin over the same weights (postdiff_onnx.quantize.openvino_form)
            path = self.folder / graph.file_for("openvino")
            try:
                self.compiled[graph.file] = self.core.compile_model(str(path), self.device, self.config())
            except Exception as exc:  # openvino raises RuntimeError with multi-line messages
                raise BundleError(
                    f"OpenVINO cannot compile {graph.file} for {self.device}: {str(exc).strip().splitlines()[0][:300]}"
                ) from None
            self._read_back(self.compiled[graph.file])
        return self.compiled[graph.file]

    def _read_back(self, compiled) -> None:
        """The precision the device compiled the graph for: OpenVINO's CPU plugin runs f16 as bf16 (or f32) where the
        CPU has no f16 arithmetic, without an error."""
        ran = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        caps = ", ".join(self.core.get_property(self.device, "OPTIMIZATION_CAPABILITIES")) if self.device == "CPU" else ""
        why = f" (OpenVINO's {self.device} offers {caps})" if caps else f" (OpenVINO's {self.device})"
        report_executed(self.executed, "precision", self.precision, ran, why)

    def load(self, graph: Graph) -> None:
        self.model(graph)

    def release(self, graph: Graph) -> None:
        self.compiled.pop(graph.file, None)

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # inputs are checked against the manifest by postdiff.bundle.runtime.CheckedRunner
        compiled = self.model(graph)
        result = compiled(feeds)
        return {name: np.asarray(result[compiled.output(name)]) for name in graph.output_names}


def _precision_name(element_type) -> str:
    """An OpenVINO element type as --precision names it (f32, bf16, f16)."""
    name = str(getattr(element_type, "get_type_name", lambda: element_type)())
    return {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16", "f16": "f16", "float16": "f16"}.get(name, name)


def load_bundle(
    folder: str | Path,
    *,
    device: str = "CPU",
    precision: str = "f32",
    static: bool = False,
    threads: int | None = None,
    verify: bool = True,
    low_memory: bool = False,
) -> BundlePipeline:
    """Open an ONNX bundle with OpenVINO after checking its manifest and the checksum of every file (``low_memory``:
    ``postdiff.bundle.runtime.LeanRunner``)."""
    from .backend import OpenVINOBackend

    return open_bundle(
        folder, OpenVINOBackend(), verify=verify, low_memory=low_memory, device=device, precision=precision, static=static, threads=threads
    )
