"""What every network split shares (``postdiff.pytorch.unet.UNetSplit``, ``postdiff.pytorch.transformer.TransformerSplit``): the
cross-attention wrappers that compute, capture or replay each ``attn2`` output, and the variant modules' common
interface.

Cross-attention caching works on every ``attn2`` module through a processor wrapper that either computes as usual,
computes and hands the output back ("capture"), or returns a tensor it is given ("cached"). Cached outputs travel
as (batch, height, width, channels) maps rather than token lists, so exported graphs keep every dimension a multiple
of the latent size. What the wrapper does is decided by the explicit inputs of each call: a split keeps no Python
state between calls, so ``torch.export`` traces exactly what runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from postdiff.errors import ModelError


class _XAttnIO:
    """Per-call instructions for the cross-attention wrappers, set at the start of a forward and cleared at its end."""

    def __init__(self) -> None:
        self.mode = "compute"
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.hw: tuple[int, int] = (0, 0)  # spatial size of the feature map (or patch grid) the attention works on


# The split whose forward is running in this thread (or asyncio task), if any. The wrappers read it instead of
# holding a split of their own: a network shared by several pipelines is called by other threads, and by another
# pipeline's call made from inside a step callback, while a plan runs; those calls see no active split here and
# compute exactly as the wrapped processor would. A ContextVar, not a thread-local, so tasks get their own value.
_ACTIVE_IO: contextvars.ContextVar[_XAttnIO | None] = contextvars.ContextVar("postdiff_xattn_io", default=None)
# Wrappers are installed once per module and counted: every split of a network (several calls at once, in threads)
# shares them, and the last split to close restores the original processor.
_WRAP_LOCK = threading.Lock()


class _XAttnProcessor:
    """Wraps an attn2 processor. Outside a split's forward (or in mode "compute") it is exactly the wrapped processor."""

    def __init__(self, inner: Any, index: int) -> None:
        # index: the module's place among the network's attn2 modules in execution order, the same in every split
        # of the network (a split's cut does not change the order), so the wrapper holds it
        self.inner, self.index, self.users = inner, index, 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        io = _ACTIVE_IO.get()
        if io is None or io.mode == "compute":
            return self.inner(attn, hidden_states, *args, **kwargs)
        k = self.index
        if io.mode == "cached":
            return io.inputs[k].flatten(1, 2)  # (B, H, W, C) -> (B, H*W, C), the tokens' row-major order
        out = self.inner(attn, hidden_states, *args, **kwargs)
        io.outputs[k] = out.unflatten(1, io.hw)  # mode "capture"
        return out

    def __getattr__(self, name):  # diffusers inspects processors (e.g. for IP-Adapter scales)
        if name == "inner" or name.startswith("__"):  # not set yet: copy and pickle build the object empty first
            raise AttributeError(name)
        return getattr(self.inner, name)


