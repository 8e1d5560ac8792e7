"""PostDiff's Core ML backend.

    from postdiff_coreml import export_coreml, load_bundle
    export_coreml("reference", "postdiff", "bundles/reference-coreml")   # any OS: postdiff export coreml
    images = load_bundle("bundles/reference-coreml").generate([7])      # macOS only

``export`` converts each (UNet variant, latent size) the plan needs through ``torch.export`` and coremltools and
merges them into one multifunction ``.mlpackage`` with shared weights; ``runtime`` runs bundles on macOS through
``postdiff.bundle.runtime`` (its numpy loop: a Mac needs coremltools and numpy, no PyTorch). Names load on first
use; exporting needs the ``postdiff-coreml[export]`` extra.
"""

from __future__ import annotations

from postdiff.bundle.backends import lazy_package

from .backend import CoreMLBackend

__version__ = "0.1.0"
__all__ = ["COMPUTE_UNITS", "export_coreml", "load_bundle"]
_EXPORTS = {"export_coreml": "export", "COMPUTE_UNITS": "runtime", "load_bundle": "runtime"}
__getattr__, __dir__ = lazy_package(__name__, _EXPORTS, CoreMLBackend)
