"""PostDiff's OpenVINO backend: ONNX bundles (``postdiff export onnx``) run through the ``openvino`` runtime.

from postdiff_openvino import load_bundle
images = load_bundle("bundles/reference", device="CPU").generate([7, 9], seed=0)  # --backend openvino
"""

from .runtime import DEVICES, PRECISIONS, OpenVINORunner, load_bundle

__version__ = "0.1.0"
__all__ = ["DEVICES", "PRECISIONS", "OpenVINORunner", "load_bundle"]
