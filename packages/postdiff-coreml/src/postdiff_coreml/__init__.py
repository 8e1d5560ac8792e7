"""PostDiff's Core ML backend.

    from postdiff_coreml import export_coreml, load_bundle
    export_coreml("reference", "postdiff", "bundles/reference-coreml")   # any OS: postdiff export coreml
    images = load_bundle("bundles/reference-coreml").generate([7])      # macOS only

``export`` converts each (UNet variant, latent size) the plan needs through ``torch.export`` and coremltools and
merges them into one multifunction ``.mlpackage`` with shared weights; ``runtime`` runs bundles on macOS through
``postdiff.bundle_runtime``.
"""

from .export import export_coreml
from .runtime import COMPUTE_UNITS, load_bundle

__version__ = "0.1.0"
__all__ = ["COMPUTE_UNITS", "export_coreml", "load_bundle"]
