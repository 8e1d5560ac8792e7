"""share_weights on hand-made graphs: names the exporter could give that the short names must not collide with,
nodes out of topological order, and tensors of every size class (inline, small, large)."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from postdiff_onnx.weights import MIN_BYTES, WEIGHTS_FILE, WEIGHTS_INDEX, share_weights  # noqa: E402


def _graph(reverse: bool):
    """y = ((x + big) * small * v + tiny), its inputs and output named like short names ("w0", "v1", "w2")."""
    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), "big.weight")  # 4 kB: page-aligned
    small = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "small.bias")  # 256 B: packed
    tiny = numpy_helper.from_array(np.float32(0.5).reshape(1), "tiny")  # 4 B: stays inline
    nodes = [
        helper.make_node("Add", ["w0", "big.weight"], ["sum_out"]),
        helper.make_node("Mul", ["sum_out", "small.bias"], ["scaled_out"]),
        helper.make_node("Mul", ["scaled_out", "v1"], ["prod_out"]),
        helper.make_node("Add", ["prod_out", "tiny"], ["w2"]),
    ]
    if reverse:  # ORT sorts nodes itself; fp16 conversion appends its input casts at the end
        nodes.reverse()
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("w0", TensorProto.FLOAT, [16, 64]), helper.make_tensor_value_info("v1", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("w2", TensorProto.FLOAT, [16, 64])],
        [big, small, tiny],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("reverse", [False, True])
def test_compacted_graphs_compute_the_same_and_keep_their_interface(tmp_path, reverse):
    model = _graph(reverse)
    (tmp_path / "a.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "b.onnx").write_bytes(model.SerializeToString())
    feeds = {"w0": np.arange(MIN_BYTES, dtype=np.float32).reshape(16, 64), "v1": np.array([2.0], dtype=np.float32)}
    before = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    size, same = share_weights(tmp_path, ["a.onnx", "b.onnx"])

    assert same == {"b.onnx": "a.onnx"} and not (tmp_path / "b.onnx").exists()
    assert size == (tmp_path / WEIGHTS_FILE).stat().st_size
    after = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(before, after)
    graph = onnx.load(str(tmp_path / "a.onnx"), load_external_data=False).graph
    assert [v.name for v in graph.input] == ["w0", "v1"] and [v.name for v in graph.output] == ["w2"]
    produced = [o for n in graph.node for o in n.output]
    names = [t.name for t in graph.initializer] + produced
    assert len(set(names)) == len(names) and not {"w0", "v1"} & set(names) - {"w2"}  # no collision with the interface
    index = json.loads((tmp_path / WEIGHTS_INDEX).read_text())
    assert sorted(index["names"].values()) == ["big.weight", "small.bias", "tiny"]  # short name -> exporter's name
    assert [e[0] for e in index["graphs"]["a.onnx"]] == [k for k, v in index["names"].items() if v == "big.weight"]
    stored = {index["names"][t.name]: t.data_location for t in graph.initializer}
    assert stored == {"big.weight": TensorProto.EXTERNAL, "small.bias": TensorProto.EXTERNAL, "tiny": TensorProto.DEFAULT}


# ops whose integer input ONNX shape inference reads at load: a 4-D Pad's pads (as ``F.pad`` exports) and a
# rank-8 Reshape target, each 64 B of int64; with the output shape they give (1, 2, 8, 8) inputs
INT_CONSTANTS = {
    "Pad": (np.array([0, 0, 0, 0, 0, 0, 1, 1], dtype=np.int64), [1, 2, 9, 9]),
    "Reshape": (np.array([1, 2, 2, 2, 2, 2, 2, 2], dtype=np.int64), [1, 2, 2, 2, 2, 2, 2, 2]),
}


def _int_constant_graph(tmp_path, op: str) -> None:
    """g.onnx: ``op``(x + weight, a 64-byte int64 constant); the 512 B weight is one the bundle shares."""
    const, out_shape = INT_CONSTANTS[op]
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((1, 2, 8, 8)).astype(np.float32), "weight")
    nodes = [helper.make_node("Add", ["x", "weight"], ["s"]), helper.make_node(op, ["s", "const"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [weight, numpy_helper.from_array(const, "const")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    (tmp_path / "g.onnx").write_bytes(model.SerializeToString())


def test_export_refuses_a_graph_that_no_longer_loads(tmp_path, monkeypatch):
    """The export opens every rewritten graph on the shared weights: a rewrite that breaks loading (here the old
    rule, which moved integer tensors of 64 B and more out of the graph) is an ExportError naming the graph."""
    from postdiff.errors import ExportError
    from postdiff_onnx import weights
    from postdiff_onnx.backend import _check_loads

    _int_constant_graph(tmp_path, "Pad")
    monkeypatch.setattr(weights, "WEIGHT_TYPES", (*weights.WEIGHT_TYPES, TensorProto.INT64))
    share_weights(tmp_path, ["g.onnx"])
    with pytest.raises(ExportError, match="g.onnx does not load"):
        _check_loads(tmp_path, ["g.onnx"])


@pytest.mark.parametrize("op", sorted(INT_CONSTANTS))
def test_integer_constants_stay_in_the_graph(tmp_path, op):
    """Integer tensors are shapes, pads and axes, never weights: they stay inline whatever their size, because
    ONNX shape inference (run when a session loads the graph) cannot read them from an external file. A 64-byte
    int64 pads vector (a 4-D Pad, as ``F.pad`` exports) once went to the shared file and the graph failed to load."""
    from postdiff_onnx.session import make_session
    from postdiff_onnx.weights import SharedInitializers

    _int_constant_graph(tmp_path, op)
    feeds = {"x": np.ones((1, 2, 8, 8), dtype=np.float32)}
    before = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    share_weights(tmp_path, ["g.onnx"])

    tensors = {t.data_type: t for t in onnx.load(str(tmp_path / "g.onnx"), load_external_data=False).graph.initializer}
    assert tensors[TensorProto.FLOAT].data_location == TensorProto.EXTERNAL  # the weight is shared
    assert tensors[TensorProto.INT64].data_location == TensorProto.DEFAULT  # the constant is not
    plain = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    shared = make_session(tmp_path / "g.onnx", initializers=SharedInitializers(tmp_path).for_graph(tmp_path / "g.onnx"))
    np.testing.assert_array_equal(before, plain)
    np.testing.assert_array_equal(before, shared.run(None, feeds)[0])
