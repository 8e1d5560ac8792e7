"""ONNX export and runtime: graphs, manifest, PSNR against PyTorch per graph and end to end, static copies."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from postdiff.bundle.manifest import UNET, read_manifest
from postdiff.errors import ModelError
from postdiff.families.model import load_model
from postdiff.plan.schedulers import NAMES, is_flow_scheduler, resolve
from postdiff.pytorch.backbone import split_for
from postdiff.pytorch.macs import MacCounter
from postdiff_lab.generation import source_for
from postdiff_lab.metrics import psnr, tensor_psnr
from postdiff_onnx.runtime import load_bundle
from postdiff_onnx.session import make_session, run

HERE = Path(__file__).resolve().parent
ALL = ["reference", "sd", "sdxl", "lcm", "pixart", "pixart-sigma"]
# every family with -m slow; by default only the reference model and SD (an export each, 1-2 minutes on 2 cores): the
# LCM path is covered by the core's LCM tests; the DiT path (block and cross-attention caching, a masked text encoder)
# by SANA's bundle and several text encoders in one bundle by SD3's (test_flow_transformer_bundles.py); SDXL's size
# conditioning and PixArt's resolution conditioning by their PyTorch tests
SLOW_FAMILIES = ("lcm", "pixart", "sdxl", "pixart-sigma")


def families(names=ALL, *more):
    """pytest params over ``names`` (with ``more`` values each), the slow families marked."""
    return [pytest.param(n, *more, marks=[pytest.mark.slow] if n in SLOW_FAMILIES else []) for n in names]


def _graph_psnrs(bundle: Path) -> dict[tuple[str, str], float]:
    """Independent of the exporter's own check: PyTorch vs ORT for every dynamic graph at every latent size."""
    folder, manifest = read_manifest(bundle, "onnx")
    model = load_model(manifest.model["name"], need_pipeline=True)
    others = {g.name: g for g in model.family.pipeline_graphs(model)}
    out = {}
    with split_for(model.network(), block=manifest.cache_block, span=manifest.cache_span) as split:
        for graph in manifest.graphs:
            if graph.latent_hw is not None:
                continue
            session = make_session(folder / graph.file)
            if graph.role == UNET:
                module = split.module(graph.variant)
                sizes = [tuple(s) for s in manifest.latent_sizes]

                def example(hw, module=module):
                    return module.example_inputs(hw, 2, text_len=model.text_len, pooled_dim=model.pooled_dim, seed=7)
            else:
                module, example, sizes = (
                    others[graph.name].module,
                    (lambda hw, g=others[graph.name]: g.example(hw, 2)),
                    [tuple(manifest.model["latent_hw"])],
                )
            for hw in sizes:
                ins = example(hw)
                with torch.no_grad():
                    expected = module(*ins.values())
                got = run(session, {k: v.numpy() for k, v in ins.items()})
                out[(graph.name, f"{hw[0]}x{hw[1]}")] = min(tensor_psnr(got[n], e.numpy()) for n, e in zip(graph.output_names, expected))
    return out


@pytest.mark.parametrize("name", families())
def test_every_graph_matches_torch_at_every_size_fp32(bundles, name):
    psnrs = _graph_psnrs(bundles(name))
    assert psnrs, "no graphs checked"
    bad = {k: round(v, 1) for k, v in psnrs.items() if v < 60.0}
    assert not bad, f"fp32 graphs below 60 dB: {bad}"


def test_fp16_graphs_and_image_pass_the_35_db_gate(bundles):
    bundle = bundles("reference_fp16")
    _, manifest = read_manifest(bundle, "onnx")
    assert manifest.precision == "fp16"
    psnrs = _graph_psnrs(bundle)
    bad = {k: round(v, 1) for k, v in psnrs.items() if v < 35.0}
    assert not bad, f"fp16 graphs below 35 dB: {bad}"
    pipe = load_bundle(bundle)
    got = pipe.generate(list(range(10)), seed=2)
    ref = source_for(load_model("reference", need_pipeline=True)).generate("deepcache", 10, seed=2)
    assert min(psnr(a, b) for a, b in zip(got, ref.images)) >= 35.0


