"""Core ML backend runtime (macOS only): a ``GraphRunner`` over the bundle's packages and functions.

The plan checks, caches, sampling loop and prompt encoding are ``postdiff.bundle.runtime``, shared with ONNX
Runtime; this module only loads ``MLModel`` functions and calls ``predict``. Every Core ML graph has fixed
shapes, so the runtime always uses the bundle's fixed-shape graphs (``static``), ``images_per_call`` at a time.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from postdiff.bundle.manifest import Graph, read_manifest
from postdiff.bundle.runtime import BundlePipeline
from postdiff.bundle.runtime import load_bundle as open_bundle
from postdiff.errors import BundleError

COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")


def check_compute_units(units: str) -> str:
    if units not in COMPUTE_UNITS:
        raise BundleError(f"unknown compute unit {units!r}; use one of {', '.join(COMPUTE_UNITS)}")
    return units


def require_macos() -> None:
    if platform.system() != "Darwin":
        raise BundleError(
            f"Core ML bundles run only on macOS (this is {platform.system()}); here, export the model and plan as an ONNX "
            "bundle (postdiff export onnx --model M --plan P -o DIR) and run that with --backend onnx --bundle DIR"
        )


# MLComputePlan's device classes, as --compute-units names the units; which units each setting allows
DEVICE_NAMES = {"MLCPUComputeDevice": "CPU", "MLGPUComputeDevice": "GPU", "MLNeuralEngineComputeDevice": "NE"}
UNITS_ALLOWED = {"ALL": {"CPU", "GPU", "NE"}, "CPU_AND_NE": {"CPU", "NE"}, "CPU_AND_GPU": {"CPU", "GPU"}, "CPU_ONLY": {"CPU"}}


class CoreMLRunner:
    """One ``MLModel`` per (package, function), loaded on first use and kept. After each load it reads back where
    Core ML plans to run the graph's operations (``MLComputePlan``, macOS 14.4 and later): ``executed["devices"]``
    counts operations per preferred device over the graphs loaded, and a setting whose accelerators get no
    operation (``--compute-units ALL`` planned entirely on the CPU) is warned about once."""

    def __init__(self, folder: Path, compute_units: str = "ALL") -> None:
        self.folder, self.compute_units = Path(folder), check_compute_units(compute_units)
        self.models: dict[tuple[str, str | None], object] = {}
        self.executed: dict[str, str] = {"compute_units": self.compute_units}
        self.device_ops: dict[str, int] = {}

    def model(self, graph: Graph):
        key = (graph.file, graph.function)
        if key not in self.models:
            import coremltools as ct

            kwargs = {"function_name": graph.function} if graph.function else {}
            try:
                self.models[key] = ct.models.MLModel(
                    str(self.folder / graph.file), compute_units=getattr(ct.ComputeUnit, self.compute_units), **kwargs
                )
            except Exception as exc:  # coremltools raises plain Exceptions for damaged packages and missing functions
                what = f"function {graph.function} of {graph.file}" if graph.function else graph.file
                raise BundleError(f"Core ML cannot load {what}: {str(exc).splitlines()[0][:300]}; re-export the bundle") from None
            self._read_back(self.models[key], graph)
        return self.models[key]

    def _read_back(self, model, graph: Graph) -> None:
        counts = planned_devices(model, graph.function, self.compute_units)
        if counts is None:  # no MLComputePlan (macOS before 14.4): what ran is not knowable, and not claimed
            self.executed["devices"] = "unknown (MLComputePlan needs macOS 14.4)"
            return
        for device, n in counts.items():
            self.device_ops[device] = self.device_ops.get(device, 0) + n
        self.executed["devices"] = ", ".join(f"{d} {n} ops" for d, n in sorted(self.device_ops.items(), key=lambda x: -x[1]))
        accelerators = UNITS_ALLOWED[self.compute_units] - {"CPU"}
        if accelerators and not accelerators & set(self.device_ops):
            from postdiff.errors import warn_once

            warn_once(
                f"compute-units:{self.compute_units}",
                f"--compute-units {self.compute_units} runs on the CPU here: Core ML plans none of the operations loaded so "
                f"far on {' or '.join(sorted(accelerators))}; the timings are the CPU's",
            )

    def load(self, graph: Graph) -> None:
        self.model(graph)

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # inputs are checked against the manifest by postdiff.bundle.runtime.CheckedRunner
        cast = {t.name: (np.int32 if t.dtype == "int32" else np.float32) for t in graph.inputs}
        out = self.model(graph).predict({k: np.ascontiguousarray(v, dtype=cast[k]) for k, v in feeds.items() if k in cast})
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def planned_devices(model, function: str | None, compute_units: str) -> dict[str, int] | None:
    """{device: operations} Core ML's compute plan prefers for one loaded ML program function (CPU, GPU, NE), or
    None where the compute plan cannot be read (macOS before 14.4, an older coremltools)."""
    import coremltools as ct

    try:
        from coremltools.models.compute_plan import MLComputePlan

        plan = MLComputePlan.load_from_path(model.get_compiled_model_path(), compute_units=getattr(ct.ComputeUnit, compute_units))
        operations = plan.model_structure.program.functions[function or "main"].block.operations
    except Exception:  # coremltools raises plain Exceptions where the OS has no compute plan
        return None
    counts: dict[str, int] = {}
    for op in operations:
        usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
        if usage is not None:  # constants and the like have no device
            name = DEVICE_NAMES.get(type(usage.preferred_compute_device).__name__, type(usage.preferred_compute_device).__name__)
            counts[name] = counts.get(name, 0) + 1
    return counts


def inspect_bundle(folder: str | Path, *, verify: bool = True):
    """The bundle's manifest, after checking (on any OS, without loading a model) that every package opens as a
    Core ML spec and has every function the manifest names."""
    folder, manifest = read_manifest(folder, "coreml", verify=verify)
    import coremltools as ct

    specs: dict[str, set[str]] = {}
    for graph in manifest.graphs:
        if graph.file not in specs:
            try:
                spec = ct.models.MLModel(str(folder / graph.file), skip_model_load=True).get_spec()
            except Exception as exc:
                raise BundleError(
                    f"{graph.file} is not a readable Core ML package ({str(exc).splitlines()[0][:200]}); re-export the bundle"
                ) from None
            specs[graph.file] = {f.name for f in spec.description.functions}
        if graph.function and graph.function not in specs[graph.file]:
            raise BundleError(
                f"function {graph.function} is missing from {graph.file} (it has {', '.join(sorted(specs[graph.file])) or 'none'}); "
                f"re-export the bundle"
            )
    return folder, manifest


def load_bundle(folder: str | Path, *, compute_units: str = "ALL", verify: bool = True) -> BundlePipeline:
    """Open a Core ML bundle on macOS: compute units and platform are checked before anything is loaded."""
    from .backend import CoreMLBackend

    return open_bundle(folder, CoreMLBackend(), verify=verify, compute_units=compute_units)
