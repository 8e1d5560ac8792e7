"""The bundle layer: the manifest, the backend registry, the bundle runtime (numpy, no PyTorch), golden tensors and
the export skeleton every backend shares."""
