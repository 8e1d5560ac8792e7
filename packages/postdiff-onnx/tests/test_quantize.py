"""Quantized bundles (--weights int8 / int4): the graph rewrites, the fidelity gate, the manifest, both runtimes,
the lean runtime and bad input."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from postdiff.bundle.manifest import read_manifest
from postdiff.errors import BundleError, ExportError
from postdiff_lab.metrics import psnr, tensor_psnr
from postdiff_onnx import quantize
from postdiff_onnx.export import export_onnx
from postdiff_onnx.runtime import OrtRunner, load_bundle

RNG = np.random.default_rng(0)


def _run(model, feeds, *, prepack=False):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _conv_model(cin, cout, k, stride, pads, bias, group=1, dilation=1):
    kh, kw = k
    w = (RNG.standard_normal((cout, cin // group, kh, kw)) / math.sqrt(cin * kh * kw)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "conv.weight")]
    ins = ["x", "conv.weight"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(cout).astype(np.float32), "conv.bias"))
        ins.append("conv.bias")
    node = helper.make_node("Conv", ins, ["y"], pads=list(pads), strides=[stride, stride], group=group, dilations=[dilation] * 2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, None, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph([node], "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize(
    "cin,cout,k,stride,pads,bias,hw",
    [
        (8, 16, (3, 3), 1, (1, 1, 1, 1), True, (7, 10)),
        (16, 8, (3, 3), 2, (1, 1, 1, 1), True, (9, 8)),  # a downsampler on an odd side
        (8, 8, (1, 1), 1, (0, 0, 0, 0), False, (5, 6)),  # a shortcut
        (4, 12, (3, 1), 1, (1, 0, 1, 0), True, (6, 6)),
        (6, 6, (3, 3), 1, (0, 1, 1, 0), False, (8, 5)),  # asymmetric pads
        (8, 8, (2, 2), 2, (0, 0, 0, 0), True, (8, 8)),  # a patch embedding
    ],
)
def test_conv_as_matmul_is_exact(cin, cout, k, stride, pads, bias, hw):
    model = _conv_model(cin, cout, k, stride, pads, bias)
    x = RNG.standard_normal((2, cin, *hw)).astype(np.float32)
    (expected,) = _run(model, {"x": x})
    assert quantize.conv_as_matmul(model, min_params=1) == ["conv.weight"]
    assert {n.op_type for n in model.graph.node} >= {"MatMul", "Transpose"} and "Conv" not in {n.op_type for n in model.graph.node}
    (got,) = _run(model, {"x": x})
    assert got.shape == expected.shape
    assert tensor_psnr(got, expected) >= 100.0


def test_convs_it_cannot_rewrite_stay_convs():
    for model in (_conv_model(8, 8, (3, 3), 1, (1,) * 4, True, group=2), _conv_model(8, 8, (3, 3), 1, (2,) * 4, True, dilation=2)):
        assert quantize.conv_as_matmul(model, min_params=1) == []
        assert [n.op_type for n in model.graph.node] == ["Conv"]
    model = _conv_model(8, 8, (3, 3), 1, (1,) * 4, True)
    assert quantize.conv_as_matmul(model, min_params=1, keep={"conv.weight"}) == []


@pytest.mark.parametrize(
    "cin, cout, k, stride, pads, hw",
    [
        (32, 48, (3, 3), 1, (1, 1, 1, 1), (9, 7)),
        (32, 16, (3, 3), 2, (1, 1, 1, 1), (9, 8)),  # a downsampler on an odd side
        (16, 24, (3, 1), 1, (1, 0, 1, 0), (6, 6)),
        (16, 16, (1, 1), 2, (0, 0, 0, 0), (8, 8)),  # one tap: no concatenation
    ],
)
def test_a_quantized_convolution_and_its_openvino_twin(cin, cout, k, stride, pads, hw):
    """int8: the input quantized once, the taps' uint8 slices side by side, one MatMulInteger over the stacked taps'
    weights with one per-channel scale; the twin dequantizes the same bytes; int4: a MatMulNBits per tap."""
    model = _conv_model(cin, cout, k, stride, pads, True)
    taps = k[0] * k[1]
    x = RNG.standard_normal((2, cin, *hw)).astype(np.float32)
    (expected,) = _run(model, {"x": x})
    quantize.conv_as_matmul(model, min_params=1)
    int4 = quantize.quantize_int4(copy.deepcopy(model), min_params=1, block=16)
    quantize.quantize_int8(model, min_params=1)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 1 and ops.count("MatMulInteger") == 1 and ops.count("Cast") == 1
    assert ops.count("Slice") == taps and ops.count("Concat") == (taps > 1) and ops.count("Add") == 1  # the bias, no int32 sums
    stacked = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["conv.weight" + quantize.COLUMNS]
    assert stacked.dtype == np.int8 and stacked.shape == (taps * cin, cout)
    assert quantize.layer_types(model) == {"conv.weight": "int8"}
    (got,) = _run(model, {"x": x})
    assert got.shape == expected.shape
    assert 30.0 <= tensor_psnr(got, expected) < 100.0  # a wrong order of taps against the stacked rows is noise
    assert quantize.openvino_form(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops and ops.count("Slice") == taps
    (twin,) = _run(model, {"x": x})
    assert tensor_psnr(twin, expected) >= 35.0 and tensor_psnr(twin, got) < 100.0  # fp32 activations: another result
    assert [n.op_type for n in int4.graph.node].count("MatMulNBits") == taps
    (got4,) = _run(int4, {"x": x}, prepack=True)
    assert 15.0 <= tensor_psnr(got4, expected) < 60.0


def _mlp(width=64, depth=3, gemm=False):
    """x -> [Gemm|MatMul + Add -> Relu] x depth, and a Gather table beside it."""
    nodes, inits, last = [], [], "x"
    for i in range(depth):
        w = (RNG.standard_normal((width, width)) / math.sqrt(width)).astype(np.float32)
        b = RNG.standard_normal(width).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w.T.copy() if gemm else w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        if gemm:
            nodes.append(helper.make_node("Gemm", [last, f"fc{i}.weight", f"fc{i}.bias"], [f"h{i}"], transB=1, beta=0.5))
        else:
            nodes += [
                helper.make_node("MatMul", [last, f"fc{i}.weight"], [f"m{i}"]),
                helper.make_node("Add", [f"m{i}", f"fc{i}.bias"], [f"h{i}"]),
            ]
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
        last = f"r{i}"
    table = RNG.standard_normal((100, width)).astype(np.float32)
    inits.append(numpy_helper.from_array(table, "embed.weight"))
    nodes += [helper.make_node("Gather", ["embed.weight", "ids"], ["rows"], axis=0), helper.make_node("Identity", [last], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph(nodes, "g", [x, ids], outs, inits), opset_imports=[helper.make_opsetid("", 21)])


def test_gemm_as_matmul_is_exact():
    model = _mlp(gemm=True)
    feeds = {"x": RNG.standard_normal((5, 64)).astype(np.float32), "ids": np.array([3, 99, 0], np.int64)}
    expected = _run(model, feeds)
    quantize.gemm_as_matmul(model)
    assert "Gemm" not in {n.op_type for n in model.graph.node}
    for got, want in zip(_run(model, feeds), expected):
        assert tensor_psnr(got, want) >= 120.0


def test_int8_and_its_openvino_twin_compute_what_they_say():
    model = _mlp()
    feeds = {"x": RNG.standard_normal((32, 64)).astype(np.float32), "ids": np.array([3, 99, 0, 3], np.int64)}
    y, rows = _run(model, feeds)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantize.quantize_int8(model, keep={"fc2.weight"})
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("MatMul") == 1  # fc2 kept in fp32
    kinds = quantize.layer_types(model)
    assert kinds == {"fc0.weight": "int8", "fc1.weight": "int8", "fc2.weight": "fp32", "embed.weight": "int8 rows"}
    qy, qrows = _run(model, feeds)
    assert 30.0 <= tensor_psnr(qy, y) < 100.0  # quantized: close, and not the fp32 graph
    assert tensor_psnr(qrows, rows) >= 35.0
    # the int8 bytes are per-column symmetric: what the OpenVINO twin dequantizes must be the weight, within a step
    q = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scale = np.abs(weights["fc0.weight"]).max(0) / 127
    assert q["fc0.weight"].dtype == np.int8
    assert np.abs(q["fc0.weight"] * scale - weights["fc0.weight"]).max() <= scale.max() / 2 + 1e-7
    quantize.openvino_form(model)
    assert "MatMulInteger" not in {n.op_type for n in model.graph.node}
    ty, _ = _run(model, feeds)  # the twin keeps the activations fp32: x @ dequantized weights
    h = feeds["x"]
    for i in range(3):
        w = weights[f"fc{i}.weight"] if i == 2 else q[f"fc{i}.weight"] * (np.abs(weights[f"fc{i}.weight"]).max(0) / 127)
        h = np.maximum(h @ w + weights[f"fc{i}.bias"], 0)
    assert tensor_psnr(ty, h) >= 100.0


def test_int4_uses_matmulnbits_and_keeps_what_it_must():
    model = _mlp(width=256)
    feeds = {"x": RNG.standard_normal((8, 256)).astype(np.float32), "ids": np.array([1, 2], np.int64)}
    y, _ = _run(model, feeds)
    model = quantize.quantize_int4(model, keep={"fc0.weight"})
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMul") == 1
    kinds = quantize.layer_types(model)
    assert kinds["fc0.weight"] == "fp32" and kinds["fc1.weight"].startswith("int4") and kinds["embed.weight"] == "int8 rows"
    (qy, _) = _run(model, feeds, prepack=True)
    assert 15.0 <= tensor_psnr(qy, y) < 60.0


def test_io_layers_are_the_first_and_last_weighted_layers():
    x = helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 4, 8, 8])
    t = helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("eps", TensorProto.FLOAT, None)
    w = {
        n: numpy_helper.from_array(RNG.standard_normal(s).astype(np.float32), n)
        for n, s in (
            ("conv_in.weight", (8, 4, 3, 3)),
            ("mid.weight", (8, 8, 3, 3)),
            ("conv_out.weight", (4, 8, 3, 3)),
            ("time.weight", (1, 8)),
        )
    }
    nodes = [
        helper.make_node("MatMul", ["timestep", "time.weight"], ["temb"]),  # weighted, but not on the latent's path first
        helper.make_node("Conv", ["sample", "conv_in.weight"], ["a"], pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "mid.weight"], ["c"], pads=[1] * 4),
        helper.make_node("Conv", ["c", "conv_out.weight"], ["eps"], pads=[1] * 4),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, t], [y], list(w.values())))
    assert quantize.io_layers(model) == {"conv_in.weight", "conv_out.weight"}
    assert quantize.io_layers(model, inputs=("input_ids",)) == frozenset()  # a text encoder: nothing kept


# -- bundles -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(bundles):
    """The reference model's postdiff bundle as fp32 (the suite's shared one) and quantized."""
    return {"fp32": bundles("reference"), **{w: bundles("reference", weights=w, static=False, golden=False) for w in ("int8", "int4")}}


def test_quantized_manifests_say_what_every_layer_holds(quantized):
    sizes = {}
    for weights, folder in quantized.items():
        _, manifest = read_manifest(folder, "onnx")
        assert manifest.weights == weights and manifest.precision == "fp32"
        sizes[weights] = (folder / "weights.onnx.data").stat().st_size
        if weights == "fp32":
            assert manifest.quantization is None
            continue
        q = manifest.quantization
        assert q["weights"] == weights and q["calibration"] is None and q["min_psnr_db"] == quantize.DEFAULT_MIN_PSNR[weights]
        assert q["layers"]["unet.conv_in.weight"] == "fp32" and q["layers"]["unet.conv_out.weight"] == "fp32"
        kind = "int8" if weights == "int8" else "int4"
        quantized_layers = [k for k, v in q["layers"].items() if v.startswith(kind)]
        assert len(quantized_layers) > 0.6 * len(q["layers"]), q["layer_counts"]
        assert q["fp32_graphs"] == ["class_encoder"]
        for g in manifest.graphs:
            if g.role == "unet":
                assert g.weights == weights and set(g.psnr_fp32) == {"16x16", "32x32"}
                assert min(g.psnr_fp32.values()) >= q["min_psnr_db"]
        if weights == "int8":
            twins = {g.alternates.get("openvino") for g in manifest.graphs if g.role == "unet"}
            assert all(t and (folder / t).is_file() for t in twins)
    assert sizes["int4"] < sizes["int8"] < 0.6 * sizes["fp32"]


# Measured on the reference model (10 images, seed 3): int8 against fp32 36.4 dB at the worst image (median 42.1),
# int4 15.1 (median 17.3); OpenVINO's int8 twin 38.4, its int4 15.1. The floors sit below those.
FLOORS = {"int8": 30.0, "int4": 12.0}


def test_quantized_images_stay_close_to_fp32_and_the_numpy_loop_matches_torch(quantized):
    classes = list(range(10))
    fp32 = load_bundle(quantized["fp32"]).generate(classes, seed=3)
    for weights, floor in FLOORS.items():
        pipe = load_bundle(quantized[weights])
        images = pipe.generate(classes, seed=3)
        assert np.isfinite(images).all()
        assert min(psnr(a, b) for a, b in zip(images, fp32)) >= floor
        assert np.array_equal(images, pipe.generate(classes, seed=3))  # deterministic, run after run
        latents = pipe.final_latents
        pipe.generate(classes, seed=3, loop="torch")
        # not 60 dB as for fp32 graphs: activations are quantized per call, and the 1e-7 by which the numpy and the
        # diffusers schedulers round differently moves some values across a quantization step (measured 36-39 dB)
        assert tensor_psnr(latents, pipe.final_latents) >= 30.0


def test_low_memory_gives_the_same_images_and_closes_every_graph(quantized, monkeypatch):
    opened, peak = [], [0]
    original = OrtRunner.session

    def counting(self, graph):
        if graph.file not in self.sessions:
            opened.append(graph.file)
        out = original(self, graph)
        peak[0] = max(peak[0], sum(1 for f in self.sessions if f.startswith("unet")))
        return out

    monkeypatch.setattr(OrtRunner, "session", counting)
    for weights in ("fp32", "int8", "int4"):
        peak[0] = 0
        plain = load_bundle(quantized[weights]).generate([1, 7], seed=5)
        assert peak[0] >= 3, weights  # the plain run keeps every UNet graph it opened
        opened.clear()
        peak[0] = 0
        lean_pipe = load_bundle(quantized[weights], low_memory=True)
        lean = lean_pipe.generate([1, 7], seed=5)
        assert np.array_equal(plain, lean), weights
        runner = lean_pipe.runner.inner
        assert runner.sessions == {} and runner.shared == {}  # everything closed at the end
        assert peak[0] <= 2, weights  # at most a full and a shallow graph at a time
        assert opened[0] == "class_encoder.onnx" and len(opened) == len(set(opened))  # each opened once


def test_openvino_runs_int8_through_its_twin_and_int4_as_is(quantized):
    pytest.importorskip("openvino")
    from postdiff_openvino import load_bundle as load_ov

    classes = [0, 5, 9]
    fp32 = load_bundle(quantized["fp32"]).generate(classes, seed=1)
    for weights, floor in FLOORS.items():
        ov = load_ov(quantized[weights], low_memory=True).generate(classes, seed=1)
        assert np.isfinite(ov).all() and min(psnr(a, b) for a, b in zip(ov, fp32)) >= floor


def test_the_gate_refuses_a_graph_below_it_and_writes_nothing(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(ExportError, match=r"int8 graph differs from its fp32 graph by PSNR .* under the gate of 199 dB"):
        export_onnx("reference", "baseline", out, weights="int8", min_psnr=199)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "options,match",
    [
        ({"weights": "int3"}, "--weights must be one of fp32, fp16, int8, int4"),
        ({"weights": "fp32", "min_psnr": 30}, "--min-psnr is the fidelity gate of quantized weights"),
        ({"weights": "int8", "min_psnr": float("nan")}, "--min-psnr must be a number of dB"),
        ({"weights": "int8", "min_psnr": 0}, "--min-psnr must be a number of dB"),
    ],
)
def test_bad_weight_options_are_refused_before_work(tmp_path, options, match):
    with pytest.raises(ExportError, match=match):
        export_onnx("reference", "baseline", tmp_path / "b", **options)
    assert not (tmp_path / "b").exists()


def test_damaged_quantized_weights_are_refused_before_any_graph_runs(quantized, tmp_path):
    copy = tmp_path / "int8"
    shutil.copytree(quantized["int8"], copy)
    data = bytearray((copy / "weights.onnx.data").read_bytes())
    data[len(data) // 3] ^= 0x55
    (copy / "weights.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.onnx.data does not match its checksum"):
        load_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    twin = manifest["graphs"][1]["alternates"]["openvino"]
    (copy / twin).unlink()
    with pytest.raises(BundleError, match=f"{twin} is missing"):
        load_bundle(copy, verify=True)