class CrossAttentionSplit:
    """The base of a split: its ``attn2`` modules wrapped (in execution order; index k is ``xattn_k``), which of them
    a shallow pass runs, and the variants' cross-attention tensors. A context manager (or call ``close``): the
    wrappers are removed from the network afterwards (when no other split of it is open)."""

    def _wrap(self, attn2: list[nn.Module], shallow_xattn: list[int]) -> None:
        self.io = _XAttnIO()
        self.attn2 = attn2
        self.shallow_xattn = shallow_xattn
        with _WRAP_LOCK:
            for k, m in enumerate(attn2):
                if not isinstance(m.processor, _XAttnProcessor):
                    # set_processor, not assignment: an IP-Adapter's processor is a module (its image key/value
                    # projections), which the Attention module holds as a child until the wrapper stands in for it
                    m.set_processor(_XAttnProcessor(m.processor, k))
                elif m.processor.index != k:
                    raise ModelError(f"attn2 module {k} is already wrapped as module {m.processor.index} by another split")
                m.processor.users += 1

    @property
    def num_xattn(self) -> int:
        return len(self.attn2)

    def xattn_indices(self, variant: str) -> list[int]:
        """Indices of the cross-attention tensors a variant takes (cached) or returns (capture)."""
        if variant.endswith("_cached") or variant.endswith("_capture"):
            return self.shallow_xattn if variant.startswith("shallow") else list(range(self.num_xattn))
        return []

    def close(self) -> None:
        with _WRAP_LOCK:
            for m in self.attn2:
                wrapper = m.processor
                if isinstance(wrapper, _XAttnProcessor):
                    wrapper.users -= 1
                    if wrapper.users <= 0:
                        m.set_processor(wrapper.inner)
        self.attn2 = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _xattn(self, mode: str, inputs: dict[int, torch.Tensor] | None):
        io = self.io
        io.mode, io.inputs, io.outputs = mode, inputs or {}, {}
        token = _ACTIVE_IO.set(io)
        try:
            yield io
        finally:
            _ACTIVE_IO.reset(token)
            io.mode, io.inputs = "compute", {}

    @staticmethod
    def _check_variant(variant: str, deep, xattn: Sequence, wanted: list[int]) -> tuple[str, str]:
        """(depth, mode) of a variant name, after the checks every split makes of its call."""
        depth, _, mode = variant.partition("_")
        mode = mode or "compute"
        if depth not in ("full", "shallow") or mode not in ("compute", "capture", "cached") or variant == "shallow_capture":
            raise ValueError(f"unknown variant {variant!r}")
        if depth == "shallow" and deep is None:
            raise ValueError("a shallow pass needs the cached feature (deep=...)")
        if mode == "cached" and len(xattn) != len(wanted):
            raise ValueError(f"{variant} takes {len(wanted)} cached cross-attention tensors, got {len(xattn)}")
        return depth, mode


def seeded_randn(seed: int, device="cpu"):
    """A maker of the variants' random example inputs: normal tensors from one generator seeded with ``seed``, on
    ``device``; on ``meta`` (counting MACs) empty tensors of the shape, drawing nothing."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        if str(device) == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g).to(device)

    return randn


class SplitVariantModule(nn.Module):
    """One variant of a split with explicit tensor inputs and outputs, for ``torch.export`` and the exporters.
    Cross-attention tensors are named by module index (``xattn_3`` is the output of the fourth attn2 module in
    execution order), so what ``full_capture`` returns as ``xattn_3`` is what a ``*_cached`` variant takes."""

    def __init__(self, split: CrossAttentionSplit, network: nn.Module, variant: str) -> None:
        super().__init__()
        self.unet = network  # registers the parameters (the name every split's modules share)
        self._split = split
        self.variant = variant
        self.takes_deep = variant.startswith("shallow")
        indices = split.xattn_indices(variant)
        self.xattn_in = indices if variant.endswith("_cached") else []
        self.xattn_out = indices if variant.endswith("_capture") else []

    def output_names(self) -> list[str]:
        names = ["eps"] if self.takes_deep else ["eps", "deep"]
        return names + [f"xattn_{i}" for i in self.xattn_out]

    def _in_input_order(self, by_name: dict) -> tuple:
        """``torch.export`` dynamic shapes in ``input_names`` order: the four leading inputs, then the rest as one tuple
        (``forward``'s ``*rest``)."""
        specs = [by_name[n] for n in self.input_names()]
        return (*specs[:4], tuple(specs[4:])) if len(specs) > 4 else tuple(specs)

    def _with_caches(self, ins: dict[str, torch.Tensor], probe: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``ins`` plus the cache tensors this variant takes, from a ``full_capture`` pass's outputs ``probe``
        (eps, deep, *xattn) on the same inputs: the values it would get in a plan."""
        captured = dict(zip(self._split.xattn_indices("full_capture"), probe[2:]))
        if self.takes_deep:
            ins["deep"] = probe[1]
        for i in self.xattn_in:
            ins[f"xattn_{i}"] = captured[i]
        return ins
