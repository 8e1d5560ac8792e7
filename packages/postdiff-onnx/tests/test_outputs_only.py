"""A graph cut out of another's (``export._outputs_only``: a UNet's ``full`` out of ``full_capture``): only the kept
outputs and what they need, a weights file of its own, the same numbers; on a hand-made graph, nodes out of order."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from postdiff.errors import ExportError  # noqa: E402
from postdiff_onnx.export import _outputs_only  # noqa: E402


def _write_source(folder, reverse: bool):
    """eps = relu(x) @ w, deep = relu(x) + 1, kv = relu(x) @ kv_w (the output to drop, with a weight only it uses)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    kv_w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "kv_w")
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["eps"]),
        helper.make_node("Add", ["h", "one"], ["deep"]),
        helper.make_node("MatMul", ["h", "kv_w"], ["kv_raw"]),
        helper.make_node("Identity", ["kv_raw"], ["kv"]),
    ]
    if reverse:
        nodes.reverse()
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("eps", "deep", "kv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])], out, [w, kv_w, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    source = folder / "unet_full_capture.onnx"
    onnx.save_model(model, str(source), save_as_external_data=True, location=source.name + ".data", size_threshold=1024)
    return source


@pytest.mark.parametrize("reverse", [False, True])
def test_cut_graph_keeps_its_outputs_and_only_what_they_need(tmp_path, reverse):
    source = _write_source(tmp_path, reverse)
    before = (tmp_path / "unet_full_capture.onnx.data").read_bytes()
    path = tmp_path / "unet_full.onnx"
    _outputs_only(source, path, ["eps", "deep"])
    cut = onnx.load(str(path), load_external_data=False)
    assert [o.name for o in cut.graph.output] == ["eps", "deep"]
    assert sorted(n.op_type for n in cut.graph.node) == ["Add", "MatMul", "Relu"]  # the kv branch is gone
    assert {t.name for t in cut.graph.initializer} == {"w", "one"}
    locations = {e.value for t in cut.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"unet_full.onnx.data"}  # its own file: quantizing it in place leaves the source alone
    assert (tmp_path / "unet_full_capture.onnx.data").read_bytes() == before

    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    whole = ort.InferenceSession(str(source)).run(["eps", "deep"], {"x": x})
    part = ort.InferenceSession(str(path)).run(None, {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(whole, part))


def test_cutting_an_output_the_source_lacks_is_refused(tmp_path):
    source = _write_source(tmp_path, False)
    with pytest.raises(ExportError, match="has no output"):
        _outputs_only(source, tmp_path / "unet_full.onnx", ["eps", "missing"])
    assert not (tmp_path / "unet_full.onnx").exists()