@pytest.mark.parametrize("name", families())
def test_end_to_end_image_matches_torch(bundles, name):
    pipe = load_bundle(bundles(name))
    plan = pipe.compile()
    conditions = [3, 8, 9] if name == "reference" else ["a red apple on a table", "a lighthouse"]
    got = pipe.generate(conditions, plan, seed=5)
    h, w = pipe.image_hw
    torch_run = source_for(load_model(pipe.info["name"], need_pipeline=True), height=h, width=w).generate(
        plan.recipe, len(conditions), seed=5, conditions=conditions
    )
    assert got.shape == torch_run.images.shape
    scores = [psnr(a, b) for a, b in zip(got, torch_run.images)]
    assert min(scores) >= 35.0, scores
    # a different seed gives a different image: the comparison is not vacuous
    other = pipe.generate(conditions[:1], plan, seed=6)
    assert psnr(other[0], got[0]) < 35.0


def test_manifest_describes_the_bundle(bundles):
    folder, manifest = read_manifest(bundles("reference"), "onnx")
    plan = load_bundle(folder).compile()
    dynamic = [g for g in manifest.graphs if g.role == UNET and g.latent_hw is None]
    assert sorted(g.variant for g in dynamic) == sorted({v for v, _ in plan.variants()})
    assert {g.role for g in manifest.graphs} == {UNET, "class_encoder"}
    assert [tuple(s) for s in manifest.latent_sizes] == plan.latent_sizes == [(16, 16), (32, 32)]
    assert manifest.recipe["name"] == "postdiff" and manifest.cache_block == 0
    # every file is listed with its sha256; graphs name files that exist
    assert all(len(d) == 64 for d in manifest.files.values())
    assert {g.file for g in manifest.graphs} <= set(manifest.files)
    assert all((folder / f).is_file() for f in manifest.files)
    # cache tensors: the DeepCache feature and the captured cross-attention maps, with shapes and dtypes
    names = {t.name: t for t in manifest.cache_tensors}
    assert "deep" in names and any(n.startswith("xattn_") for n in names)
    assert names["deep"].dtype == "float32" and len(names["deep"].shape) == 4
    # MACs per graph agree with the core's cost model
    counter = MacCounter(load_model("reference").unet_config, block=0, text_len=4)
    for g in dynamic:
        for key, macs in g.macs.items():
            h, w = map(int, key.split("x"))
            assert macs == counter.macs(g.variant, (h, w), 1)
    assert {"torch", "onnx", "onnxruntime", "postdiff-core"} <= set(manifest.tools)
    # the exporter's own PSNR check is recorded
    assert all(v >= 60.0 for g in dynamic for v in g.psnr.values())


def test_static_copies_are_fixed_shape_and_give_the_same_images(bundles):
    bundle = bundles("reference")
    _, manifest = read_manifest(bundle, "onnx")
    static = [g for g in manifest.graphs if g.latent_hw is not None]
    plan = load_bundle(bundle).compile()
    wanted = {(s.variant, tuple(s.latent_hw), 2 if s.guidance == "cfg" else 1) for s in plan.steps}
    assert {(g.variant, tuple(g.latent_hw), g.batch) for g in static} == wanted
    for g in static:
        assert all(isinstance(d, int) for t in g.inputs for d in t.shape), g.name
        assert g.inputs[0].shape == [g.batch, 1, *g.latent_hw]
    # the copies share the dynamic graph's weight file instead of duplicating it
    assert not any(f.endswith(".b1.onnx.data") or f.endswith(".b2.onnx.data") for f in manifest.files)
    dynamic = load_bundle(bundle).generate([4, 5], seed=1)
    fixed = load_bundle(bundle, static=True).generate([4, 5], seed=1)
    assert np.array_equal(dynamic, fixed)


