"""``postdiff export onnx``: the graphs a plan needs, verified against PyTorch, as one self-describing bundle.

Each graph is traced with ``torch.onnx.export(..., dynamo=True)`` with a dynamic batch and latent height and
width (multiples of the UNet's downsampling factor); the legacy TorchScript exporter is used only if the dynamo
route fails. A plan that uses both a UNet's ``full`` and ``full_capture`` variants traces the network once for the
two: ``full`` is ``full_capture``'s graph without the cross-attention outputs (``GraphSource.outputs_of``,
``_outputs_only``), checked against its own PyTorch module like every graph. Standard ONNX operators are emitted
(no ``onnxruntime.transformers`` fusions: they produce CUDA-only operators that fail on CPU and NPU providers),
except attention: ``com.microsoft.MultiHeadAttention``, which ORT's CPU provider runs as flash attention
(``_attention_as_multihead``). When every graph is written, ``weights.share_weights`` stores each distinct tensor of
all of them once, in ``weights.onnx.data`` (``--static`` copies included).

Every graph is checked at export: PyTorch and ONNX Runtime run the same inputs at every latent size the plan
uses, and the export fails unless the PSNR of every output is at least ``PSNR_GATE`` dB. The measured values go
into the manifest.

``weights`` (``--weights``): fp32; fp16 (weights and compute where ONNX Runtime has fp16 kernels); int8 and int4
(``postdiff_onnx.quantize``): the fp32 graph is exported and checked as above, then quantized, and the quantized
graph is checked against it on the same inputs (``psnr_fp32`` in the manifest; the export fails below
``--min-psnr``). The UNet (or transformer) and text encoder graphs are quantized; the VAE decoder and class
encoders stay fp32 (see ``quantize``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from postdiff.bundle.export import PSNR_GATE, ExportJob, export_bundle, tensor_psnr
from postdiff.bundle.manifest import UNET, Graph, hw_key
from postdiff.errors import ExportError
from postdiff.families.model import Model
from postdiff.pytorch.graphs import GraphSource

from . import quantize
from .session import make_session, run, tensor_specs

WEIGHTS = quantize.WEIGHT_TYPES
QUANTIZED_ROLES = (UNET, "text_encoder", "text_encoder_2")  # the graphs --weights int8/int4 quantize
# Opset 23 has the standard Attention and Gelu operators, which ONNX Runtime runs fused (arch:sd15 shallow pass
# on this CPU: 0.19 s at opset 23 against 0.21 s at opset 18, where attention is MatMul/Softmax). --opset 18 for
# older runtimes. GroupNormalization is rewritten either way (_group_norm_as_layer_norm).
DEFAULT_OPSET = 23
OPSETS = range(17, 24)

# torch.onnx's registry logs "torchvision is not installed. Skipping torchvision::nms" (and roi_align, roi_pool,
# deform_conv2d) on every export: noise about operators no diffusion UNet uses.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def check_options(
    *, weights: str = "fp32", opset: int = DEFAULT_OPSET, static: bool = False, verify: bool = True, min_psnr: float | None = None
) -> None:
    if weights not in WEIGHTS:
        raise ExportError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if min_psnr is not None:
        if weights not in quantize.QUANTIZED:
            raise ExportError(f"--min-psnr is the fidelity gate of quantized weights (int8, int4); --weights {weights} has none")
        if not (isinstance(min_psnr, (int, float)) and math.isfinite(min_psnr) and 0 < min_psnr <= 200):
            raise ExportError(f"--min-psnr must be a number of dB between 0 and 200, got {min_psnr!r}")
    if opset not in OPSETS:
        raise ExportError(f"--opset must be from {OPSETS.start} to {OPSETS.stop - 1}, got {opset}")


def convert(
    src: GraphSource,
    job: ExportJob,
    folder: Path,
    *,
    weights="fp32",
    static=False,
    verify=True,
    opset=DEFAULT_OPSET,
    min_psnr: float | None = None,
) -> list[Graph]:
    """One graph as ONNX with dynamic batch and latent size, checked against PyTorch at every latent size the plan
    uses, then quantized if ``weights`` asks for it and checked against its fp32 self; with ``static``, a
    fixed-shape copy per latent size and batch the plan calls a UNet variant at."""
    graph = _export_graph(src, folder, "fp16" if weights == "fp16" else "fp32", opset)
    if src.role == UNET:  # the core's cost model, so manifest and `postdiff plan cost` agree
        graph.macs = {hw_key(hw): job.counter.macs(src.variant, hw, 1) for hw in job.sizes}
    sizes = job.sizes if src.role == UNET else [job.latent_hw]
    reference = _measure(src, graph, folder, sizes, verify)
    if weights in quantize.QUANTIZED and src.role in QUANTIZED_ROLES:
        _quantize(graph, folder, weights, reference, quantize.DEFAULT_MIN_PSNR[weights] if min_psnr is None else min_psnr)
    graphs = [graph]
    if static and src.role == UNET:
        for hw in job.sizes:
            for b in job.batches(src.variant, hw):
                graphs.append(_static_copy(src, graph, folder, hw, b, verify))
    return graphs


def export_onnx(model: str | Model, plan: str = "postdiff", output: str | Path = "bundle", **options) -> Path:
    """Export the graphs ``plan`` needs for ``model`` into the ONNX bundle folder ``output``; returns its path.
    Options: height, width, steps, scheduler, batch, overwrite, log (``postdiff.bundle.export.export_bundle``) and
    weights ("fp32" | "fp16" | "int8" | "int4"), min_psnr (the quantized graphs' gate, dB), static, verify, opset."""
    from .backend import OnnxBackend

    return export_bundle(OnnxBackend(), model, plan, output, **options)


def _export_graph(src: GraphSource, folder: Path, precision: str, opset: int) -> Graph:
    """The graph exported in ``precision`` ("fp32" | "fp16"), its attention as MultiHeadAttention
    (``_attention_as_multihead``); quantization comes after (``_quantize``). A source with ``outputs_of`` is cut out
    of that source's traced graph (``_outputs_only``), which is traced here if it was not yet and then kept for its
    own turn."""
    path = folder / f"{src.name}.onnx"
    if src.outputs_of is not None:
        exporter = _trace(src.outputs_of, folder, opset)
        _outputs_only(folder / f"{src.outputs_of.name}.onnx", path, src.output_names)
    else:
        exporter = _trace(src, folder, opset)
    if precision == "fp16":
        _to_fp16(path)
    session = make_session(path)
    return Graph(
        name=src.name,
        role=src.role,
        file=path.name,
        inputs=tensor_specs(session.get_inputs()),
        outputs=tensor_specs(session.get_outputs()),
        variant=src.variant,
        exporter=exporter,
    )


_EXPORTER_KEY = "postdiff.exporter"  # metadata of a traced graph: which exporter made it


def _trace(src: GraphSource, folder: Path, opset: int) -> str:
    """Trace ``src`` to ``folder/<name>.onnx`` with its standard-operator rewrites and return the exporter that made
    it; a file already there was traced earlier in this export (the staging folder starts empty) for a graph cut
    out of it, and is kept."""
    import onnx

    path = folder / f"{src.name}.onnx"
    if path.is_file():
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if _EXPORTER_KEY in meta:
            return meta[_EXPORTER_KEY]
    example = src.example(_example_hw(src), 2)
    args = tuple(example.values())
    log = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), torch.no_grad(), _linear_attention_for_onnx(src.module):
        warnings.simplefilter("ignore")
        try:
            try:
                prog = _dynamo_export(src.module, args, src, opset)
            except Exception:
                # torch.onnx re-derives the dynamic shapes and can lose a relation torch.export keeps (a transformer's
                # block residual is h x w patches where the latent is 2h x 2w): export the program first, then convert
                prog = _dynamo_export(torch.export.export(src.module, args, dynamic_shapes=src.dynamic_shapes), args, src, opset)
            prog.save(str(path), external_data=True)
            exporter = "dynamo"
        except Exception as exc:  # the dynamo route failed: fall back to the legacy TorchScript exporter
            first_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            try:
                _legacy_export(src, args, path, min(opset, 17))
            except Exception as exc2:
                raise ExportError(
                    f"cannot export {src.name} to ONNX: torch.export failed ({first_error}) and so did the legacy exporter "
                    f"({type(exc2).__name__}: {str(exc2).splitlines()[0][:200]})"
                ) from None
            exporter = "torchscript"
    _group_norm_as_layer_norm(path)
    _attention_as_multihead(path)
    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, _EXPORTER_KEY: exporter})
    onnx.save_model(model, str(path))
    return exporter


