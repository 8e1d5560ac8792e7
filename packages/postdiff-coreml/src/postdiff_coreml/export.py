"""``postdiff export coreml``: one multifunction ``.mlpackage`` whose functions share one copy of the weights.

One Core ML function per (UNet variant, latent size) the plan uses, named ``<variant>_<H>x<W>`` (``full_32x32``,
``shallow_cached_64x64``), each with fixed shapes: the Neural Engine runs fixed shapes well and flexible ones
badly (``RangeDim`` runs only its default shape there; ``EnumeratedShapes`` with two inputs is slow or fails). The
functions are converted one by one (``torch.export`` → coremltools ML program) and merged with
``coremltools.utils.save_multifunction``, which stores identical weights once (macOS 15 / iOS 18 and later).
``target="macos14"`` writes one package per function instead. The cache tensors (the DeepCache feature ``deep``,
the cross-attention maps ``xattn_<k>``) are plain inputs and outputs, not ``MLState``, which the Neural Engine
rejects. fp16 compute by default; ``weights`` compresses every function alike (8-bit linear quantisation, 6- or
4-bit palettisation), or they would stop sharing weights.

coremltools converts on Linux, but only macOS can run a model: this module never predicts. The bundle's manifest
has the same format as the ONNX bundle's, with the function names.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from postdiff.bundle.export import ExportJob, export_bundle
from postdiff.bundle.manifest import UNET, Graph, TensorSpec, hw_key, tool_versions
from postdiff.errors import ExportError
from postdiff.families.model import Model
from postdiff.pytorch.graphs import GraphSource

TARGETS = ("macos15", "macos14")
WEIGHTS = (None, "8bit", "6bit", "4bit")  # None: fp16, as the default
# --weights is one flag for every backend; the ONNX types that Core ML stores another way, named for the user
_ONNX_NAMES = {"fp16": None, "fp32": "fp16", "int8": "8bit", "int4": "4bit"}
UNET_PACKAGE = "unet.mlpackage"
FUNCTIONS = ".functions"  # where the UNet functions wait for finish() to merge them
EXPORTER = "torch.export+coremltools"
_INT_INPUTS = {"labels", "input_ids"}


def function_name(variant: str, hw, batch: int, images: int) -> str:
    """``full_32x32``; a suffix ``_b<N>`` only when the plan calls one variant at one size with two batch sizes."""
    return f"{variant}_{hw_key(hw)}" if batch in (images, 2 * images) else f"{variant}_{hw_key(hw)}_b{batch}"


def core_ml_weights(weights: str | None) -> str | None:
    """``--weights`` as Core ML stores it (None: fp16), or an ExportError naming the Core ML type to use."""
    if weights in WEIGHTS:
        return weights
    if weights == "fp16":
        return None
    if weights in _ONNX_NAMES:
        kind = {
            "fp32": "Core ML computes in fp16: its widest weights are fp16 (the default)",
            "int8": "Core ML's 8-bit weights (linear quantization) are --weights 8bit",
            "int4": "Core ML's 4-bit weights (palettized) are --weights 4bit",
        }[weights]
        raise ExportError(f"--weights {weights} is an ONNX type; {kind}")
    raise ExportError(f"--weights must be one of fp16, 8bit, 6bit, 4bit (default fp16), got {weights!r}")


def check_options(*, target: str = "macos15", weights: str | None = None) -> None:
    if target not in TARGETS:
        raise ExportError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    core_ml_weights(weights)
    _coremltools()


def convert(src: GraphSource, job: ExportJob, folder: Path, log, *, target: str = "macos15", weights: str | None = None) -> list[Graph]:
    """A pipeline graph as one fixed-shape package; a UNet variant as one function per latent size and batch the
    plan calls it at, written under ``.functions/`` for ``finish`` to merge."""
    ct = _coremltools()
    if src.role != UNET:
        b = 2 * job.images if src.role == "class_encoder" else job.images  # the class family encodes null + labels at once
        path = folder / f"{src.name}.mlpackage"
        spec_in, spec_out = _convert(ct, src, job.latent_hw, b, path, target, weights)
        return [Graph(name=src.name, role=src.role, file=path.name, inputs=spec_in, outputs=spec_out, batch=b, exporter=EXPORTER)]
    graphs = []
    for hw in job.sizes:
        for b in job.batches(src.variant, hw):
            name = function_name(src.variant, hw, b, job.images)
            log(f"  {name}: converting")
            spec_in, spec_out = _convert(ct, src, hw, b, folder / FUNCTIONS / f"{name}.mlpackage", target, weights)
            graphs.append(
                Graph(
                    name=name,
                    role=UNET,
                    file=UNET_PACKAGE if target == "macos15" else f"unet_{name}.mlpackage",
                    function=name if target == "macos15" else None,
                    inputs=spec_in,
                    outputs=spec_out,
                    variant=src.variant,
                    latent_hw=list(hw),
                    batch=b,
                    exporter=EXPORTER,
                    macs={hw_key(hw): job.counter.macs(src.variant, hw, 1)},
                )
            )
    return graphs


def finish(folder: Path, job: ExportJob, graphs: list[Graph], log, *, target: str = "macos15", weights: str | None = None) -> dict:
    """macos15: every UNet function merged into one multifunction package (identical weights stored once);
    macos14: one package per function."""
    weights = core_ml_weights(weights)
    ct = _coremltools()
    work = folder / FUNCTIONS
    unet_files = {g.name: work / f"{g.name}.mlpackage" for g in graphs if g.role == UNET}
    if target == "macos15":
        log(f"merging {len(unet_files)} functions into {UNET_PACKAGE} (shared weights)")
        desc = ct.utils.MultiFunctionDescriptor()
        for name, path in unet_files.items():
            desc.add_function(str(path), src_function_name="main", target_function_name=name)
        desc.default_function_name = next(iter(unet_files))
        with _quiet():
            ct.utils.save_multifunction(desc, str(work / UNET_PACKAGE))
            merged = ct.models.MLModel(str(work / UNET_PACKAGE), skip_model_load=True)
            merged.user_defined_metadata.update(
                {
                    "postdiff.functions": ",".join(unet_files),
                    "postdiff.plan": job.plan.name,
                    "postdiff.cache_block": str(job.plan.recipe.cache_block),
                }
            )
            merged.short_description = f"PostDiff UNet functions for plan {job.plan.name}: {', '.join(unet_files)}"
            merged.save(str(folder / UNET_PACKAGE))
    else:
        for name, path in unet_files.items():
            shutil.move(str(path), str(folder / f"unet_{name}.mlpackage"))
    shutil.rmtree(work, ignore_errors=True)
    return {
        "precision": f"fp16 compute, {weights or 'fp16'} weights",
        "weights": weights or "fp16",
        "tools": {**tool_versions("coremltools"), "target": target},
    }


def export_coreml(model: str | Model, plan: str = "postdiff", output: str | Path = "bundle-coreml", **options) -> Path:
    """Export the plan's graphs for ``model`` as a Core ML bundle (any OS); returns its path. Options: height, width,
    steps, scheduler, batch, overwrite, log (``postdiff.bundle.export.export_bundle``) and target, weights."""
    from .backend import CoreMLBackend

    return export_bundle(CoreMLBackend(), model, plan, output, **options)


def _coremltools():
    try:
        with _quiet():
            import coremltools as ct
    except ImportError:
        raise ExportError("coremltools is not installed; pip install -e packages/postdiff-coreml") from None
    return ct


@contextlib.contextmanager
def _quiet():
    """coremltools and torch.export print hundreds of deprecation lines and progress bars per conversion."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


