"""PostDiff's ONNX Runtime backend.

    from postdiff_onnx import export_onnx, load_bundle
    export_onnx("reference", "postdiff", "bundles/reference")          # postdiff export onnx
    images = load_bundle("bundles/reference").generate([7, 9], seed=0)  # postdiff generate --backend onnx

``export`` traces the ``postdiff.unet`` variant modules (and the text encoders, VAE decoder or class encoder)
with ``torch.onnx.export(..., dynamo=True)``; ``runtime`` runs bundles through ``postdiff.bundle_runtime``.
"""

from .export import export_onnx
from .runtime import OrtRunner, load_bundle

__version__ = "0.1.0"
__all__ = ["OrtRunner", "export_onnx", "load_bundle"]
