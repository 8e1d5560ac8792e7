import pytest
import torch

SCHEDULERS = [
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def make_pipe(kind: str = "sd", scheduler: str = "DDIMScheduler"):
    from postdiff.toy import toy_pipeline

    return toy_pipeline(kind, scheduler=scheduler)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