def _outputs_only(source: Path, path: Path, outputs: list[str]) -> None:
    """Write the graph at ``source`` to ``path`` keeping only the graph outputs ``outputs`` (in that order) and the
    nodes and weights they need; the weights go to a data file of its own (quantizing one graph in place must not
    touch the other's), which ``weights.share_weights`` stores once with the rest at the end of the export."""
    import shutil

    import onnx

    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    by_name = {o.name: o for o in graph.output}
    if any(name not in by_name for name in outputs):
        raise ExportError(f"{source.name} has no output {sorted(set(outputs) - set(by_name))}; cannot cut {path.name} out of it")
    kept = [by_name[name] for name in outputs]
    del graph.output[:]
    graph.output.extend(kept)
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        # walk back from the kept outputs to the nodes they need, in any node order (a graph with subgraphs, whose
        # nodes read outer values without naming them as inputs, keeps every node)
        producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
        needed, todo, kept_nodes = set(outputs), list(outputs), set()
        while todo:
            k = producer.get(todo.pop())
            if k is not None and k not in kept_nodes:
                kept_nodes.add(k)
                fresh = [i for i in graph.node[k].input if i not in needed]
                needed.update(fresh)
                todo += fresh
        nodes = [n for k, n in enumerate(graph.node) if k in kept_nodes]
        del graph.node[:]
        graph.node.extend(nodes)
        inits = [t for t in graph.initializer if t.name in needed]
        del graph.initializer[:]
        graph.initializer.extend(inits)
    renamed: dict[str, str] = {}
    for t in graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                if entry.value not in renamed:
                    renamed[entry.value] = f"{path.name}.data" if not renamed else f"{path.name}.{len(renamed)}.data"
                entry.value = renamed[entry.value]
    for old, new in renamed.items():
        shutil.copyfile(source.parent / old, path.parent / new)
    onnx.save_model(model, str(path))


