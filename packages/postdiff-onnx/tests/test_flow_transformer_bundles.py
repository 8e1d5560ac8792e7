"""ONNX bundles of the flow-matching transformers (SD3's MMDiT, SANA's linear-attention DiT), on their tiny random-weight
pipelines: every graph against PyTorch at every size the plan uses, and a torch-free generation (numpy loop and
schedulers) against the PyTorch pipeline running the same plan through ``postdiff.apply``, on the final latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from postdiff.bundle.manifest import UNET, read_manifest
from postdiff.errors import ExportError
from postdiff.families.model import load_model
from postdiff.pytorch import diffusers_hook
from postdiff.pytorch.backbone import split_for
from postdiff_lab.metrics import tensor_psnr
from postdiff_onnx.runtime import load_bundle
from postdiff_onnx.session import make_session, run

# every variant a plan can call: a low-resolution phase, block caching of a middle span, then CFG gated off with
# the text's contribution cached
RECIPE = {
    "name": "flow-all-levers",
    "steps": 8,
    "low_res": {"scale": 0.5, "until": 0.25},
    "deepcache": {"interval": 2, "span": [1, 3]},
    "xattn_gate": {"after": 5},
}
MODELS = {"sd3": ("toy-sd3", {"height": 128, "width": 128}), "sana": ("toy-sana", {"height": 256, "width": 256})}
OTHER_SCHEDULER = {"toy-sd3": "flow-dpmpp-2m", "toy-sana": "flow-euler"}  # not the model's own
PROMPT = "a red apple on a table"


# SD3 by default; SANA (its linear attention, 256 px) with -m slow, like the other family-wide checks
@pytest.fixture(scope="module", params=["sd3", pytest.param("sana", marks=pytest.mark.slow)])
def flow_bundle(request, export_once):
    model, size = MODELS[request.param]
    return export_once("onnx", model, RECIPE, **size)


def test_every_graph_matches_pytorch_at_every_size(flow_bundle):
    folder, manifest = read_manifest(flow_bundle, "onnx")
    model = load_model(manifest.model["name"], need_pipeline=True)
    around = {g.name: g for g in model.family.pipeline_graphs(model)}
    variants = {g.variant for g in manifest.graphs if g.role == UNET}
    assert (
        variants == {"full", "shallow", "full_capture", "shallow_cached", "full_cached"} & variants
        and {"shallow", "full_capture"} <= variants
    )
    scores = {}
    with split_for(model.network(), block=manifest.cache_block, span=manifest.cache_span) as split:
        for graph in manifest.graphs:
            session = make_session(folder / graph.file)
            if graph.role == UNET:
                module = split.module(graph.variant)
                cases = [
                    module.example_inputs(tuple(hw), 2, text_len=model.text_len, pooled_dim=model.pooled_dim, seed=7)
                    for hw in manifest.latent_sizes
                ]
            else:
                module = around[graph.name].module
                cases = [around[graph.name].example(tuple(manifest.model["latent_hw"]), 2)]
            for ins in cases:
                with torch.no_grad():
                    expected = module(*ins.values())
                got = run(session, {k: v.numpy() for k, v in ins.items()})
                for name, e in zip(graph.output_names, expected):
                    scores[graph.name, name, tuple(ins[next(iter(ins))].shape)] = tensor_psnr(got[name], e.numpy())
    bad = {k: round(v, 1) for k, v in scores.items() if v < 60.0}
    assert scores and not bad, f"graphs below 60 dB: {bad}"


def _pytorch_latents(model_name: str, plan, scheduler: str | None, seed: int, hw) -> np.ndarray:
    """The final latent of the diffusers pipeline running ``plan`` through ``postdiff.apply`` (the PyTorch run)."""
    model = load_model(model_name, need_pipeline=True)
    pipe = model.pipeline
    if scheduler:
        pipe.scheduler = model.scheduler(scheduler)
    diffusers_hook.apply(pipe, plan.recipe)
    try:
        out = pipe(
            PROMPT,
            height=hw[0],
            width=hw[1],
            generator=model.family.generator(seed, 0),
            output_type="latent",
            **model.family.call_options(),
        )
    finally:
        diffusers_hook.remove(pipe)
    return out.images.float().numpy()


@pytest.mark.parametrize("own", [True, False], ids=["own-scheduler", "other-scheduler"])
def test_torch_free_run_matches_the_pytorch_pipeline(flow_bundle, own):
    pipe = load_bundle(flow_bundle)
    scheduler = None if own else OTHER_SCHEDULER[pipe.info["name"]]
    plan = pipe.compile(scheduler=scheduler)
    images = pipe.generate([PROMPT], plan, seed=3, scheduler=scheduler, loop="numpy")
    assert images.shape[1:3] == tuple(pipe.image_hw) and np.isfinite(images).all()
    got = pipe.final_latents
    expected = _pytorch_latents(pipe.info["name"], plan, scheduler, 3, pipe.image_hw)
    assert got.shape == expected.shape
    assert tensor_psnr(got, expected) >= 60.0
    # another seed gives other latents: the comparison is not vacuous
    pipe.generate([PROMPT], plan, seed=4, scheduler=scheduler, loop="numpy")
    assert tensor_psnr(pipe.final_latents, expected) < 30.0


def test_openvino_runs_the_bundle_as_onnx_runtime_does(flow_bundle):
    pytest.importorskip("openvino", reason="the OpenVINO backend is installed by scripts/setup.sh")
    from postdiff.bundle.runtime import load_bundle as load_with

    ort = load_with(flow_bundle, "onnx")
    ort.generate([PROMPT], seed=2)
    ov = load_with(flow_bundle, "openvino")
    ov.generate([PROMPT], seed=2)
    assert tensor_psnr(ov.final_latents, ort.final_latents) >= 60.0


def test_core_ml_refuses_flow_transformer_bundles_before_work(tmp_path):
    from postdiff.bundle.export import export_bundle

    for model in ("toy-sd3", "toy-sana"):
        with pytest.raises(ExportError, match="Core ML bundles of .* not built yet; export ONNX"):
            export_bundle("coreml", model, "baseline", tmp_path / model, log=lambda m: None)
        assert not (tmp_path / model).exists()
