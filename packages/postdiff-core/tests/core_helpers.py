"""Helpers the core tests import (a module of its own: several test folders have a conftest.py)."""

import torch

SCHEDULERS = [
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
]


def make_pipe(kind: str = "sd", scheduler: str = "DDIMScheduler"):
    from postdiff_lab.toy import toy_pipeline

    return toy_pipeline(kind, scheduler=scheduler)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