class _LinearAttentionForOnnx:
    """SANA's linear attention (diffusers' ``SanaLinearAttnProcessor2_0``) with its normaliser written so that it survives
    the ONNX optimizer: diffusers divides by ``denominator + 1e-15``, and onnxscript's no-op rule for ``x + 0`` (which
    ``torch.onnx.export(optimize=True)`` runs) compares constants to zero with an absolute tolerance of 1e-8, so the
    ``+ 1e-15`` is dropped and a query whose ReLU features are all zero gives 0 / 0 = NaN for the whole image. The
    denominator is a sum of products of ReLU features (>= 0), so ``max(denominator, 1e-15)`` is the same number in fp32
    wherever ``+ 1e-15`` changes nothing, and the same guard at zero. Used while tracing only; the PSNR check holds the
    graph to the PyTorch module."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = torch.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1))).float()
        key = torch.relu(key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)).float()
        value = torch.nn.functional.pad(value.transpose(1, 2).unflatten(1, (attn.heads, -1)).float(), (0, 0, 0, 1), value=1.0)
        out = torch.matmul(torch.matmul(value, key), query)
        out = out[:, :, :-1] / torch.clamp_min(out[:, :, -1:], 1e-15)
        out = attn.to_out[1](attn.to_out[0](out.flatten(1, 2).transpose(1, 2).to(dtype)))
        return out.clip(-65504, 65504) if dtype == torch.float16 else out


@contextlib.contextmanager
def _linear_attention_for_onnx(module):
    """``module``'s SANA linear-attention processors replaced by ``_LinearAttentionForOnnx`` while it is traced."""
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    swapped = [(m, m.processor) for m in module.modules() if type(getattr(m, "processor", None)) is SanaLinearAttnProcessor2_0]
    for m, _ in swapped:
        m.processor = _LinearAttentionForOnnx()
    try:
        yield
    finally:
        for m, processor in swapped:
            m.processor = processor


def _dynamo_export(model, args: tuple, src: GraphSource, opset: int):
    """``torch.onnx.export``'s dynamo route for a module (with the source's dynamic shapes) or an ExportedProgram."""
    shapes = {} if isinstance(model, torch.export.ExportedProgram) else {"dynamic_shapes": src.dynamic_shapes}
    return torch.onnx.export(
        model, args, dynamo=True, input_names=src.input_names, output_names=src.output_names, opset_version=opset, optimize=True, **shapes
    )


def _example_hw(src: GraphSource) -> tuple[int, int]:
    """A small latent size to trace at (the graph stays dynamic); not 1x1 so no dimension specialises."""
    f = getattr(src.module, "unet", None)
    if f is not None:
        from postdiff.pytorch.backbone import downsample_factor

        side = 2 * downsample_factor(f)
        return side, side
    return 8, 8