def test_fresh_process_generates_without_building_a_torch_model(bundles, tmp_path):
    """What a new user does: export, then generate from the bundle in another process. Every nn.Module
    constructor is disabled there: the UNet and the class encoder can only run in ONNX Runtime."""
    out = tmp_path / "boot.png"
    script = HERE / "no_torch_models.py"
    cmd = [sys.executable, str(script), "generate", "--backend", "onnx", "--bundle", str(bundles("reference")), "--prompt", "Ankle boot"]
    proc = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "wrote" in proc.stdout
    # the guard is real: the torch backend in the same harness fails
    proc = subprocess.run(
        [sys.executable, str(script), "generate", "-o", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "PyTorch model was built" in proc.stderr


@pytest.mark.slow  # the SDXL bundle (SLOW_FAMILIES)
def test_bundle_plan_sizes_and_psnr_are_finite(bundles):
    _, manifest = read_manifest(bundles("sdxl"), "onnx")
    assert [tuple(s) for s in manifest.latent_sizes] == [(12, 12), (16, 16)]
    assert {g.role for g in manifest.graphs} == {UNET, "text_encoder", "text_encoder_2", "vae_decoder"}
    assert all(math.isfinite(v) for g in manifest.graphs for v in g.psnr.values())
    data = json.loads((bundles("sdxl") / "manifest.json").read_text())
    assert data["model"]["kind"] == "sdxl" and data["model"]["pooled_dim"] == 32


def test_every_tensor_of_every_graph_is_stored_once_in_one_file(bundles):
    """A postdiff bundle with --static copies: 5 dynamic UNet graphs, 4 static ones and the class encoder all read
    one weights file, in which no tensor's bytes appear twice; its size is the model's weights, not 10 times them."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    from postdiff.families.model import load_model
    from postdiff_onnx.weights import WEIGHTS_FILE, WEIGHTS_INDEX

    folder = bundles("reference")
    assert sorted(p.name for p in folder.glob("*.data")) == [WEIGHTS_FILE]
    places = {}
    for graph in sorted(folder.glob("*.onnx")):
        for t in _get_all_tensors(onnx.load(str(graph), load_external_data=False)):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                assert info["location"] == WEIGHTS_FILE
                places.setdefault((info["offset"], info["length"]), set()).add(graph.name)
    assert max(len(graphs) for graphs in places.values()) >= 6  # the same bytes serve every UNet graph
    files = sorted(folder.glob("*.onnx"))
    assert len({f.read_bytes() for f in files}) == len(files)  # identical graphs kept once ...
    manifest = json.loads((folder / "manifest.json").read_text())
    variants = {g["variant"]: g["file"] for g in manifest["graphs"] if g["variant"] and g["batch"] is None}
    assert variants["shallow_cached"] == variants["shallow"] == "unet_shallow.onnx"  # ... and named by both variants
    assert {g["file"] for g in manifest["graphs"]} == {f.name for f in files}
    originals = json.loads((folder / WEIGHTS_INDEX).read_text())["names"]  # short initializer name -> exporter's
    graph = onnx.load(str(folder / "unet_full.onnx"), load_external_data=False).graph
    assert {originals[t.name] for t in graph.initializer} >= {"unet.conv_in.weight", "unet.conv_out.bias"}
    data = (folder / WEIGHTS_FILE).read_bytes()
    chunks = [data[int(o) : int(o) + int(n)] for o, n in places]
    assert len(set(chunks)) == len(chunks)  # each distinct tensor once
    pipe = load_model("reference", need_pipeline=True).pipeline
    weights = sum(p.numel() * 4 for m in (pipe.unet, pipe.class_encoder) for p in m.parameters())
    assert len(data) <= 1.05 * weights


# LCM's own scheduler draws noise at every step, and it takes no other (test_lcm_takes_its_own_scheduler_only)
@pytest.mark.parametrize(
    "name, scheduler", families(ALL, None) + families([n for n in ALL if n != "lcm"], "EulerAncestralDiscreteScheduler")
)
def test_numpy_loop_matches_the_torch_loop_on_the_same_bundle(bundles, name, scheduler):
    """The runtime without PyTorch (numpy schedulers, PyTorch-equal noise) against the same graphs driven by
    diffusers' schedulers on tensors: the stored plan, and an ancestral sampler that draws noise at every step."""
    pipe = load_bundle(bundles(name))
    plan = pipe.compile(scheduler=scheduler)
    conditions = [3, 9] if name == "reference" else ["a red apple on a table"]
    a = pipe.generate(conditions, plan, seed=4, scheduler=scheduler, loop="numpy")
    b = pipe.generate(conditions, plan, seed=4, scheduler=scheduler, loop="torch")
    scores = [psnr(x, y) for x, y in zip(a, b)]
    assert min(scores) >= 60.0, scores


@pytest.mark.parametrize(
    "scheduler",
    [
        n if n in ("dpmpp-2m-karras", "heun", "euler-a", "pndm") else pytest.param(n, marks=pytest.mark.slow)
        # every other scheduler the reference bundle (DDIM) can run: not lcm, not the flow-matching ones, not its own
        for n in [*(n for n in NAMES if n not in ("lcm", "ddim") and not is_flow_scheduler(n)), "HeunDiscreteScheduler"]
    ],
)
def test_a_bundle_runs_another_scheduler_from_its_recompiled_plan(bundles, scheduler):
    """docs/backends/onnx.md: asking a bundle for another scheduler recompiles the plan from the recipe for it; the plan carries the
    scheduler it was compiled for, so generate(plan) runs that scheduler (numpy and torch loops alike) and no other."""
    pipe = load_bundle(bundles("reference"))
    plan = pipe.compile("postdiff", scheduler=scheduler)
    assert "scheduler differs from the bundle's" in pipe.plan_note and resolve(plan.scheduler) == resolve(scheduler)
    a = pipe.generate([3, 9], plan, seed=4, loop="numpy")
    b = pipe.generate([3, 9], plan, seed=4, loop="torch")
    assert min(psnr(x, y) for x, y in zip(a, b)) >= 60.0
    ddim = pipe.generate([3, 9], "postdiff", seed=4)
    assert max(psnr(x, y) for x, y in zip(a, ddim)) < 60.0  # another sampler, another image


@pytest.mark.slow  # the SDXL bundle (SLOW_FAMILIES)
def test_bundle_tokenizer_gives_the_ids_transformers_gives(bundles):
    from transformers import AutoTokenizer

    from postdiff.bundle.runtime import BundleTokenizer

    folder = bundles("sdxl")
    for name in ("tokenizer", "tokenizer_2"):
        ours, theirs = BundleTokenizer(folder / name), AutoTokenizer.from_pretrained(str(folder / name))
        for text in ("", "a red apple on a table", "Ünïcode, punctuation!? and  spaces", " ".join(["word"] * 120)):
            expected = theirs([text], padding="max_length", max_length=theirs.model_max_length, truncation=True).input_ids
            np.testing.assert_array_equal(ours.ids(text), np.asarray(expected))


def test_sessions_share_weights_from_the_index_without_the_onnx_package(bundles, monkeypatch):
    """The runtime reads which initializers sit where from weights.index.json; the onnx package (absent from a
    runtime-only install) gives the same answer for the same graph."""
    from postdiff_onnx.weights import WEIGHTS_INDEX, SharedInitializers

    folder = bundles("reference")
    graph = folder / "unet_full.onnx"
    assert (folder / WEIGHTS_INDEX).is_file()
    from_index = SharedInitializers(folder).for_graph(graph)
    index = (folder / WEIGHTS_INDEX).read_text()
    (folder / WEIGHTS_INDEX).rename(folder / "index.moved")
    try:
        (folder / WEIGHTS_INDEX).write_text(json.dumps(json.loads(index)["graphs"]))  # the index of 2026-12-03 bundles
        from_old_index = SharedInitializers(folder).for_graph(graph)
        (folder / WEIGHTS_INDEX).unlink()
        from_onnx = SharedInitializers(folder).for_graph(graph)
        monkeypatch.setitem(sys.modules, "onnx", None)  # what a runtime-only install sees
        assert SharedInitializers(folder).for_graph(graph) == {}  # old bundle, no onnx: each session loads its own
    finally:
        (folder / "index.moved").rename(folder / WEIGHTS_INDEX)
    assert len(from_index) > 10 and set(from_index) == set(from_onnx) == set(from_old_index)
    for name, value in from_index.items():
        np.testing.assert_array_equal(value.numpy(), from_onnx[name].numpy())


def test_ort_runtime_passes_its_bundles_golden_file(bundles):
    """What an app does with golden.npz: each graph's recorded first inputs through its runtime, outputs compared;
    then the whole plan for the recorded seed, final latent compared."""
    from postdiff.bundle.golden import GOLDEN_FILE, read_golden

    folder, manifest = read_manifest(bundles("reference"), "onnx")
    entry = manifest.golden
    assert entry and entry["file"] == GOLDEN_FILE and entry["seed"] == 0
    golden = read_golden(folder)
    pipe = load_bundle(folder)
    assert {"unet_full", "unet_full_capture", "unet_shallow_cached", "class_encoder"} <= set(entry["graphs"])
    by_name = {g.name: g for g in manifest.graphs}
    for name, io in entry["graphs"].items():
        feeds = {k: golden[f"graph/{name}/in/{k}"] for k in io["inputs"]}
        out = pipe.runner.run(by_name[name], feeds)
        for k in io["outputs"]:
            assert tensor_psnr(out[k], golden[f"graph/{name}/out/{k}"]) >= 60.0, (name, k)
    images = pipe.generate([entry["condition"]], seed=entry["seed"])
    assert tensor_psnr(pipe.final_latents, golden["final_latent"]) >= 60.0
    assert psnr(images[0], golden["image"]) >= 60.0
    # the golden values are specific: another seed's final latent is far from them
    pipe.generate([entry["condition"]], seed=1)
    assert tensor_psnr(pipe.final_latents, golden["final_latent"]) < 30.0


def test_shared_and_prepacked_sessions_give_the_same_images(bundles, monkeypatch):
    """Sessions on the bundle's one copy of the weights (--no-prepack) and --prepack sessions (ORT's re-layout and
    pre-packing, a copy each) change where the weights live, not the result; the default follows the bundle's size."""
    from postdiff_onnx import session
    from postdiff_onnx.weights import weights_bytes

    folder = bundles("reference")
    packed = load_bundle(folder)  # 4 MB of weights: pre-packed by default
    a = packed.generate([3, 9], seed=8)
    shared = load_bundle(folder, prepack=False)
    b = shared.generate([3, 9], seed=8)
    assert min(psnr(x, y) for x, y in zip(a, b)) >= 60.0

    def levels(runner):
        return {s.get_session_options().graph_optimization_level.name for s in runner.sessions.values()}

    assert levels(shared.runner) == {"ORT_ENABLE_EXTENDED"} and levels(packed.runner) == {"ORT_ENABLE_ALL"}
    assert weights_bytes(folder) > 4e6
    graphs = read_manifest(folder, "onnx")[1].graphs
    monkeypatch.setattr(session, "PREPACK_BELOW_BYTES", 4e6)  # as if the weights were large: shared by default
    assert not any(load_bundle(folder).runner.prepacks(g) for g in graphs)
    assert all(load_bundle(folder, prepack=True).runner.prepacks(g) for g in graphs)


@pytest.mark.slow
def test_lcm_takes_its_own_scheduler_only(bundles):
    pipe = load_bundle(bundles("lcm"))
    with pytest.raises(ModelError, match="LCM models sample with LCMScheduler \\(lcm\\) only, not 'DDIMScheduler'"):
        pipe.compile(scheduler="DDIMScheduler")
    assert pipe.compile(scheduler="LCMScheduler").scheduler == "LCMScheduler"


@pytest.mark.parametrize("shift", [-2, 3])
def test_a_shifted_switch_runs_from_the_bundle_on_both_loops(bundles, shift):
    """low_res.renoise_shift through the numpy runtime: the numpy schedulers restart at the shifted index as
    diffusers' do, and the bundle's image follows the PyTorch model's."""
    from postdiff.plan.recipe import load_recipe

    pipe = load_bundle(bundles("reference"))
    stored = load_recipe(pipe.manifest.recipe)
    shifted = load_recipe({**stored.to_dict(), "name": f"shift{shift}", "low_res": {"scale": 0.5, "until": 0.5, "renoise_shift": shift}})
    plan = pipe.compile(shifted)
    assert len(plan.steps) == stored.steps + shift and "recompiled" in pipe.plan_note
    a = pipe.generate([3, 9], plan, seed=4, loop="numpy")
    b = pipe.generate([3, 9], plan, seed=4, loop="torch")
    assert min(psnr(x, y) for x, y in zip(a, b)) >= 60.0
    ref = source_for(load_model("reference", need_pipeline=True)).generate(shifted, 2, seed=4, conditions=[3, 9])
    assert min(psnr(x, y) for x, y in zip(a, ref.images)) >= 35.0


@pytest.mark.slow
def test_pixart_bundle_without_its_text_encoder_takes_prompt_embeddings(bundles, tmp_path):
    """T5-XXL is 4.7B parameters: a PixArt bundle may leave it out and take the embeddings the diffusers pipeline's
    encode_prompt gives; the image equals the full bundle's from the prompt."""
    from postdiff.bundle.export import export_bundle
    from postdiff.errors import BundleError, ExportError
    from postdiff.loop.conditioning import PromptEmbeddings

    lean = bundles("pixart-sigma", without=("text_encoder",))
    _, manifest = read_manifest(lean, "onnx")
    model, recipe = manifest.model["name"], manifest.recipe
    assert "text_encoder" not in {g.role for g in manifest.graphs} and manifest.model["without"] == ["text_encoder"]
    pipeline = load_model(model, need_pipeline=True).pipeline
    with torch.no_grad():
        pos, pos_mask, neg, neg_mask = pipeline.encode_prompt("A Lighthouse", clean_caption=False, max_sequence_length=300)
    path = tmp_path / "embeds.npz"
    np.savez(
        path,
        prompt_embeds=pos.numpy(),
        prompt_attention_mask=pos_mask.numpy(),
        negative_prompt_embeds=neg.numpy(),
        negative_prompt_attention_mask=neg_mask.numpy(),
    )
    got = load_bundle(lean).generate([PromptEmbeddings.load(path)], seed=3)
    full = load_bundle(bundles("pixart-sigma")).generate(["A Lighthouse"], seed=3)
    assert psnr(got[0], full[0]) >= 60.0
    with pytest.raises(BundleError, match="exported without its T5 text encoder"):
        load_bundle(lean).generate(["a lighthouse"], seed=3)
    np.savez(tmp_path / "pos_only.npz", prompt_embeds=pos.numpy(), prompt_attention_mask=pos_mask.numpy())
    with pytest.raises(BundleError, match="needs negative_prompt_embeds"):
        load_bundle(lean).generate([PromptEmbeddings.load(tmp_path / "pos_only.npz")], seed=3)
    assert load_bundle(lean).generate([PromptEmbeddings.load(tmp_path / "pos_only.npz")], seed=3, guidance_scale=1.0).shape == got.shape
    with pytest.raises(ExportError, match="only text_encoder may be left out"):
        export_bundle("onnx", model, recipe, tmp_path / "x", without=("vae_decoder",), log=lambda m: None)
    with pytest.raises(ExportError, match="need every graph"):
        export_bundle("onnx", "toy-sd", "baseline", tmp_path / "y", without=("text_encoder",), log=lambda m: None)
    # the command line: python -m postdiff_onnx run --prompt-embeds
    out = tmp_path / "img.png"
    cli = [
        sys.executable,
        "-m",
        "postdiff_onnx",
        "run",
        str(lean),
        "--prompt-embeds",
        str(path),
        "--seed",
        "3",
        "-o",
        str(out),
        "--no-progress",
    ]
    assert subprocess.run(cli, capture_output=True, text=True).returncode == 0 and out.is_file()
    bad = subprocess.run([*cli[:5], "--prompt", "a lighthouse", "-o", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--prompt-embeds FILE.npz" in bad.stderr
