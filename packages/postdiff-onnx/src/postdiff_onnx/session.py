"""ONNX Runtime sessions, made one way for the exporter's checks, the runtime and the benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from postdiff.bundle import TensorSpec
from postdiff.errors import BundleError

DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(double)": "float64",
}
DEFAULT_PROVIDER = "CPUExecutionProvider"


def make_session(path: str | Path, *, provider: str = DEFAULT_PROVIDER, threads: int | None = None):
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise BundleError(f"execution provider {provider!r} is not available in this onnxruntime; available: {', '.join(available)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # No busy-waiting between runs: the plan loop does scheduler arithmetic in torch between graph calls, and
    # spinning ORT workers would take those cores (measured: whole runs 20-30% slower with spinning on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BundleError(f"onnxruntime cannot load {Path(path).name}: {str(exc).splitlines()[0][:300]}; re-export the bundle") from None


def tensor_specs(args) -> list[TensorSpec]:
    return [TensorSpec(a.name, [d if isinstance(d, int) else str(d) for d in a.shape], DTYPES.get(a.type, a.type)) for a in args]


def run(session, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run with inputs checked against the graph first, so a wrong shape is named rather than an ORT trace."""
    for spec in session.get_inputs():
        if spec.name not in feeds:
            raise BundleError(f"graph input {spec.name!r} was not given")
        x = feeds[spec.name]
        if len(x.shape) != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, x.shape)):
            raise BundleError(f"graph input {spec.name!r} has shape {list(x.shape)}, the graph takes {list(spec.shape)}")
    names = output_names or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
