"""A class-conditional model trained on a rectified flow (as ``reference-flow`` is) through the PyTorch loop and an ONNX
bundle run without PyTorch: the flow-matching Euler scheduler in numpy, the flow switch of a mixed-resolution plan,
and the bundle's images against PyTorch's. The weights here are random (what is tested is the arithmetic, not
the images): the trained model's quality is its eval table's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from postdiff.families.model import Model
from postdiff.loop.resolution import is_flow_matching
from postdiff_lab.metrics import psnr
from postdiff_lab.reference import model as ref
from postdiff_lab.reference.pipeline import ReferencePipeline
from postdiff_onnx.export import export_onnx
from postdiff_onnx.runtime import load_bundle

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory) -> Model:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("flow_weights")
    unet, enc = ref.build(seed=5)
    tensors = {f"unet.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    tensors |= {f"class_encoder.{k}": v.contiguous() for k, v in enc.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "training.json").write_text(json.dumps({"sizes": [16, 24, 32], "objective": "flow", "scheduler": FLOW}))
    pipe = ReferencePipeline.load(folder)
    return Model(
        name="flow-test",
        unet_config=dict(ref.UNET_CONFIG),
        scheduler_config=dict(pipe.scheduler_config),
        vae_scale_factor=1,
        text_len=ref.TOKENS,
        pipeline=pipe,
        family_name="class-conditional",
    )


def test_the_model_samples_with_its_own_flow_scheduler(flow_model):
    sch = flow_model.pipeline.scheduler()
    assert type(sch).__name__ == "FlowMatchEulerDiscreteScheduler" and is_flow_matching(sch)
    plan = flow_model.compile("postdiff")
    assert plan.scheduler == "FlowMatchEulerDiscreteScheduler" and plan.latent_sizes == [(16, 16), (32, 32)]
    images = flow_model.pipeline.generate([1, 7], plan, seed=3)
    again = flow_model.pipeline.generate([1, 7], plan, seed=3)
    assert images.shape == (2, 32, 32) and np.array_equal(images, again)


@pytest.fixture(scope="module")
def flow_bundle(flow_model, tmp_path_factory) -> Path:
    return export_onnx(flow_model, "postdiff", tmp_path_factory.mktemp("flow_bundle") / "b", log=lambda *_: None)


@pytest.mark.slow  # its own export; the flow runtime is covered by default by SD3's and SANA's bundles
@pytest.mark.parametrize("plan,scheduler", [("postdiff", None), ("baseline", None), ("postdiff", "flow-dpmpp-2m")])
def test_the_bundle_runs_the_flow_plan_without_torch_as_pytorch_does(flow_model, flow_bundle, plan, scheduler):
    pipe = load_bundle(flow_bundle)
    assert pipe.info["scheduler_config"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    numpy_images = pipe.generate([2, 5], plan, seed=4, scheduler=scheduler, loop="numpy")
    torch_images = pipe.generate([2, 5], plan, seed=4, scheduler=scheduler, loop="torch")
    assert min(psnr(a, b) for a, b in zip(numpy_images, torch_images)) >= 60.0
    reference = flow_model.pipeline.generate([2, 5], plan, seed=4, scheduler=scheduler).astype(np.float32) / 255.0
    assert min(psnr(a[..., 0], b) for a, b in zip(numpy_images, reference)) >= 35.0  # 8-bit PyTorch images


@pytest.mark.slow  # its own export; the flow runtime is covered by default by SD3's and SANA's bundles
def test_a_noise_prediction_scheduler_is_refused_by_the_flow_bundle(flow_bundle):
    from postdiff.errors import ModelError

    pipe = load_bundle(flow_bundle)
    with pytest.raises(ModelError, match="rectified flow"):
        pipe.generate([1], "postdiff", scheduler="ddim", loop="numpy")
