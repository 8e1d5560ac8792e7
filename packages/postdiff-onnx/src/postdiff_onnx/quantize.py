"""Quantized weights for ONNX bundles: ``--weights int8`` and ``--weights int4``, run fast on a CPU and kept lean.

What each runtime computes fast on a CPU was measured, not assumed (``benchmarks/bench_quant_ops.py``; SD1.5-sized
3x3 convolutions, 640 and 1280 channels, latent 4x4 to 16x16, batch 2, this project's 2-core AMD EPYC):

* ONNX Runtime has no convolution that reads int8 weights and keeps fp32 activations at speed: ``ConvInteger`` is
  2-3x slower than the fp32 ``Conv``, and ``DequantizeLinear`` on a weight is constant-folded into an fp32 copy (or,
  with folding off, every dequantized weight is held at once: 1.28 GB for 118 MB of int8). ``QLinearConv`` is fast
  but quantizes the activations with static ranges, in and out. Its matrix products are fast on int8 weights:
  ``DynamicQuantizeMatMul`` (activations quantized per call, per tensor) runs 2-3x faster than fp32 *without
  pre-packing*, so every session of a bundle reads the one mapped copy of the weights, and ``MatMulNBits``
  (4-bit blocks) runs 1.4-2x faster than fp32 with pre-packing.
* OpenVINO's CPU plugin keeps compressed weights compressed in fully connected layers (``DequantizeLinear`` on a
  weight feeding ``MatMul``: 1.6-1.8x faster than fp32) but unpacks compressed convolution weights to fp32 when it
  compiles them (the 5.4 GB process of the issue's first try).

So every convolution with a constant weight becomes a matrix product first (``conv_as_matmul``: im2col written with
standard operators: pad, channels last, one strided slice per kernel tap, the taps' products summed; exact, about
140 dB against the convolution), and then every large matrix product is quantized:

* ``int8``: symmetric per-output-channel int8 weights. The ONNX Runtime graph quantizes the activations per call
  (``DynamicQuantizeLinear`` -> ``MatMulInteger`` -> scale, the pattern ONNX Runtime fuses into
  ``DynamicQuantizeMatMul``), so no calibration data is needed. A convolution's input is quantized once and its
  taps' uint8 slices are set side by side (an im2col a quarter the size of an fp32 one) for one ``MatMulInteger``
  over the stacked taps' weights. Its OpenVINO twin (``openvino_form``) reads the same int8 bytes through
  ``DequantizeLinear`` and keeps the activations fp32.
* ``int4``: ``MatMulNBits`` (4-bit symmetric blocks along the input axis, ``INT4_BLOCK`` values or the largest of
  64/32/16 that divides a layer's inputs (``int4_block``), ``accuracy_level`` 4:
  int8 activations per block), packed by ONNX Runtime's own ``MatMulNBitsQuantizer``; OpenVINO reads it too.
* Token embedding tables (CLIP's 49408 x 768): int8 per row (``Gather`` on int8, then the row's scale).

Left in fp32 on purpose: the denoiser's first and last weighted layers (``io_layers``: a UNet's ``conv_in`` and
``conv_out``, a transformer's patch embedding and output projection; few bytes, and they touch the latent
directly), layers under ``MIN_PARAMS`` weights (scales would cost more than they save), norms and biases, and the VAE
decoder, whose convolutions run at image resolution, where an im2col buffer would take more memory than its int8
weights save (9 x 128 channels x 512 x 512 floats is 1.2 GB).

The int8 scheme needs no activation ranges (they are measured per call), so there is no calibration step; the
manifest says so (``calibration: null``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

WEIGHT_TYPES = ("fp32", "fp16", "int8", "int4")  # --weights
QUANTIZED = ("int8", "int4")
MIN_PARAMS = 1024  # weights of a layer below this stay fp32
INT4_BLOCK = 128  # MatMulNBits block along K; see docs/backends/onnx.md (Lean bundles) for the 32/64/128 measurement
INT4_ACCURACY = 4  # MatMulNBits accuracy_level 4: int8 activations per block (VNNI / AVX-512 kernels)
# default fidelity gates, dB of each quantized graph's outputs against its fp32 graph at export (--min-psnr); see
# docs/backends/onnx.md (Lean bundles) for what SD1.5 and the reference model measure
DEFAULT_MIN_PSNR = {"int8": 25.0, "int4": 12.0}


_PREFIX = "pdq"  # the names of every value and constant the rewrites add


# -- graph helpers ----------------------------------------------------------------------------------------------------
class _Graph:
    """A GraphProto being rewritten: initializers by name, fresh names, nodes replaced in place (order kept)."""

    def __init__(self, model) -> None:
        self.model, self.graph = model, model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.taken = {t.name for t in self.graph.initializer} | {v.name for v in (*self.graph.input, *self.graph.output)}
        self.taken |= {o for n in self.graph.node for o in n.output}
        self.counter = 0
        self.small: dict[tuple, str] = {}  # small constants made by const(), by value
        self.consumers: dict[str, int] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers[i] = self.consumers.get(i, 0) + 1

    def name(self, hint: str) -> str:
        while True:
            self.counter += 1
            candidate = f"{_PREFIX}{self.counter}_{hint}"
            if candidate not in self.taken:
                self.taken.add(candidate)
                return candidate

    def const(self, array: np.ndarray, hint: str) -> str:
        """A new initializer holding ``array``; small ones (slice bounds, pads) are made once per value and shared,
        which keeps an SD1.5 graph's 96 im2cols from adding 3,000 initializers to every session."""
        from onnx import numpy_helper

        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self.small:
            return self.small[key]
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.graph.initializer[-1]
        if key is not None:
            self.small[key] = name
        return name

    def named_const(self, array: np.ndarray, name: str) -> str:
        """A new initializer under ``name`` (made unique if taken)."""
        from onnx import numpy_helper

        if name in self.taken:
            name = self.name(name)
        self.taken.add(name)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def drop(self, name: str) -> None:
        """One consumer of initializer ``name`` is gone; remove it with its last consumer."""
        self.consumers[name] = self.consumers.get(name, 1) - 1
        if self.consumers[name] <= 0 and name in self.inits:
            self.graph.initializer.remove(self.inits.pop(name))

    def array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def set_matrix(self, name: str, array: np.ndarray) -> str:
        """Give weight ``name`` a new layout: in place, keeping its name, when this is its only consumer (the
        manifest lists layers by the exporter's weight names); else as a new initializer."""
        from onnx import numpy_helper

        if self.consumers.get(name, 0) > 1:
            self.consumers[name] -= 1
            return self.const(array, "matrix")
        self.inits[name].CopyFrom(numpy_helper.from_array(array, name))
        return name

    def replace(self, replacements: dict[int, list]) -> None:
        nodes = []
        for k, node in enumerate(self.graph.node):
            nodes.extend(replacements.get(k, [node]))
        del self.graph.node[:]
        self.graph.node.extend(nodes)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# -- convolutions as matrix products -----------------------------------------------------------------------------------
