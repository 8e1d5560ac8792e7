"""The PyTorch layer: the UNet and transformer splits (the cacheable cut), the network dispatch (``backbone``), the
diffusers hook (``postdiff.apply``), the torch denoiser, the CPU convolution path, MAC counting and the graphs an
export traces. Needs the ``[torch]`` extra."""
