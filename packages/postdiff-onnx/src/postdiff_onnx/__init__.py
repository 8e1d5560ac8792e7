"""PostDiff's ONNX Runtime backend (exporter and runtime).

Not implemented yet: this package only reserves its place in the layout. The exporter will trace the
``postdiff.unet.UNetSplit`` variant modules with ``torch.onnx.export(..., dynamo=True)``.
"""

__version__ = "0.1.0"
