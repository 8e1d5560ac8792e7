"""Core ML bundles: what can be checked on any OS (functions, names, shapes, dtypes, metadata, weight sharing,
plan refusal, bad input) and, on macOS only, the numbers (PSNR against PyTorch per function and end to end)."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from postdiff.bundle.manifest import UNET, read_manifest
from postdiff.bundle.runtime import BundlePipeline
from postdiff.errors import BundleError, ExportError, PlanError
from postdiff.families.model import load_model
from postdiff.pytorch.backbone import split_for
from postdiff_cli.main import main as cli
from postdiff_coreml.export import UNET_PACKAGE, export_coreml
from postdiff_coreml.runtime import inspect_bundle, load_bundle
from postdiff_lab.generation import source_for
from postdiff_lab.metrics import psnr, tensor_psnr

ct = pytest.importorskip("coremltools")
ON_MACOS = platform.system() == "Darwin"
NEEDS_MACOS = pytest.mark.skipif(
    not ON_MACOS,
    reason="Core ML prediction needs macOS: coremltools converts on Linux but cannot run a model, so numerics are checked on macOS only",
)
ALL = ["reference", "sd", "sdxl", "lcm", "pixart", "pixart-sigma"]
# the family-wide parametrized tests run reference by default (SDXL's pipeline, the SD UNet class with its encoders,
# is test_pipeline_models_and_manifest's), every family with -m slow (a conversion each)
FAMILIES = [n if n == "reference" else pytest.param(n, marks=pytest.mark.slow) for n in ALL]
DTYPES = {65568: "float32", 131104: "int32", 65552: "float16"}


def _spec(path: Path):
    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _pipeline(folder) -> BundlePipeline:
    """The shared bundle pipeline without a runner: enough to compile and check plans on any OS."""
    folder, manifest = inspect_bundle(folder)
    return BundlePipeline(folder, manifest, runner=None, static=True, static_batch=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_package_has_exactly_the_functions_the_plan_needs(coreml_bundles, name):
    folder, manifest = inspect_bundle(coreml_bundles(name))
    plan = _pipeline(folder).compile()
    wanted = {f"{v}_{hw[0]}x{hw[1]}" for v, hw in plan.variants()}
    spec = _spec(folder / UNET_PACKAGE)
    functions = {f.name: f for f in spec.description.functions}
    assert set(functions) == wanted
    assert spec.specificationVersion >= 9  # multifunction: macOS 15 / iOS 18
    meta = dict(spec.description.metadata.userDefined)
    assert set(meta["postdiff.functions"].split(",")) == wanted and meta["postdiff.plan"] == plan.name
    model = load_model(manifest.model["name"], need_pipeline=True)
    with split_for(model.network(), block=manifest.cache_block, span=manifest.cache_span) as split:
        for graph in (g for g in manifest.graphs if g.role == UNET):
            f = functions[graph.function]
            module = split.module(graph.variant)
            ins = module.example_inputs(tuple(graph.latent_hw), graph.batch, text_len=model.text_len, pooled_dim=model.pooled_dim)
            assert [i.name for i in f.input] == module.input_names() == graph.input_names
            assert [list(i.type.multiArrayType.shape) for i in f.input] == [list(x.shape) for x in ins.values()]
            assert {DTYPES[i.type.multiArrayType.dataType] for i in f.input} == {"float32"}
            assert [o.name for o in f.output] == module.output_names() == graph.output_names
            with torch.no_grad():
                out = module(*ins.values())
            assert [t.shape for t in graph.outputs] == [list(o.shape) for o in out]
            # a CFG step's function takes the doubled batch, a gated (conditional-only) step's the single one; a
            # guidance-embedded UNet (LCM) runs one branch on every step
            cfg = any(s.guidance == "cfg" and s.variant == graph.variant for s in plan.steps) and not model.spec().guidance_embedded
            assert graph.batch == (2 if cfg else 1)
            assert ("timestep_cond" in graph.input_names) == (name == "lcm")


def test_pipeline_models_and_manifest(coreml_bundles):
    folder, manifest = inspect_bundle(coreml_bundles("sdxl"))
    assert manifest.backend == "coreml" and manifest.tools["target"] == "macos15" and "coremltools" in manifest.tools
    roles = {g.role: g for g in manifest.graphs}
    assert set(roles) == {UNET, "text_encoder", "text_encoder_2", "vae_decoder"}
    enc = _spec(folder / roles["text_encoder_2"].file)
    assert [o.name for o in enc.description.output] == ["hidden_states", "text_embeds"]
    assert DTYPES[enc.description.input[0].type.multiArrayType.dataType] == "int32"
    assert (folder / "tokenizer_2").is_dir()
    assert {t.name for t in manifest.cache_tensors} == {"deep"}  # a deepcache plan carries the DeepCache feature only
    _, gated = inspect_bundle(coreml_bundles("reference"))  # postdiff: cross-attention maps too
    names = {t.name for t in gated.cache_tensors}
    assert "deep" in names and any(n.startswith("xattn_") for n in names)
    data = json.loads((folder / "manifest.json").read_text())
    assert data["format"] == "postdiff.bundle/1" and all(len(v) == 64 for v in data["files"].values())


def _one_function_package(multi: Path, function: str, dst: Path) -> Path:
    """The yardstick: a package holding just ``function`` of ``multi``, written by coremltools' own merger."""
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(multi), src_function_name=function, target_function_name=function)
    desc.default_function_name = function
    ct.utils.save_multifunction(desc, str(dst))
    return dst


