"""``reference-flow``: the embedded network trained on a rectified flow. What is checked here is that the shipped
weights are that model (a flow scheduler, trained sizes, Fashion-MNIST's classes) and that they draw the classes
asked for under the flow switch; its quality at N = 2,000 is README's table."""

import numpy as np
import pytest

from postdiff.families.model import load_model
from postdiff.loop.resolution import is_flow_matching
from postdiff_lab.reference.classifier import classify


@pytest.fixture(scope="module")
def model():
    return load_model("reference-flow", need_pipeline=True)


def test_the_flow_model_is_named_and_samples_with_its_own_scheduler(model):
    pipe = model.pipeline
    assert pipe.name == "reference-flow" and model.dataset == "fashion" and {16, 24, 32} <= set(model.training_sizes)
    assert is_flow_matching(pipe.scheduler()) and type(pipe.scheduler()).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert model.compile("postdiff").latent_sizes == [(16, 16), (32, 32)]


@pytest.mark.parametrize("plan, least", [("baseline", 0.9), ("postdiff", 0.8)])
def test_the_shipped_weights_draw_the_requested_classes(model, plan, least):
    """30 samples, three of each class: a model read with the wrong objective or scheduler draws noise (about 10%)."""
    labels = [i % 10 for i in range(30)]
    images = model.pipeline.generate(labels, plan, seed=11)
    predicted = classify(images, dataset="fashion")[0]
    assert np.mean(predicted == np.array(labels)) >= least