def _convert(
    ct, src: GraphSource, hw, batch: int, path: Path, target: str, weights: str | None
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """One fixed-shape ML program for ``src`` at (``hw``, ``batch``), saved at ``path``; its input/output specs."""
    from .compact import compact_pipeline  # imports coremltools, which _coremltools() has checked is installed

    feeds = src.example(tuple(hw), batch)
    with _quiet(), torch.no_grad():
        try:
            program = _drop_aliases(torch.export.export(src.module, tuple(feeds.values())).run_decompositions(_decompositions()))
        except Exception as exc:
            raise ExportError(f"torch.export cannot trace {src.name} at {hw_key(hw)}: {str(exc).splitlines()[0][:200]}") from None
        expected = src.module(*feeds.values())
        placeholders = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        inputs = [
            ct.TensorType(name=p, shape=tuple(x.shape), dtype=np.int32 if n in _INT_INPUTS else np.float32)
            for p, n, x in zip(placeholders, feeds, feeds.values())
        ]
        outputs = [ct.TensorType(name=n) for n in src.output_names]  # fresh objects: ct.convert mutates them
        with compact_pipeline(ct) as pipeline:
            try:
                mlmodel = ct.convert(
                    program,
                    inputs=inputs,
                    outputs=outputs,
                    convert_to="mlprogram",
                    minimum_deployment_target=ct.target.macOS15 if target == "macos15" else ct.target.macOS14,
                    compute_precision=ct.precision.FLOAT16,
                    pass_pipeline=pipeline,
                    skip_model_load=True,
                )
            except Exception as exc:
                raise ExportError(f"coremltools cannot convert {src.name} at {hw_key(hw)}: {str(exc).splitlines()[0][:200]}") from None
        spec = mlmodel.get_spec()
        for p, n in zip(placeholders, feeds):
            if p != n:
                ct.utils.rename_feature(spec, p, n)
        mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
        mlmodel = _compress(ct, mlmodel, weights)
        mlmodel.user_defined_metadata["postdiff.graph"] = src.name
        mlmodel.user_defined_metadata["postdiff.latent_hw"] = hw_key(hw)
        mlmodel.user_defined_metadata["postdiff.batch"] = str(batch)
        if src.variant:
            mlmodel.user_defined_metadata["postdiff.variant"] = src.variant
        mlmodel.short_description = f"PostDiff {src.name} at latent {hw_key(hw)}, batch {batch}"
        path.parent.mkdir(parents=True, exist_ok=True)
        mlmodel.save(str(path))
    spec_in = [TensorSpec(n, list(x.shape), "int32" if n in _INT_INPUTS else "float32") for n, x in feeds.items()]
    spec_out = [TensorSpec(n, list(e.shape), "float32") for n, e in zip(src.output_names, expected)]
    return spec_in, spec_out


def _decompositions() -> dict:
    """Only the operators coremltools has no converter for, as the ones it has: ``new_ones`` / ``new_zeros`` (from
    transformers' T5 mask code) as ``ones`` / ``zeros`` (``run_decompositions({})`` keeps every other operator)."""
    from torch._decomp import get_decompositions

    return get_decompositions([torch.ops.aten.new_ones, torch.ops.aten.new_zeros])


def _drop_aliases(program):
    """``aten.alias`` (identity views, e.g. from transformers' CLIP) has no coremltools converter: bypass it."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()
    return program


def _compress(ct, mlmodel, weights: str | None):
    weights = core_ml_weights(weights)
    if weights is None:
        return mlmodel
    opt = ct.optimize.coreml
    if weights == "8bit":
        config = opt.OptimizationConfig(global_config=opt.OpLinearQuantizerConfig(mode="linear_symmetric"))
        return opt.linear_quantize_weights(mlmodel, config=config)
    nbits = int(weights[0])
    config = opt.OptimizationConfig(global_config=opt.OpPalettizerConfig(mode="kmeans", nbits=nbits))
    return opt.palettize_weights(mlmodel, config=config)
