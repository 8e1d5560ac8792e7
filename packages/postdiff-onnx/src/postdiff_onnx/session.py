"""ONNX Runtime sessions, made one way for the exporter's checks, the runtime and the benchmarks."""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import numpy as np

from postdiff.bundle.manifest import TensorSpec
from postdiff.errors import BundleError

from .weights import weights_bytes

DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(double)": "float64",
}
DEFAULT_PROVIDER = "CPUExecutionProvider"
# Below this many bytes of weights, a bundle's sessions pre-pack by default (``make_session``'s ``prepack``): on the
# 4 MB reference model the copies cost about 20 MB and ORT's NCHWc layout made the graphs 1.2-1.7x faster; on SD1.5
# (3.4 GB) they cost 7.6 GB and bought no speed (measured, docs/backends/onnx.md "Edge-grade bundles").
PREPACK_BELOW_BYTES = 256 * 2**20
PREPACK_HELP = (
    "ONNX Runtime sessions re-lay out and pre-pack weights, each into a copy of its own (faster kernels, more memory); "
    f"--no-prepack: every session on the bundle's one copy (default: prepack below {PREPACK_BELOW_BYTES >> 20} MB of weights "
    "and for int4 bundles)"
)


def default_prepack(folder: Path, weights: str = "fp32", *, small: bool | None = None) -> bool:
    """Whether a session of the bundle in ``folder`` pre-packs when not told: below ``PREPACK_BELOW_BYTES`` of weights
    (``small``, when the caller has measured it already), and always for a graph of int4 weights (``MatMulNBits``
    unpacked dequantizes every block on every call: 3-10x slower, ``benchmarks/bench_quant_ops.py``)."""
    if weights == "int4":
        return True
    return weights_bytes(folder) < PREPACK_BELOW_BYTES if small is None else small


def make_session(
    path: str | Path,
    *,
    provider: str = DEFAULT_PROVIDER,
    threads: int | None = None,
    initializers: dict | None = None,
    prepack: bool = True,
    arena: bool = True,
):
    """An ONNX Runtime session for one graph; ``initializers`` ({name: OrtValue}) are weights shared with the
    other sessions of the bundle instead of loaded from the file again (``weights.SharedInitializers``).

    ``prepack`` (ORT's own default): ORT re-lays convolution weights out for its CPU kernels (the NCHWc layout
    optimisations of ORT_ENABLE_ALL) and pre-packs matrix weights, each session into copies of its own, so a bundle
    of five UNet graphs holds up to five copies. Without it the session keeps to the shared weights
    (ORT_ENABLE_EXTENDED, no pre-packing). ``runtime.OrtRunner`` chooses by the bundle's size. Measured on arch:sd15 at 256 px (benchmarks/results/onnx_cpu_sd15_256_lowmem.json
    and bundles.json): a postdiff run peaked at 11.6 GB with ``prepack`` against 4.0 GB without, and ran no faster
    (fastest of 2 whole runs: 11.7 s against 11.3 s; baseline 41.1 s against 43.1 s). ``arena``: ONNX Runtime's CPU
    memory arena (``runtime.OrtRunner``)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise BundleError(f"execution provider {provider!r} is not available in this onnxruntime; available: {', '.join(available)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if prepack else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = bool(arena)
    # No busy-waiting between runs: every session has its own worker pool, a plan switches between several
    # sessions, and the spinning workers of the idle ones take the cores of the one running (measured on the
    # reference model, 10 images per call, 2 cores: a whole postdiff run 1.7x slower with spinning on).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BundleError(f"onnxruntime cannot load {Path(path).name}: {str(exc).splitlines()[0][:300]}; re-export the bundle") from None


# torch.export names a dimension it cannot express in the named input dimensions (batch, h, w) with an internal
# symbol such as ``s39`` (an output shape then reads ``2*s39``); the manifest names such a dimension after its
# tensor and axis instead, so that nothing in a bundle depends on the exporter's internal numbering.
_INTERNAL_SYMBOL = re.compile(r"\bs\d+\b")


def _dim(d, name: str, axis: int):
    if isinstance(d, int):
        return d
    text = str(d)
    return f"{name}_dim{axis}" if (not text or text == "None" or _INTERNAL_SYMBOL.search(text)) else text


def tensor_specs(args) -> list[TensorSpec]:
    return [TensorSpec(a.name, [_dim(d, a.name, i) for i, d in enumerate(a.shape)], DTYPES.get(a.type, a.type)) for a in args]


# Each session's output names, read once: a plan run calls small graphs hundreds of times, and asking the session
# again builds new Python objects on every call.
_OUTPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def run(session, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run a session (inputs are checked against the manifest by ``postdiff.bundle.runtime.CheckedRunner``)."""
    names = output_names or _OUTPUTS.get(session)
    if names is None:
        names = _OUTPUTS[session] = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
