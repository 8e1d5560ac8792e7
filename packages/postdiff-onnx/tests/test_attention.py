"""Attention in exported graphs: the standard operator rewritten as ONNX Runtime's MultiHeadAttention (flash attention
on CPU, so a 512 px self-attention does not hold every head's score matrix), exactly, and only where it applies."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from postdiff_onnx.export import _attention_as_multihead

RNG = np.random.default_rng(0)


def _diffusers_attention(path, *, heads, dim, attrs=None, mask=False, shape_as="concat"):
    """What diffusers' attention exports at opset 23: q, k, v projected, reshaped to (B, -1, heads, dim), transposed
    to (B, heads, L, dim), Attention, transposed back, reshaped to (B, L, heads x dim), projected."""
    c = heads * dim
    inits = [numpy_helper.from_array((RNG.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32), f"w{n}") for n in "qkvo"]
    nodes = []
    if shape_as == "concat":  # the batch from the input's shape, the rest constants (what torch.onnx writes)
        inits += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("m1", -1), ("h", heads), ("d", dim))]
        nodes += [
            helper.make_node("Shape", ["x"], ["b"], start=0, end=1),
            helper.make_node("Concat", ["b", "m1", "h", "d"], ["heads_shape"], axis=0),
        ]
    else:
        inits.append(numpy_helper.from_array(np.array([0, -1, heads, dim], np.int64), "heads_shape"))
    for n in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}3"]),
            helper.make_node("Reshape", [f"{n}3", "heads_shape"], [f"{n}r"]),
            helper.make_node("Transpose", [f"{n}r"], [f"{n}4"], perm=[0, 2, 1, 3]),
        ]
    inputs = ["q4", "k4", "v4"]
    if mask:
        inputs.append("mask")
    inits.append(numpy_helper.from_array(np.array([0, 0, c], np.int64), "flat"))
    nodes += [
        helper.make_node("Attention", inputs, ["a"], **(attrs or {})),
        helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["at", "flat"], ["a3"]),
        helper.make_node("MatMul", ["a3", "wo"], ["y"]),
    ]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "l", c])]
    if mask:
        ins.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["l", "l"]))
    graph = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "l", c])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(path))


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _run(path, feeds):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("heads,dim", [(8, 5), (1, 16), (3, 4)])
@pytest.mark.parametrize("shape_as", ["concat", "constant"])
@pytest.mark.parametrize("attrs", [{}, {"scale": 0.3}])
def test_the_rewrite_is_exact_at_any_token_count(tmp_path, heads, dim, shape_as, attrs):
    plain, rewritten = tmp_path / "plain.onnx", tmp_path / "mha.onnx"
    _diffusers_attention(plain, heads=heads, dim=dim, attrs=attrs, shape_as=shape_as)
    shutil.copy(plain, rewritten)
    _attention_as_multihead(rewritten)
    ops = _ops(rewritten)
    assert ops["MultiHeadAttention"] == 1 and ops["Attention"] == 0
    assert ops["Transpose"] == 0  # the reshapes and transposes around the operator went with it
    onnx.checker.check_model(onnx.load(str(rewritten)), full_check=True)
    for batch, tokens in [(1, 1), (2, 7), (1, 64), (3, 33)]:
        x = RNG.standard_normal((batch, tokens, heads * dim)).astype(np.float32)
        expected = _run(plain, {"x": x})
        np.testing.assert_allclose(_run(rewritten, {"x": x}), expected, rtol=1e-4, atol=1e-5)


def test_the_operator_computes_what_torch_computes(tmp_path):
    path = tmp_path / "mha.onnx"
    _diffusers_attention(path, heads=4, dim=8)
    _attention_as_multihead(path)
    model = onnx.load(str(path))
    w = {t.name: torch.from_numpy(numpy_helper.to_array(t)) for t in model.graph.initializer if t.name.startswith("w")}
    x = torch.randn(2, 50, 32)
    q, k, v = ((x @ w[f"w{n}"]).unflatten(-1, (4, 8)).transpose(1, 2) for n in "qkv")
    expected = (torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2) @ w["wo"]).numpy()
    np.testing.assert_allclose(_run(path, {"x": x.numpy()}), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("what", [{"attrs": {"is_causal": 1}}, {"attrs": {"softcap": 30.0}}, {"mask": True}])
def test_attention_it_cannot_express_stays(tmp_path, what):
    path = tmp_path / "a.onnx"
    _diffusers_attention(path, heads=2, dim=4, **what)
    before = onnx.load(str(path)).SerializeToString()
    _attention_as_multihead(path)
    assert onnx.load(str(path)).SerializeToString() == before


def test_exported_bundles_run_every_attention_as_multihead(bundles):
    """Every attention of the toy SD's UNet graphs (self and cross, full and shallow) is rewritten, the export's own
    check (PSNR against torch at every latent size) passed for the bundle to exist; the text encoder's attention
    takes CLIP's causal mask, which MultiHeadAttention does not, and stays."""
    folder = bundles("sd")
    for path in folder.glob("*.onnx"):
        ops = _ops(path)
        if path.name.startswith("unet"):
            assert ops["MultiHeadAttention"] > 0 and ops["Attention"] == 0, path.name
        elif path.name == "text_encoder.onnx":
            assert ops["Attention"] > 0 and ops["MultiHeadAttention"] == 0