@pytest.mark.parametrize("name", FAMILIES)
def test_functions_share_one_copy_of_the_weights(coreml_bundles, name, tmp_path):
    folder, manifest = inspect_bundle(coreml_bundles(name))
    multi = folder / UNET_PACKAGE
    functions = [g.function for g in manifest.graphs if g.role == UNET]
    # a full or full_capture function computes every layer, so it holds every weight the package holds
    whole = next(g.function for g in manifest.graphs if g.role == UNET and g.variant in ("full", "full_capture"))
    single = _one_function_package(multi, whole, tmp_path / "single.mlpackage")
    assert len(_spec(multi).description.functions) == len(functions) >= 2 and len(_spec(single).description.functions) == 1
    weights = [next(p.rglob("weight.bin")).stat().st_size for p in (multi, single)]
    # a transformer's position table is a constant of each latent size (fp16, one row per patch)
    model = load_model(manifest.model["name"])
    spec, cfg = model.spec(), model.unet_config
    if spec.is_transformer:
        width, p = cfg["num_attention_heads"] * cfg["attention_head_dim"], spec.downsample_factor
        tables = sum(2 * width * (h // p) * (w // p) for h, w in manifest.latent_sizes)
    else:
        tables = 0
    assert weights[0] <= 1.01 * weights[1] + tables, weights  # the weights are stored once, not once per function
    sizes = [_dir_size(multi), _dir_size(single)]
    assert sizes[0] <= 1.2 * sizes[1], (name, functions, sizes)  # the whole package, programs included
    if name == "reference":  # the yardstick is what the exporter writes for a one-function plan (baseline: full_32x32)
        direct = coreml_bundles("reference_single") / UNET_PACKAGE
        assert _dir_size(direct) == pytest.approx(sizes[1], rel=0.02), (_dir_size(direct), sizes[1])


def test_programs_are_compact(coreml_bundles):
    """Inside a function, ops and variables get short names and identical constants are shared; the function's
    inputs and outputs keep theirs (they are the app's interface)."""
    folder, manifest = inspect_bundle(coreml_bundles("reference_single"))
    graph = next(g for g in manifest.graphs if g.role == UNET)
    function = _spec(folder / UNET_PACKAGE).mlProgram.functions[graph.function]
    block = next(iter(function.block_specializations.values()))
    ops = block.operations
    interface = {i.name for i in function.inputs} | set(block.outputs)
    names = [o.name for op in ops for o in op.outputs if o.name not in interface]
    assert names and all(len(n) <= 6 and n.startswith("v") for n in names), names[:5]
    assert len(set(names)) == len(names)
    values = [op.attributes["val"] for op in ops if op.type == "const"]
    # every numeric constant is written once (coremltools leaves string and boolean options, e.g. pad_type, alone)
    tensor = lambda v: v.immediateValue.tensor  # noqa: E731
    consts = [v.SerializeToString() for v in values if not (tensor(v).HasField("strings") or tensor(v).HasField("bools"))]
    assert len(consts) > 100 and len(set(consts)) == len(consts)
    assert [i.name for i in function.inputs] == graph.input_names


def test_plan_the_package_cannot_serve_is_refused(coreml_bundles):
    pipe = _pipeline(coreml_bundles("reference_single"))
    with pytest.raises(PlanError, match=r"lacks .*shallow at 32x32 batch 2.*postdiff export coreml"):
        pipe.compile("deepcache")
    with pytest.raises(PlanError, match="16x16"):
        pipe.compile("mixed-res")


def test_runtime_needs_macos_and_known_compute_units(coreml_bundles, tmp_path):
    with pytest.raises(BundleError, match="unknown compute unit 'NPU'; use one of ALL, CPU_AND_NE, CPU_AND_GPU, CPU_ONLY"):
        load_bundle(coreml_bundles("reference"), compute_units="NPU")
    if not ON_MACOS:
        with pytest.raises(
            BundleError, match=r"Core ML bundles run only on macOS \(this is .*\); here, export .* an ONNX bundle .* --backend onnx"
        ):
            load_bundle(tmp_path / "not-even-there")  # refused before anything is loaded


def test_corrupted_package_and_missing_function(coreml_bundles, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(coreml_bundles("reference"), dst)
    blob = next((dst / UNET_PACKAGE).rglob("weight.bin"))
    blob.write_bytes(blob.read_bytes()[:1000])
    with pytest.raises(BundleError, match="does not match its checksum"):
        inspect_bundle(dst)
    shutil.rmtree(dst)
    shutil.copytree(coreml_bundles("reference"), dst)
    (dst / "manifest.json").write_text(
        (dst / "manifest.json").read_text().replace('"function": "shallow_16x16"', '"function": "shallow_24x24"')
    )
    with pytest.raises(BundleError, match="function shallow_24x24 is missing from unet.mlpackage"):
        inspect_bundle(dst, verify=False)
    spec_file = next((dst / UNET_PACKAGE).rglob("model.mlmodel"))
    spec_file.write_bytes(b"not a protobuf at all")
    with pytest.raises(BundleError, match="not a readable Core ML package"):
        inspect_bundle(dst, verify=False)


def test_bad_export_options(tmp_path):
    with pytest.raises(ExportError, match="--target"):
        export_coreml("reference", "deepcache", tmp_path / "x", target="ios12")
    with pytest.raises(ExportError, match="--weights"):
        export_coreml("reference", "deepcache", tmp_path / "x", weights="3bit")
    with pytest.raises(ExportError, match="--batch"):
        export_coreml("reference", "deepcache", tmp_path / "x", batch=0)


def test_8bit_weights_are_compressed_in_every_function(tmp_path):
    folder = export_coreml("reference", "deepcache", tmp_path / "q8", weights="8bit", log=lambda m: None)
    spec = _spec(folder / UNET_PACKAGE)
    assert {f.name for f in spec.description.functions} == {"full_32x32", "shallow_32x32"}
    blob = next((folder / UNET_PACKAGE).rglob("weight.bin")).stat().st_size
    params = sum(p.numel() for p in load_model("reference", need_pipeline=True).pipeline.unet.parameters())
    assert blob < 1.3 * params  # about one byte per weight (fp16 would be two), stored once for both functions


@pytest.mark.slow
def test_macos14_target_writes_one_package_per_function(tmp_path):
    folder = export_coreml("reference", "deepcache", tmp_path / "m14", target="macos14", log=lambda m: None)
    _, manifest = inspect_bundle(folder)
    files = sorted(g.file for g in manifest.graphs if g.role == UNET)
    assert files == ["unet_full_32x32.mlpackage", "unet_shallow_32x32.mlpackage"]
    assert all(g.function is None for g in manifest.graphs)
    assert not (folder / UNET_PACKAGE).exists()
    # the export's compression step, on a single-function fp16 package (multifunction ones are compressed before
    # merging): 4-bit k-means palettisation stores about half a byte per weight (the 6-bit export is tested end to end)
    from postdiff_coreml.export import _compress

    fp16 = ct.models.MLModel(str(folder / "unet_full_32x32.mlpackage"), skip_model_load=True)
    _compress(ct, fp16, "4bit").save(str(tmp_path / "q4.mlpackage"))
    blob = next((tmp_path / "q4.mlpackage").rglob("weight.bin")).stat().st_size
    assert blob < (4 / 8 + 0.15) * _unet_params()


# -- numerics: macOS only ----------------------------------------------------------------------------------------------
@NEEDS_MACOS
@pytest.mark.parametrize("name", FAMILIES)
def test_every_function_matches_torch(coreml_bundles, name):
    folder, manifest = read_manifest(coreml_bundles(name), "coreml")
    pipe = load_bundle(folder, compute_units="CPU_ONLY")
    model = load_model(manifest.model["name"], need_pipeline=True)
    with split_for(model.network(), block=manifest.cache_block, span=manifest.cache_span) as split:
        for graph in (g for g in manifest.graphs if g.role == UNET):
            module = split.module(graph.variant)
            ins = module.example_inputs(tuple(graph.latent_hw), graph.batch, text_len=model.text_len, pooled_dim=model.pooled_dim)
            with torch.no_grad():
                expected = module(*ins.values())
            got = pipe.runner.run(graph, {k: v.numpy() for k, v in ins.items()})
            worst = min(tensor_psnr(got[n], e.numpy()) for n, e in zip(graph.output_names, expected))
            assert worst >= 35.0, (graph.name, worst)


@NEEDS_MACOS
@pytest.mark.parametrize("name", FAMILIES)
def test_end_to_end_image_matches_torch(coreml_bundles, name):
    pipe = load_bundle(coreml_bundles(name), compute_units="CPU_ONLY")
    plan = pipe.compile()
    conditions = [3, 8] if name == "reference" else ["a red apple on a table"]
    got = pipe.generate(conditions, plan, seed=5)
    h, w = pipe.image_hw
    ref = source_for(load_model(pipe.info["name"], need_pipeline=True), height=h, width=w).generate(
        plan.recipe, len(conditions), seed=5, conditions=conditions
    )
    assert min(psnr(a, b) for a, b in zip(got, ref.images)) >= 35.0
    assert np.isfinite(got).all()


def _unet_params() -> int:
    return sum(p.numel() for p in load_model("reference", need_pipeline=True).pipeline.unet.parameters())


@pytest.mark.slow
def test_6bit_palettised_export_stores_about_three_quarters_of_a_byte_per_weight(tmp_path):
    """k-means palettisation needs scikit-learn, a declared dependency of postdiff-coreml: end to end through the CLI
    (4 bits: test_macos14_target_writes_one_package_per_function)."""
    bits = 6
    out = tmp_path / f"q{bits}"
    assert cli(["export", "coreml", "--model", "reference", "--plan", "baseline", "--weights", f"{bits}bit", "-o", str(out)]) == 0
    blob = next((out / UNET_PACKAGE).rglob("weight.bin")).stat().st_size
    assert blob < (bits / 8 + 0.15) * _unet_params()  # fp16 would be 2 bytes per weight; lookup tables add a little
    assert f"{bits}bit weights" in inspect_bundle(out)[1].precision


def test_golden_file_records_every_function_of_the_plan(coreml_bundles):
    """Exported with --golden (on any OS): each function's first inputs and outputs, by the PyTorch modules."""
    from postdiff.bundle.golden import read_golden

    folder, manifest = read_manifest(coreml_bundles("reference"), "coreml")
    entry, golden = manifest.golden, read_golden(folder)
    unet = {g.name for g in manifest.graphs if g.role == UNET}
    assert "class_encoder" in entry["graphs"] and set(entry["graphs"]) - {"class_encoder"} == unet  # every function runs
    for name, io in entry["graphs"].items():
        for k in io["inputs"]:
            assert golden[f"graph/{name}/in/{k}"].shape[0] >= 1
        for k in io["outputs"]:
            assert np.isfinite(golden[f"graph/{name}/out/{k}"]).all()
    assert golden["final_latent"].shape == (1, 1, 32, 32)


@NEEDS_MACOS
def test_coreml_runtime_passes_its_bundles_golden_file(coreml_bundles):
    from postdiff.bundle.golden import read_golden

    folder, manifest = read_manifest(coreml_bundles("reference"), "coreml")
    golden, pipe = read_golden(folder), load_bundle(folder, compute_units="CPU_ONLY")
    by_name = {g.name: g for g in manifest.graphs}
    for name, io in manifest.golden["graphs"].items():
        out = pipe.runner.run(by_name[name], {k: golden[f"graph/{name}/in/{k}"] for k in io["inputs"]})
        for k in io["outputs"]:
            assert tensor_psnr(out[k], golden[f"graph/{name}/out/{k}"]) >= 35.0, (name, k)
    pipe.generate([manifest.golden["condition"]], seed=manifest.golden["seed"])
    assert tensor_psnr(pipe.final_latents, golden["final_latent"]) >= 35.0


def test_compute_units_are_read_back_from_the_compute_plan(monkeypatch, recwarn):
    """The read-back's logic, on a stand-in for Core ML's compute plan (MLComputePlan needs macOS 14.4 to run; on a
    Mac the same code reads the real one): operations counted per preferred device across the graphs loaded, a
    setting whose accelerators get none of them warned about once, and 'unknown' where no plan can be read."""
    import types

    import coremltools.models.compute_plan as cp

    from postdiff.bundle.manifest import Graph
    from postdiff_coreml import runtime

    class CPU:
        pass

    class NE:
        pass

    CPU.__name__, NE.__name__ = "MLCPUComputeDevice", "MLNeuralEngineComputeDevice"
    preferred = {"a": [CPU, CPU, None], "b": [NE, CPU]}  # per function: each operation's preferred device (None: none)

    class Plan:
        def __init__(self, function):
            ops = [types.SimpleNamespace(device=d) for d in preferred[function]]
            fn = types.SimpleNamespace(block=types.SimpleNamespace(operations=ops))
            self.model_structure = types.SimpleNamespace(program=types.SimpleNamespace(functions={function: fn}))

        @classmethod
        def load_from_path(cls, path, compute_units):
            return cls(path)

        def get_compute_device_usage_for_mlprogram_operation(self, op):
            return None if op.device is None else types.SimpleNamespace(preferred_compute_device=op.device())

    monkeypatch.setattr(cp, "MLComputePlan", Plan)
    model = types.SimpleNamespace
    runner = runtime.CoreMLRunner(Path("."), "CPU_AND_NE")
    runner._read_back(
        model(get_compiled_model_path=lambda: "a"), Graph(name="g", role="unet", file="x", inputs=[], outputs=[], function="a")
    )
    assert runner.executed == {"compute_units": "CPU_AND_NE", "devices": "CPU 2 ops"}
    assert any("--compute-units CPU_AND_NE runs on the CPU here" in str(w.message) for w in recwarn.list)
    runner._read_back(
        model(get_compiled_model_path=lambda: "b"), Graph(name="g", role="unet", file="y", inputs=[], outputs=[], function="b")
    )
    assert runner.executed["devices"] == "CPU 3 ops, NE 1 ops"
    cpu_only = runtime.CoreMLRunner(Path("."), "CPU_ONLY")
    recwarn.clear()
    cpu_only._read_back(
        model(get_compiled_model_path=lambda: "a"), Graph(name="g", role="unet", file="x", inputs=[], outputs=[], function="a")
    )
    assert not recwarn.list  # CPU_ONLY asked for the CPU
    monkeypatch.setattr(cp, "MLComputePlan", None)  # no compute plan on this OS
    cpu_only._read_back(
        model(get_compiled_model_path=lambda: "a"), Graph(name="g", role="unet", file="x", inputs=[], outputs=[], function="a")
    )
    assert cpu_only.executed["devices"].startswith("unknown")
