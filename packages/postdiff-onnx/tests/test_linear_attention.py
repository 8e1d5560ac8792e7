"""SANA's linear attention through the ONNX exporter (``export._LinearAttentionForOnnx``): the same numbers as
diffusers' processor in PyTorch, and no NaN in ONNX Runtime for a token whose ReLU features are all zero, where
diffusers' ``+ 1e-15`` does not survive the ONNX optimizer (0 / 0). The whole SANA bundle is the slow test of
test_flow_transformer_bundles.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0  # noqa: E402

from postdiff_onnx.export import _linear_attention_for_onnx, _LinearAttentionForOnnx  # noqa: E402


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attention(query_dim=32, heads=2, dim_head=16, bias=False, processor=SanaLinearAttnProcessor2_0())

    def forward(self, x):
        return self.attn(x)


def test_the_onnx_form_equals_diffusers_processor_in_pytorch():
    block = _Block().eval()
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(block(x), _LinearAttentionForOnnx()(block.attn, x))


def test_a_token_with_no_features_stays_finite_in_onnx_runtime(tmp_path):
    block = _Block().eval()
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(2))
    x[0, 3] = 0  # no bias: its query is 0, its ReLU features are all zero, its normaliser is 0
    with torch.no_grad():
        expected = block(x).numpy()
        with _linear_attention_for_onnx(block):
            prog = torch.onnx.export(block, (x,), dynamo=True, input_names=["x"], output_names=["y"], optimize=True)
    path = tmp_path / "attn.onnx"
    prog.save(str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert block.attn.processor.__class__ is SanaLinearAttnProcessor2_0  # the swap is undone after tracing