def _legacy_export(src: GraphSource, args: tuple, path: Path, opset: int) -> None:
    axes: dict[str, dict[int, str]] = {}
    for name, x in zip(src.input_names, args):
        axes[name] = {0: "batch"}
        if x.ndim == 4:
            axes[name] |= {2: f"{name}_h", 3: f"{name}_w"}
    for name in src.output_names:
        axes[name] = {0: "batch"}
    torch.onnx.export(
        src.module,
        args,
        str(path),
        dynamo=False,
        input_names=src.input_names,
        output_names=src.output_names,
        dynamic_axes=axes,
        opset_version=opset,
    )


def _group_norm_as_layer_norm(path: Path) -> None:
    """Rewrite each 4-D ``GroupNormalization`` (opset 21+) as reshape to (N, groups, -1) -> ``LayerNormalization`` over
    the last axis -> reshape back, scale, shift: the same arithmetic with standard operators (opset 17+).

    ONNX Runtime's CPU provider has no GroupNormalization kernel and expands it into a dozen elementwise nodes
    (measured on the reference model's shallow graph: about 40% of its time). Its LayerNormalization is one native,
    multithreaded kernel; the InstanceNormalization form it replaces took 24-30% longer per group norm on this CPU
    (same-process A/B, batch 200, 16 to 64 channels at 16x16). LayerNormalization's scale must cover the normalised axis,
    whose length depends on the dynamic H and W, so the ones are made at run time from the input's shape; the
    per-channel affine follows as Mul and Add. The export's PSNR check covers it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if not any(n.op_type == "GroupNormalization" for n in graph.node):
        return
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info] if v.type.HasField("tensor_type")}
    nodes, consts = [], []
    for k, node in enumerate(graph.node):
        if node.op_type != "GroupNormalization" or node.domain not in ("", "ai.onnx") or ranks.get(node.input[0], 4) != 4:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        groups, eps = int(attrs["num_groups"]), float(attrs.get("epsilon", 1e-5))
        x, scale, bias = node.input[:3]
        p = f"postdiff_gn{k}_"
        consts += [
            numpy_helper.from_array(np.array([0, groups, -1], np.int64), p + "grouped"),
            numpy_helper.from_array(np.array([1, 2], np.int64), p + "axes"),
        ]
        nodes += [
            helper.make_node("Reshape", [x, p + "grouped"], [p + "x"]),
            helper.make_node("Shape", [p + "x"], [p + "span"], start=2),
            helper.make_node("ConstantOfShape", [p + "span"], [p + "ones"], value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
            helper.make_node("LayerNormalization", [p + "x", p + "ones"], [p + "norm"], axis=2, epsilon=eps),
            helper.make_node("Shape", [x], [p + "shape"]),
            helper.make_node("Reshape", [p + "norm", p + "shape"], [p + "normed"]),
            helper.make_node("Unsqueeze", [scale, p + "axes"], [p + "scale"]),
            helper.make_node("Unsqueeze", [bias, p + "axes"], [p + "bias"]),
            helper.make_node("Mul", [p + "normed", p + "scale"], [p + "scaled"]),
            helper.make_node("Add", [p + "scaled", p + "bias"], list(node.output[:1])),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    onnx.save_model(model, str(path))


def _attention_as_multihead(path: Path) -> None:
    """Rewrite each standard ``Attention`` (opset 23) that diffusers' attention exports as ``com.microsoft``'s
    ``MultiHeadAttention``, which ONNX Runtime's CPU provider runs as flash attention.

    ONNX Runtime's CPU Attention materialises every head's score matrix and its softmax at once: an SD1.5
    self-attention over 4,096 tokens (512 px) took 1.06 GB above its inputs at batch 1, which alone broke the 512 px
    budget of ``--low-memory`` bundles. MultiHeadAttention works in tiles: 28 MB and 136 ms against 1.06 GB and
    0.44 s there, and 9 ms against 13 ms at 1,024 tokens (standalone operator, 8 heads of 40, 2 threads, this CPU;
    chunking the standard operator's queries reached 138 MB and 168 ms at best). OpenVINO reads the operator too.

    The pattern is what every diffusers attention exports: q, k and v each ``Transpose(0, 2, 1, 3)`` of a
    ``Reshape`` of a (batch, tokens, heads x dim) tensor to (batch, -1, heads, dim) with the head count constant.
    MultiHeadAttention takes those tensors before the reshape, and its (batch, tokens, heads x dim) output is
    reshaped to what the Attention's consumer expects. Nodes that do not match (a mask, past keys, softcap, causal,
    a head count only known at run time) stay as they are. The export's PSNR check covers the rewrite."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    every = list(graph.node)  # one wrapper per node, so id() names a node throughout
    if not any(n.op_type == "Attention" and n.domain in ("", "ai.onnx") for n in every):
        return
    producer = {o: n for n in every for o in n.output}
    consumers: dict[str, list] = {}
    for n in every:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # small integer tensors (reshape targets) only: the weights are external data, not loaded here
    constants = {
        t.name: numpy_helper.to_array(t)
        for t in graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL and t.data_type == onnx.TensorProto.INT64
    }
    constants |= {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in every if n.op_type == "Constant" and n.attribute[0].name == "value"
    }

    def perm(node) -> list[int] | None:
        return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)

    def heads_of(shape: str) -> int | None:
        """The constant head count of a (batch, -1, heads, dim) reshape target, or None."""
        if shape in constants and constants[shape].size == 4:
            return int(constants[shape].reshape(-1)[2])
        node = producer.get(shape)
        if node is not None and node.op_type == "Concat" and len(node.input) == 4 and node.input[2] in constants:
            value = constants[node.input[2]].reshape(-1)
            return int(value[0]) if value.size == 1 else None
        return None

    def unheaded(name: str) -> tuple[str, int, list] | None:
        """(the 3-D tensor, head count, the nodes only this path used) behind a 4-D attention input, or None."""
        t = producer.get(name)
        if t is None or t.op_type != "Transpose" or perm(t) != [0, 2, 1, 3]:
            return None
        r = producer.get(t.input[0])
        if r is None or r.op_type != "Reshape" or len(r.input) != 2:
            return None
        heads = heads_of(r.input[1])
        return (r.input[0], heads, [t, r]) if heads and heads > 0 else None

    replaced: dict[int, list] = {}  # id(node) -> the nodes that stand for it
    orphans = []
    for k, node in enumerate(every):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.input) != 3 or len(node.output) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if any(attrs.get(name) for name in ("is_causal", "softcap", "qk_matmul_output_mode", "q_num_heads", "kv_num_heads")):
            continue
        found = [unheaded(i) for i in node.input]
        if any(f is None for f in found) or len({f[1] for f in found}) != 1:
            continue
        heads = found[0][1]
        p = f"postdiff_mha{k}_"
        extra = {"scale": float(attrs["scale"])} if "scale" in attrs else {}
        out = node.output[0]
        users = consumers.get(out, [])
        new = [helper.make_node("MultiHeadAttention", [f[0] for f in found], [p + "y"], domain="com.microsoft", num_heads=heads, **extra)]
        if len(users) == 1 and users[0].op_type == "Transpose" and perm(users[0]) == [0, 2, 1, 3]:
            # the consumer wanted (batch, tokens, heads, dim): a reshape of the output is exactly that
            new.append(helper.make_node("Reshape", [p + "y", p + "split"], list(users[0].output)))
            replaced[id(users[0])] = []
        else:
            new += [
                helper.make_node("Reshape", [p + "y", p + "split"], [p + "t"]),
                helper.make_node("Transpose", [p + "t"], [out], perm=[0, 2, 1, 3]),
            ]
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, heads, -1], np.int64), p + "split"))
        replaced[id(node)] = new
        orphans += [n for f in found for n in f[2]]
    if not replaced:
        return
    nodes = []
    for n in every:
        nodes += replaced.get(id(n), [n])
    # the reshapes and transposes that fed only the replaced operators (a transpose's reshape once the transpose is)
    dead: set[int] = set()
    while True:
        used = {i for n in nodes if id(n) not in dead for i in n.input} | {o.name for o in graph.output}
        more = {id(n) for n in orphans if id(n) not in dead and not any(o in used for o in n.output)}
        if not more:
            break
        dead |= more
    del graph.node[:]
    graph.node.extend(n for n in nodes if id(n) not in dead)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(path))


