"""The few array operations the sampling loop needs, for PyTorch tensors and for numpy arrays.

The plan walk (``postdiff.loop.sampling``), the resolution switch (``postdiff.loop.resolution``) and the families' sampling
code are written once; they ask ``ops_for(x)`` for the operations of the array kind they were given. PyTorch runs
(pipelines, the diffusers hook) hand them tensors, the runtime without PyTorch numpy arrays; PyTorch is imported
only when a tensor is met. The numpy operations reproduce PyTorch's: ``randn`` draws what ``torch.randn`` draws
for the same seed (``postdiff.loop.torch_random``), ``resize_bilinear`` is ``F.interpolate(mode="bilinear",
align_corners=False)`` and ``resize_area`` is ``F.interpolate(mode="area")`` (adaptive average pooling).
"""

from __future__ import annotations

import numpy as np

from postdiff.errors import ModelError, brief
from postdiff.loop import torch_random
from postdiff.loop.numpy_schedulers import numpy_scheduler
from postdiff.plan.schedulers import NAMES, resolve, warn_if_sigmas_explode


def _resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """The n_out x n_in matrix of a 1-D resize; a 2-D resize of either mode is this along each axis."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if mode == "area":  # adaptive average pooling: output i averages inputs floor(i*n/m) .. ceil((i+1)*n/m) - 1
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m
    # bilinear, align_corners=False: half-pixel centres, clamped at the edges; positions in float32, as ATen
    f = np.float32
    scale = f(f(n_in) / f(n_out))
    for i in range(n_out):
        x = max(f(scale * f(i + 0.5) - f(0.5)), f(0.0))
        lo = min(int(x), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        w = float(f(x - f(lo)))
        m[i, lo] += 1.0 - w
        m[i, hi] += w
    return m


def to_uint8(image) -> np.ndarray:
    """HxWxC float in [0, 1] (diffusers ``output_type="np"``) or uint8 → uint8 HxWx3: how every PostDiff image file
    is written."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


class NumpyOps:
    name = "numpy"

    @staticmethod
    def generator(seed: int):
        return torch_random.TorchGenerator(seed)

    @staticmethod
    def randn(shape, generator):
        return torch_random.randn(shape, generator)

    @staticmethod
    def randn_like(like, generator):
        return torch_random.randn(like.shape, generator)

    @staticmethod
    def scheduler(name: str, config: dict):
        return numpy_scheduler(name, config)

    @staticmethod
    def cat(arrays):
        return np.concatenate(list(arrays))

    @staticmethod
    def asarray(x, dtype=None):
        return np.asarray(x, dtype=dtype)

    @staticmethod
    def float32(x):
        return np.asarray(x, dtype=np.float32)

    @staticmethod
    def like(x, ref):
        return np.asarray(x, dtype=ref.dtype)

    @staticmethod
    def follow(x, network_input):
        """``x`` where the networks take their inputs: numpy arrays stay as they are (a bundle's runner feeds each
        graph the type it takes)."""
        return x

    @staticmethod
    def zeros_like(x):
        return np.zeros_like(x)

    @staticmethod
    def clip(x, lo: float, hi: float):
        return np.clip(x, lo, hi)

    @staticmethod
    def round(x):
        return np.round(x)

    @staticmethod
    def resize(x, hw: tuple[int, int], mode: str):
        """``F.interpolate(x, size=hw, mode=mode)`` for N x C x H x W arrays, mode "bilinear" or "area"."""
        h, w = x.shape[-2:]
        rows, cols = _resize_matrix(h, hw[0], mode), _resize_matrix(w, hw[1], mode)
        out = np.einsum("ih,nchw,jw->ncij", rows, x.astype(np.float64), cols)
        return out.astype(x.dtype)

    @staticmethod
    def to_uint8_images(x):
        return ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8)

    @staticmethod
    def numpy(x):
        return np.asarray(x)


class TorchOps:
    name = "torch"

    @staticmethod
    def generator(seed: int):
        import torch

        return torch.Generator().manual_seed(seed)

    @staticmethod
    def randn(shape, generator):
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(tuple(shape), generator=generator)

    @staticmethod
    def randn_like(like, generator):
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    @staticmethod
    def scheduler(name: str, config: dict):
        return scheduler_from_config(name, config)

    @staticmethod
    def cat(arrays):
        import torch

        return torch.cat(list(arrays))

    @staticmethod
    def asarray(x, dtype=None):
        import torch

        return torch.as_tensor(x, dtype={None: None, "int64": torch.long, "float32": torch.float32}[dtype])

    @staticmethod
    def float32(x):
        return x.float()

    @staticmethod
    def like(x, ref):
        return x.to(device=ref.device, dtype=ref.dtype)

    follow = like  # ``x`` on the device and in the dtype of a tensor the networks made (``Model.to`` moved them)

    @staticmethod
    def zeros_like(x):
        import torch

        return torch.zeros_like(x)

    @staticmethod
    def clip(x, lo: float, hi: float):
        return x.clamp(lo, hi)

    @staticmethod
    def round(x):
        import torch

        return torch.round(x)

    @staticmethod
    def resize(x, hw: tuple[int, int], mode: str):
        import torch.nn.functional as F

        return F.interpolate(x, size=tuple(hw), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))

    @staticmethod
    def to_uint8_images(x):
        import torch

        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()

    @staticmethod
    def numpy(x):
        return x.detach().cpu().numpy()


NUMPY, TORCH = NumpyOps(), TorchOps()


def scheduler_from_config(name: str, config: dict):
    """A diffusers scheduler by name (a short name of ``postdiff.plan.schedulers`` or a class name), built from a
    scheduler configuration with the name's settings over it (the one lookup of the engine)."""
    import diffusers  # lazy: the loop stays importable without PyTorch (numpy runtime)

    class_name, settings = resolve(name)
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config") or not hasattr(cls, "set_timesteps"):
        raise ModelError(f"unknown scheduler {brief(name)}; use one of {', '.join(NAMES)}, or a diffusers scheduler class name")
    scheduler = cls.from_config({**dict(config), **settings})
    warn_if_sigmas_explode(scheduler, str(name))
    return scheduler


def is_tensor(x) -> bool:
    """A PyTorch tensor, told without importing PyTorch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def ops_for(x) -> NumpyOps | TorchOps:
    return TORCH if is_tensor(x) else NUMPY
