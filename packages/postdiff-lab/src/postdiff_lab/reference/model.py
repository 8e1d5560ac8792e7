"""The embedded reference model: a class-conditional diffusers UNet2DConditionModel on Fashion-MNIST.

Pixel space at 32x32 (28x28 zero-padded), one channel, epsilon prediction with the cosine noise schedule.
The class reaches the UNet the way text does in Stable Diffusion: as cross-attention tokens, here
``TOKENS`` learned vectors per class (``ClassEncoder``); class ``NULL_CLASS`` is the empty condition used for
classifier-free guidance. The down/up block layout mirrors SDXL's (plain blocks at full resolution,
cross-attention blocks below), so every PostDiff split, cache and export path runs on it.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
TOKENS = 4
TOKEN_DIM = 32
IMAGE_SIZE = 32
# the shipped weights of each dataset's model, folders beside this module (same architecture, own classes)
# (``-flow``: the same network trained on a rectified flow, benchmarks/reference/train_reference.py --objective flow)
WEIGHT_FOLDERS = {"fashion": "weights", "digits": "weights_digits", "fashion-flow": "weights_flow", "digits-flow": "weights_digits_flow"}


def dataset_of(key: str) -> str:
    """The dataset (``postdiff_lab.data.DATASETS``) whose classes a weights key's model draws."""
    return key.removesuffix("-flow")


UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": TOKEN_DIM,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}

# One noise schedule for training (DDPM forward process) and sampling (DDIM and the other schedulers): Stable
# Diffusion's (v3 on; v1 to v2.1 were trained on squaredcos_cap_v2, which training.json records for old folders).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


class ClassEncoder(nn.Module):
    """Class index (0-9, or NULL_CLASS) → TOKENS cross-attention tokens of TOKEN_DIM."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(NUM_CLASSES + 1, TOKENS * TOKEN_DIM)
        nn.init.normal_(self.embedding.weight, std=0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels).view(labels.shape[0], TOKENS, TOKEN_DIM)


def build(seed: int = 0):
    """A fresh (untrained) UNet and ClassEncoder."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG), ClassEncoder()
