"""The loop layer: the sampling loop that walks a plan, the resolution switch, conditioning, the denoiser protocol,
array operations for torch tensors and numpy arrays, numpy schedulers and torch-compatible seeded noise. Nothing
here imports PyTorch at module level: the runtime without PyTorch runs this loop on numpy."""
