"""The Stable Diffusion 3 family: an MMDiT (``SD3Transformer2DModel``) trained on a rectified flow, three text encoders."""

from __future__ import annotations

from postdiff.families.base import register_family
from postdiff.families.text_to_image import TextToImage


@register_family
class StableDiffusion3(TextToImage):
    """SD3 and SD3.5 (``StableDiffusion3Pipeline``): two CLIP encoders (pooled and penultimate) and T5, concatenated on
    the token axis; the transformer predicts the flow velocity v = noise - x0 and samples with
    ``FlowMatchEulerDiscreteScheduler`` (shift 3); only flow-matching schedulers can sample it (``Family.scheduler``).
    PostDiff runs it on PyTorch (``postdiff.apply``, the CLI's torch backend); ONNX, OpenVINO and Core ML bundles of it
    are not built yet, and exporting or benchmarking one says so (``bundle_refusal``)."""

    name = "sd3"
    default_guidance = 7.0  # StableDiffusion3Pipeline's default
    roles = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")

    def matches(self, model) -> bool:
        net = getattr(model.pipeline, "transformer", None)
        return net is not None and type(net).__name__ == "SD3Transformer2DModel"

    def bundle_refusal(self, model) -> str | None:
        return (
            f"{model.name}: bundles of SD3 (flow-matching MMDiT) models are not built yet; run it on PyTorch "
            "(postdiff generate --backend torch, or postdiff.apply in Python)"
        )
