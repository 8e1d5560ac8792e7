"""PyTorch's CPU random numbers, drawn with numpy: so that a run without PyTorch draws the very noise a PyTorch run
of the same seed draws, and a bundle's images pair with the PyTorch images seed for seed.

``torch.Generator().manual_seed(s)`` is the 32-bit Mersenne Twister seeded with ``s mod 2**32`` (the standard
``init_genrand``), the same generator as numpy's legacy ``RandomState(s)``. ``torch.randn`` of 16 values or more
(every latent is) turns that stream into normals as ATen's ``normal_fill`` does (aten/src/ATen/native/cpu/
DistributionTemplates.h): one float32 uniform per value, ``(bits & 0xFFFFFF) / 2**24``, then Box-Muller over
blocks of 16 (values j and j + 8 of a block from the pair), and, when the count is not a multiple of 16, 16 fresh
uniforms for the last 16 values. PyTorch's vectorised log/sin/cos differ from numpy's in the last float32 bits
(about 1e-7 relative), which is all that differs.

PyTorch is not imported here; ``diffusers.utils.torch_utils.randn_tensor`` is what ``randn`` follows for a list
of generators (one draw per batch item).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MANTISSA = np.uint32((1 << 24) - 1)
_TWO_PI = np.float32(2.0 * np.pi)


class TorchGenerator:
    """A numpy stand-in for ``torch.Generator().manual_seed(seed)`` (CPU), for ``randn`` of float32 tensors."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._state = np.random.RandomState(self.seed & 0xFFFFFFFF)  # init_genrand, as at::mt19937(seed)

    def manual_seed(self, seed: int) -> TorchGenerator:
        self.__init__(seed)
        return self

    def _uniform(self, n: int) -> np.ndarray:
        bits = self._state.randint(0, 1 << 32, size=n, dtype=np.uint32)  # the raw 32-bit stream
        return (bits & _MANTISSA).astype(np.float32) * np.float32(2.0**-24)

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """float32 normals of ``shape``, equal to ``torch.randn(shape, generator=g)`` for a generator in the same state."""
        shape = tuple(int(s) for s in shape)
        n = int(np.prod(shape)) if shape else 1
        if n < 16:  # ATen draws fewer than 16 values one at a time in double precision; no latent is that small
            raise ValueError(f"randn of {n} values: only tensors of 16 values or more are drawn as PyTorch draws them")
        data = self._uniform(n)
        blocks = n // 16
        data[: blocks * 16] = _box_muller(data[: blocks * 16].reshape(blocks, 16)).reshape(-1)
        if n % 16:
            data[n - 16 :] = _box_muller(self._uniform(16).reshape(1, 16)).reshape(-1)
        return data.reshape(shape)


def _box_muller(u: np.ndarray) -> np.ndarray:
    """ATen's NormalFill16 (mean 0, std 1) on rows of 16 uniforms."""
    u1 = np.float32(1.0) - u[:, :8]  # [0, 1) -> (0, 1] for the log
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = _TWO_PI * u[:, 8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).astype(np.float32, copy=False)


def randn(shape: Sequence[int], generator: TorchGenerator | Sequence[TorchGenerator]) -> np.ndarray:
    """``randn_tensor(shape, generator)``: one draw of ``shape`` from one generator, or with a list of generators
    one draw of ``shape[1:]`` per batch item from its own generator."""
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}; give one per batch item")
        return np.concatenate([g.randn((1, *shape[1:])) for g in generator])
    if generator is None:
        raise ValueError("a generator is needed: draws without one could not be reproduced")
    return generator.randn(shape)
