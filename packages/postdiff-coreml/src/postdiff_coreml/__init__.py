"""PostDiff's Core ML backend (multifunction .mlpackage exporter and macOS runtime).

Not implemented yet: this package only reserves its place in the layout. The exporter will convert the
``postdiff.unet.UNetSplit`` variant modules through ``torch.export`` and coremltools.
"""

__version__ = "0.1.0"