def _to_fp16(path: Path) -> None:
    """fp16 weights and compute where the provider has fp16 kernels; inputs and outputs stay fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    model = convert_float_to_float16(model, keep_io_types=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024)


def _measure(src: GraphSource, graph: Graph, folder: Path, sizes, verify: bool, *, batch: int = 2) -> dict:
    """MACs per call (batch 1) counted on the PyTorch run where the graph has none yet (UNet graphs get the cost
    model's); with ``verify``, the PSNR of ONNX Runtime against that run. Returns {hw: (inputs, ONNX Runtime's
    outputs)} (empty without ``verify``), the reference a quantized graph is measured against."""
    session = make_session(folder / graph.file) if verify else None
    reference = {}
    for hw in sizes:
        feeds = src.example(hw, batch)
        count = hw_key(hw) not in graph.macs
        with torch.no_grad(), FlopCounterMode(display=False) if count else contextlib.nullcontext() as counter:
            expected = src.module(*feeds.values())
        if count:
            graph.macs[hw_key(hw)] = int(counter.get_total_flops()) // 2 // batch
        if session is None:
            continue
        inputs = {k: v.numpy() for k, v in feeds.items()}
        got = run(session, inputs)
        reference[tuple(hw)] = (inputs, got)
        worst = min(tensor_psnr(got[name], ref.numpy()) for name, ref in zip(src.output_names, expected))
        graph.psnr[hw_key(hw)] = _recorded(worst)
        if worst < PSNR_GATE:
            raise ExportError(
                f"{graph.name} at {hw_key(hw)}: ONNX Runtime output differs from PyTorch (PSNR {worst:.1f} dB, gate "
                f"{PSNR_GATE:.0f} dB); the export is wrong and was not written"
            )
    return reference


def _recorded(psnr: float) -> float:
    """A PSNR as the manifest records it (JSON has no infinities): identical outputs as 999 dB, a non-finite output as -999."""
    return round(psnr, 2) if math.isfinite(psnr) else math.copysign(999.0, psnr)


def _quantize(graph: Graph, folder: Path, weights: str, reference: dict, gate: float) -> None:
    """Quantize the graph file in place (``quantize.quantize_file``); with a ``reference`` (the fp32 graph's outputs),
    measure the quantized graph on the same inputs and refuse it below ``gate`` dB; int8 graphs get their OpenVINO
    twin (``quantize.openvino_form``) as an alternate file."""
    path = folder / graph.file
    quantize.quantize_file(path, weights)
    graph.weights = weights
    if reference:
        session = make_session(path, prepack=weights == "int4")
        for hw, (inputs, expected) in reference.items():
            got = run(session, inputs)
            worst = min(tensor_psnr(got[name], expected[name]) for name in expected)
            graph.psnr_fp32[hw_key(hw)] = _recorded(worst)
            if worst < gate:
                raise ExportError(
                    f"{graph.name} at {hw_key(hw)}: the {weights} graph differs from its fp32 graph by PSNR {worst:.1f} dB, "
                    f"under the gate of {gate:g} dB (--min-psnr); the bundle was not written. Export with a wider type "
                    f"({'int8' if weights == 'int4' else 'fp16 or fp32'}) or lower --min-psnr if this model tolerates it"
                )
    if weights == "int8":
        twin = path.with_name(path.stem + ".openvino.onnx")
        quantize.write_openvino_form(path, twin)
        graph.alternates["openvino"] = twin.name


def _static_copy(src: GraphSource, graph: Graph, folder: Path, hw, batch: int, verify: bool) -> Graph:
    """The graph with every input fixed to one latent size and batch; it shares the dynamic graph's weight file."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    feeds = src.example(hw, batch)
    proto = onnx.load(str(folder / graph.file), load_external_data=False)
    for name, x in feeds.items():
        make_input_shape_fixed(proto.graph, name, list(x.shape))
    with contextlib.suppress(Exception):  # best effort: outputs whose shapes inference can resolve
        fix_output_shapes(proto)
    name = f"{src.name}.{hw_key(hw)}.b{batch}"
    onnx.save_model(proto, str(folder / f"{name}.onnx"))
    session = make_session(folder / f"{name}.onnx")
    copy = Graph(
        name=name,
        role=graph.role,
        file=f"{name}.onnx",
        inputs=tensor_specs(session.get_inputs()),
        outputs=tensor_specs(session.get_outputs()),
        variant=graph.variant,
        latent_hw=list(hw),
        batch=batch,
        exporter=graph.exporter,
        macs={hw_key(hw): graph.macs.get(hw_key(hw), 0)},
    )
    if verify:
        _measure(src, copy, folder, [hw], True, batch=batch)
    return copy
