"""A pipeline with a fused LoRA exports the fused weights (issue 18)."""

import numpy as np
import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs peft (installed by scripts/setup.sh)")


def test_a_fused_lora_is_what_the_bundle_holds(tmp_path):
    import onnx
    from onnx import numpy_helper
    from peft import LoraConfig

    from postdiff.bundle.export import export_bundle
    from postdiff.families.model import from_pipeline
    from postdiff_lab.toy import toy_pipeline

    pipe = toy_pipeline("sd")
    q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    before = q.weight.detach().clone().numpy()
    torch.manual_seed(3)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], init_lora_weights=False))
    pipe.fuse_lora(lora_scale=0.9)
    pipe.unload_lora_weights()  # the fused weights stay in the UNet, the LoRA layers go
    fused = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.weight.detach().numpy()
    assert np.abs(fused - before).max() > 1e-3
    bundle = export_bundle("onnx", from_pipeline("toy-sd-fused-lora", pipe), "baseline", tmp_path / "b", log=lambda m: None)
    graph = onnx.load(str(next(bundle.glob("unet_full*.onnx"))), load_external_data=True)
    weights = [numpy_helper.to_array(t) for t in graph.graph.initializer]

    def holds(w):
        return any(a.shape in (w.shape, w.T.shape) and (np.array_equal(a, w) or np.array_equal(a, w.T)) for a in weights)

    assert holds(fused) and not holds(before)