TAP = ".tap"  # a convolution's weight for one kernel tap: "<weight>.tap<dy><dx>"
COLUMNS = ".im2col"  # an int8 convolution's taps stacked into one matrix: "<weight>.im2col"


def conv_weight(name: str) -> str:
    """The convolution weight a tap's or stacked taps' matrix was made from (any other name as it is)."""
    return re.sub(f"({re.escape(TAP)}\\d\\d|{re.escape(COLUMNS)})$", "", name)


def conv_as_matmul(model, *, min_params: int = MIN_PARAMS, keep=frozenset()) -> list[str]:
    """Rewrite every 2-D ``Conv`` with a constant weight of at least ``min_params`` values (group 1, no dilation,
    explicit pads; not in ``keep``) as matrix products, in place; exact up to summation order. Returns the weights
    rewritten.

    The input is padded and put channels last once; each kernel tap (dy, dx) is a strided slice of it times that
    tap's (Cin, Cout) weight, and a ``Sum`` adds the taps: im2col without its buffer. Measured on SD1.5's int4 UNet
    at 32x32, the concatenated im2col buffers were the largest activations (up to 35 MB each) and the slicing and
    concatenating 21% of a call; per tap, each slice is one ninth of that and lives until its product is done."""
    from onnx import helper

    g = _Graph(model)
    replacements: dict[int, list] = {}
    done = []
    big = np.iinfo(np.int64).max
    for k, node in enumerate(g.graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = g.array(node.input[1])
        bias = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        a = _attrs(node)
        if (
            w is None
            or w.ndim != 4
            or w.size < min_params
            or node.input[1] in keep
            or (len(node.input) > 2 and node.input[2] and bias is None)
        ):
            continue
        if (
            a.get("group", 1) != 1
            or any(d != 1 for d in a.get("dilations", [1, 1]))
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        ):
            continue
        cout, cin, kh, kw = w.shape
        sh, sw = a.get("strides", [1, 1])
        pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
        x = node.input[0]
        nodes = []
        if any((pt, pl, pb, pr)):
            padded = g.name("pad")
            nodes.append(helper.make_node("Pad", [x, g.const(np.array([0, 0, pt, pl, 0, 0, pb, pr], np.int64), "pads")], [padded]))
            x = padded
        nhwc = g.name("nhwc")
        nodes.append(helper.make_node("Transpose", [x], [nhwc], perm=[0, 2, 3, 1]))
        if (kh, kw, sh, sw) == (1, 1, 1, 1):
            matrix = g.set_matrix(node.input[1], np.ascontiguousarray(w[:, :, 0, 0].T))
            product = g.name("mm")
            nodes.append(helper.make_node("MatMul", [nhwc, matrix], [product]))
        else:
            products = []
            for dy in range(kh):
                for dx in range(kw):
                    tap, product = g.name("tap"), g.name("tapmm")
                    ends = [-(kh - 1 - dy) if kh - 1 - dy else big, -(kw - 1 - dx) if kw - 1 - dx else big]
                    bounds = [
                        g.const(np.array(v, np.int64), n)
                        for v, n in (([dy, dx], "starts"), (ends, "ends"), ([1, 2], "axes"), ([sh, sw], "steps"))
                    ]
                    matrix = g.named_const(np.ascontiguousarray(w[:, :, dy, dx].T), f"{node.input[1]}{TAP}{dy}{dx}")
                    nodes += [helper.make_node("Slice", [nhwc, *bounds], [tap]), helper.make_node("MatMul", [tap, matrix], [product])]
                    products.append(product)
            g.drop(node.input[1])
            product = g.name("taps")
            nodes.append(helper.make_node("Sum", products, [product]))
        if bias is not None:
            biased = g.name("bias")
            nodes.append(helper.make_node("Add", [product, node.input[2]], [biased]))
            product = biased
        nodes.append(helper.make_node("Transpose", [product], list(node.output[:1]), perm=[0, 3, 1, 2]))
        replacements[k] = nodes
        done.append(node.input[1])
    g.replace(replacements)
    return done


def gemm_as_matmul(model) -> None:
    """Rewrite ``Gemm`` nodes with a constant B (alpha 1, no transA) as ``MatMul`` (+ ``Add``), in place, so that one
    quantization rule covers every linear layer (torch.onnx writes the time embedding's linears as Gemm)."""
    from onnx import helper

    g = _Graph(model)
    replacements = {}
    for k, node in enumerate(g.graph.node):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        a = _attrs(node)
        b = g.array(node.input[1])
        if b is None or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or b.ndim != 2:
            continue
        weight = g.set_matrix(node.input[1], np.ascontiguousarray(b.T)) if a.get("transB", 0) else node.input[1]
        out = g.name("gemm")
        nodes = [helper.make_node("MatMul", [node.input[0], weight], [out])]
        if len(node.input) > 2 and node.input[2]:
            beta = a.get("beta", 1.0)
            c = node.input[2]
            if beta != 1.0:
                c = g.name("beta")
                nodes.append(helper.make_node("Mul", [node.input[2], g.const(np.array(beta, np.float32), "beta")], [c]))
            nodes.append(helper.make_node("Add", [out, c], list(node.output[:1])))
        else:
            nodes[0].output[0] = node.output[0]
        replacements[k] = nodes
    g.replace(replacements)


# -- int8 ---------------------------------------------------------------------------------------------------------------
def _int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column int8 of a (K, N) weight: (int8 weight, fp32 scale per column)."""
    peak = np.abs(w).max(axis=0).astype(np.float32)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_int8(model, *, min_params: int = MIN_PARAMS, keep=frozenset()) -> None:
    """Every ``MatMul`` with a constant 2-D weight of at least ``min_params`` values (not in ``keep``) -> dynamic
    int8 (ONNX Runtime form), and every large constant ``Gather`` table -> int8 rows; in place."""
    _matmuls_int8(model, min_params, keep)
    _tables_int8(model, min_params, keep)


def _matmuls_int8(model, min_params: int, keep) -> None:
    from onnx import TensorProto, helper

    g = _Graph(model)
    producer = {o: (k, n) for k, n in enumerate(g.graph.node) for o in n.output}
    replacements: dict[int, list] = {}
    grouped: set[int] = set()

    def scaled(y32: str, xs: str, ws: str, out: list[str]) -> list:
        yf, s = g.name("yf"), g.name("scale")
        return [
            helper.make_node("Cast", [y32], [yf], to=TensorProto.FLOAT),
            helper.make_node("Mul", [xs, ws], [s]),
            helper.make_node("Mul", [yf, s], out),
        ]

    for k, node in enumerate(g.graph.node):  # a convolution's taps: one quantization of its input, one scale
        taps = _taps_of(node, g, producer) if node.op_type == "Sum" else None
        if not taps or any(mm.input[1] in keep for _, mm, _, _ in taps[0]):
            continue
        members, source = taps
        weights = [g.array(mm.input[1]) for _, mm, _, _ in members]
        if sum(w.size for w in weights) < min_params:
            continue
        # one product over the taps side by side (uint8 im2col, K = taps x Cin) rather than one per tap: the uint8
        # buffer is a quarter of the fp32 one conv_as_matmul avoids, and with one GEMM and no int32 partial sums the
        # SD1.5 int8 bundle's whole runs took 0.83-0.93x the time, bit-identical (docs/backends/onnx.md, Lean bundles).
        # The stacked matrix's scale per column is the convolution's own: per output channel over every tap.
        wq, scale = _int8_columns(np.concatenate(weights, axis=0))
        ws = g.const(scale, "w_scale")
        xq, xs, xz, y32 = g.name("xq"), g.name("xs"), g.name("xz"), g.name("y32")
        nodes = [helper.make_node("DynamicQuantizeLinear", [source], [xq, xs, xz])]
        for mm_k, mm, slice_k, _ in members:
            replacements[slice_k] = replacements[mm_k] = []
            grouped.add(mm_k)
            g.drop(mm.input[1])
        columns, im2col = _side_by_side(g, xq, [sl for _, _, _, sl in members], "u8")
        matrix = g.named_const(wq, conv_weight(members[0][1].input[1]) + COLUMNS)
        nodes += [*im2col, helper.make_node("MatMulInteger", [columns, matrix, xz], [y32])]
        replacements[k] = nodes + scaled(y32, xs, ws, list(node.output))
    for k, node in enumerate(g.graph.node):  # every other matrix product with a constant weight
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or k in grouped:
            continue
        w = g.array(node.input[1])
        if w is None or w.ndim != 2 or w.size < min_params or w.dtype != np.float32 or node.input[1] in keep:
            continue
        q, scale = _int8_columns(w)
        wq = g.set_matrix(node.input[1], q)  # the int8 weight keeps the layer's name
        ws = g.const(scale, "w_scale")
        xq, xs, xz, y32 = g.name("xq"), g.name("xs"), g.name("xz"), g.name("y32")
        replacements[k] = [
            helper.make_node("DynamicQuantizeLinear", [node.input[0]], [xq, xs, xz]),
            helper.make_node("MatMulInteger", [xq, wq, xz], [y32]),
            *scaled(y32, xs, ws, list(node.output)),
        ]
    g.replace(replacements)


def _tap(value: str, g: _Graph, producer: dict):
    """(matmul index, matmul, slice index, slice) when ``value`` is one tap's product as ``conv_as_matmul`` writes it:
    a MatMul of a Slice by a constant weight; else None."""
    mm_k, mm = producer.get(value, (None, None))
    if mm is None or mm.op_type != "MatMul" or mm.input[1] not in g.inits:
        return None
    slice_k, sl = producer.get(mm.input[0], (None, None))
    if sl is None or sl.op_type != "Slice" or not sl.output[0].startswith(_PREFIX):
        return None
    return mm_k, mm, slice_k, sl


def _taps_of(node, g: _Graph, producer: dict):
    """([(matmul index, matmul, slice index, slice)], the sliced tensor) when ``node`` is the ``Sum`` of a
    convolution's taps as ``conv_as_matmul`` writes it (each input a MatMul of a Slice of one tensor by a constant
    weight), else None."""
    members = [_tap(value, g, producer) for value in node.input]
    if not members or any(m is None for m in members):
        return None
    sources = {sl.input[0] for _, _, _, sl in members}
    return (members, sources.pop()) if len(sources) == 1 else None


def _side_by_side(g: _Graph, x: str, slices: list, hint: str) -> tuple[str, list]:
    """A convolution's im2col: ``x`` sliced as each of ``slices`` (a tap's ``Slice`` nodes) and the taps concatenated
    along channels (a single tap as it is). Returns (the value, the nodes that make it)."""
    from onnx import helper

    taps = [g.name(f"tap_{hint}") for _ in slices]
    nodes = [helper.make_node("Slice", [x, *sl.input[1:]], [t]) for t, sl in zip(taps, slices)]
    if len(taps) == 1:
        return taps[0], nodes
    columns = g.name(f"im2col_{hint}")
    return columns, [*nodes, helper.make_node("Concat", taps, [columns], axis=-1)]


def _tables_int8(model, min_params: int, keep=frozenset()) -> None:
    """Embedding tables (a ``Gather`` of rows from a large constant table) -> int8 rows with a scale per row."""
    from onnx import TensorProto, helper

    g = _Graph(model)
    replacements = {}
    for k, node in enumerate(g.graph.node):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        table = g.array(node.input[0])
        if table is None or table.ndim != 2 or table.size < min_params or table.dtype != np.float32 or node.input[0] in keep:
            continue
        if _attrs(node).get("axis", 0) != 0:
            continue
        q, scale = _int8_columns(table.T)  # per column of the transpose: one scale per row
        tq = g.set_matrix(node.input[0], np.ascontiguousarray(q.T))
        ts = g.const(scale.reshape(-1, 1), "row_scale")
        rows, rows_f, row_s = (g.name(h) for h in ("rows", "rows_f", "row_s"))
        replacements[k] = [
            helper.make_node("Gather", [tq, node.input[1]], [rows], axis=0),
            helper.make_node("Cast", [rows], [rows_f], to=TensorProto.FLOAT),
            helper.make_node("Gather", [ts, node.input[1]], [row_s], axis=0),
            helper.make_node("Mul", [rows_f, row_s], list(node.output)),
        ]
    g.replace(replacements)


def openvino_form(model) -> int:
    """The int8 ONNX Runtime graph as OpenVINO runs it fast, in place: each ``DynamicQuantizeLinear`` ->
    ``MatMulInteger`` -> ``Cast`` -> scale chain (a convolution's: slices of the quantized input, side by side)
    becomes ``DequantizeLinear`` of the same int8 weights and scale (per column) -> ``MatMul`` on fp32 activations
    (the same slices of the fp32 input), so both graphs read the same bytes. Returns the chains rewritten."""
    from onnx import helper

    g = _Graph(model)
    producer = {o: (k, n) for k, n in enumerate(g.graph.node) for o in n.output}
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(g.graph.node):
        for i in n.input:
            consumers.setdefault(i, []).append(k)
    replacements: dict[int, list] = {}
    count = 0
    for k, node in enumerate(g.graph.node):
        after = [g.graph.node[c] for c in consumers.get(node.output[0], [])] if node.output else []
        if node.op_type != "MatMulInteger" or not (len(after) == 1 and after[0].op_type == "Cast"):
            continue
        cols_k, cols = producer.get(node.input[0], (None, None))
        if cols is None:
            continue
        slices = [producer.get(v, (None, None)) for v in cols.input] if cols.op_type == "Concat" else [(cols_k, cols)]
        if all(sl is not None and sl.op_type == "Slice" for _, sl in slices):  # a convolution's uint8 im2col
            gone = [k2 for k2, _ in slices] + ([cols_k] if cols.op_type == "Concat" else [])
            quantized = slices[0][1].input[0]
        else:
            gone, slices, quantized = [], [], node.input[0]
        cast_k = consumers[node.output[0]][0]
        mul_k = consumers[g.graph.node[cast_k].output[0]][0]
        mul = g.graph.node[mul_k]
        scale_k, scale_mul = producer[mul.input[1]]
        dq_k, dq = producer[quantized]  # the DynamicQuantizeLinear: its input is the fp32 activation
        nodes, a = [], dq.input[0]
        if slices:  # the same slices of the fp32 activation, side by side
            a, nodes = _side_by_side(g, a, [sl for _, sl in slices], "fp")
        w = g.name("w_fp")
        nodes += [
            helper.make_node("DequantizeLinear", [node.input[1], scale_mul.input[1]], [w], axis=1),
            helper.make_node("MatMul", [a, w], list(mul.output)),
        ]
        replacements[k] = nodes
        for gone_k in (*gone, dq_k, cast_k, scale_k, mul_k):
            replacements[gone_k] = []
        count += 1
    g.replace(replacements)
    return count


# -- int4 ---------------------------------------------------------------------------------------------------------------
def int4_block(k: int, largest: int = INT4_BLOCK) -> int:
    """The block along the input axis for a weight of ``k`` input values: the largest of ``largest``, 64, 32, 16 that
    divides ``k``, so that no block is padded (``MatMulNBits`` pads the last block: with 128, a 320-channel layer
    would store 384 values a column, and a 32-channel one 128), else 16 (the smallest block, the least padding)."""
    for size in (largest, 64, 32, 16):
        if size <= largest and k % size == 0:
            return size
    return 16


def quantize_int4(model, *, min_params: int = MIN_PARAMS, block: int = INT4_BLOCK, keep=frozenset()):
    """Every ``MatMul`` with a constant 2-D weight of at least ``min_params`` values (not in ``keep``) ->
    ``MatMulNBits`` 4-bit (ONNX Runtime's ``MatMulNBitsQuantizer``), embedding tables -> int8 rows; returns the new
    model proto."""
    DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer = _nbits_quantizer()

    g = _Graph(model)
    for k, node in enumerate(g.graph.node):  # the quantizer excludes nodes by name: every node gets one
        if not node.name:
            node.name = f"pdq_node{k}"
    by_block: dict[int, list[str]] = {}
    for node in g.graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            w = g.array(node.input[1])
            if w is None or w.ndim != 2 or w.size < min_params or w.shape[0] % 2 or w.dtype != np.float32 or node.input[1] in keep:
                continue
            by_block.setdefault(int4_block(w.shape[0], block), []).append(node.name)
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs every node it skips or quantizes at INFO
    try:
        for size, names in sorted(by_block.items()):  # one pass per block size: the quantizer takes one size a run
            chosen = set(names)
            others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in chosen]
            config = DefaultWeightOnlyQuantConfig(block_size=size, is_symmetric=True, accuracy_level=INT4_ACCURACY, bits=4)
            quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=config)
            quantizer.process()
            model = quantizer.model.model
    finally:
        quiet.setLevel(level)
    model = quantizer.model.model
    _tables_int8(model, min_params, keep)
    return model


WEIGHTED = ("Conv", "MatMul", "Gemm")


def io_layers(model, inputs=("sample",), outputs=("eps",)) -> frozenset[str]:
    """The weights of a denoiser's first and last weighted layers: the first ``Conv``/``MatMul``/``Gemm`` with a
    constant weight reached from the graph input ``sample``, and the last one before the output ``eps`` (empty for
    graphs without them: text encoders)."""
    g = _Graph(model)
    names = {v.name for v in g.graph.input} | {v.name for v in g.graph.output}
    if not set(inputs) <= names or not set(outputs) <= names:
        return frozenset()
    producer = {o: n for n in g.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def nearest(start, step) -> set[str]:
        seen, frontier, found = set(start), list(start), set()
        while frontier and not found:
            nxt = []
            for value in frontier:
                for node in step(value):
                    if node.op_type in WEIGHTED and len(node.input) > 1 and node.input[1] in g.inits:
                        found.add(node.input[1])
                        continue
                    for v in node.output if step is after else node.input:
                        if v not in seen:
                            seen.add(v)
                            nxt.append(v)
            frontier = nxt
        return found

    def after(value):
        return users.get(value, [])

    def before(value):
        return [producer[value]] if value in producer else []

    return frozenset(nearest(inputs, after) | nearest(outputs, before))


def _nbits_quantizer():
    """ONNX Runtime's 4-bit quantizer, imported without its side effect: the module calls ``logging.basicConfig`` at
    INFO when imported, which would print every INFO line of every library (onnxscript's constant folding) after it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer


# -- files ---------------------------------------------------------------------------------------------------------------
def quantize_file(path, weights: str) -> None:
    """Quantize the exported fp32 graph at ``path`` (and its external data) to ``weights`` ("int8" | "int4"), in
    place: convolutions and Gemms as matrix products, then the type's rule; one data file beside it afterwards."""
    import onnx
    from onnx import TensorProto

    path = Path(path)
    old = {e.value for t in _tensors(onnx.load(str(path), load_external_data=False)) for e in t.external_data if e.key == "location"}
    model = onnx.load(str(path))
    keep = io_layers(model)
    conv_as_matmul(model, keep=keep)
    gemm_as_matmul(model)
    if weights == "int8":
        quantize_int8(model, keep=keep)
    elif weights == "int4":
        model = quantize_int4(model, keep=keep)
    else:
        raise ValueError(f"not a quantized weight type: {weights!r}")
    for t in _tensors(model):  # everything is in memory now; the old data files go
        if t.data_location == TensorProto.EXTERNAL:
            raise RuntimeError(f"tensor {t.name} was not loaded")
    for name in old:
        (path.parent / name).unlink(missing_ok=True)
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024
    )


def write_openvino_form(path, twin) -> None:
    """The OpenVINO twin of the int8 graph at ``path`` (``openvino_form``) at ``twin``, reading the same external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    openvino_form(model)
    onnx.save_model(model, str(twin))


def layer_types(model) -> dict[str, str]:
    """{weight name: what it holds} for the matrix and table weights of a graph: "int8", "int4" (MatMulNBits),
    "int8 rows" (an embedding table), or "fp32" (a float weight of a matrix product, convolution or table that
    stayed fp32). Read from the graph itself, so the manifest says what the file holds, not what was asked for."""
    from onnx import TensorProto

    kinds = {t.name: t.data_type for t in model.graph.initializer}
    out: dict[str, str] = {}

    def layer(name: str) -> str:  # a convolution's taps are one layer
        return conv_weight(re.sub(r"_Q4$", "", name))

    for node in model.graph.node:
        if node.op_type == "MatMulInteger" and node.input[1] in kinds:
            out[layer(node.input[1])] = "int8"
        elif node.op_type == "DequantizeLinear" and kinds.get(node.input[0]) == TensorProto.INT8:
            out[layer(node.input[0])] = "int8"
        elif node.op_type == "MatMulNBits" and node.input[1] in kinds:
            out[layer(node.input[1])] = f"int4 (blocks of {_attrs(node).get('block_size')})"
        elif node.op_type == "Gather" and kinds.get(node.input[0]) == TensorProto.INT8:
            out[node.input[0]] = "int8 rows"
        elif node.op_type in ("MatMul", "Conv", "Gemm", "Gather") and len(node.input) > 1:
            w = node.input[1] if node.op_type != "Gather" else node.input[0]
            if kinds.get(w) in (TensorProto.FLOAT, TensorProto.FLOAT16) and not w.startswith(_PREFIX):  # not our scales
                out.setdefault(layer(w), "fp32" if kinds[w] == TensorProto.FLOAT else "fp16")
    return out


def _tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


SCHEMES = {
    "int8": "convolutions as one matrix product over their taps side by side (uint8 im2col); matrix products with "
    "symmetric per-output-channel int8 weights, activations quantized per call per tensor (DynamicQuantizeMatMul; "
    "OpenVINO twin: DequantizeLinear -> MatMul); "
    "embedding tables int8 per row",
    "int4": f"convolutions as per-tap matrix products; MatMulNBits with symmetric 4-bit weights in blocks of {INT4_BLOCK} "
    f"(or the largest of 64, 32, 16 that divides the layer's inputs) along the input axis, accuracy level {INT4_ACCURACY} "
    "(int8 activations per block); embedding tables int8 per row",
}


def manifest_entry(folder, graphs, weights: str, min_psnr: float | None) -> dict:
    """The manifest's ``quantization``: the scheme, what every layer holds (read from the graphs), the calibration
    (none: activations are quantized per call) and the fidelity gate with each graph's measured PSNR."""
    import onnx

    layers: dict[str, str] = {}
    for g in graphs:
        layers.update(layer_types(onnx.load(str(Path(folder) / g.file), load_external_data=False)))
    counts: dict[str, int] = {}
    for kind in layers.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {
        "weights": weights,
        "scheme": SCHEMES[weights],
        "calibration": None,
        "min_psnr_db": DEFAULT_MIN_PSNR[weights] if min_psnr is None else float(min_psnr),
        "psnr_vs_fp32_db": {g.name: g.psnr_fp32 for g in graphs if g.psnr_fp32},
        "fp32_graphs": [g.name for g in graphs if not g.weights],
        "layer_counts": dict(sorted(counts.items())),
        "layers": dict(sorted(layers.items())),
    }
