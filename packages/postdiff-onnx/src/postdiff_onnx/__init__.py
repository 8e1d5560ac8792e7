"""PostDiff's ONNX Runtime backend.

    from postdiff_onnx import export_onnx, load_bundle
    export_onnx("reference", "postdiff", "bundles/reference")          # postdiff export onnx
    images = load_bundle("bundles/reference").generate([7, 9], seed=0)  # postdiff generate --backend onnx

``export`` traces the ``postdiff.pytorch.unet`` variant modules (and the text encoders, VAE decoder or class encoder)
with ``torch.onnx.export(..., dynamo=True)`` (the ``postdiff-onnx[export]`` extra); ``runtime`` runs bundles
through ``postdiff.bundle.runtime`` with ONNX Runtime and numpy only (``python -m postdiff_onnx run BUNDLE``).
Names load on first use, so the runtime imports no PyTorch.
"""

from __future__ import annotations

from postdiff.bundle.backends import lazy_package

from .backend import OnnxBackend

__version__ = "0.1.0"
__all__ = ["OrtRunner", "export_onnx", "load_bundle"]
_EXPORTS = {"export_onnx": "export", "OrtRunner": "runtime", "load_bundle": "runtime"}
__getattr__, __dir__ = lazy_package(__name__, _EXPORTS, OnnxBackend)
