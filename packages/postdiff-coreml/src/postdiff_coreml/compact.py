"""Smaller ML programs: every function of a multifunction package carries its own MIL program beside the shared
weights, so program bytes are what grows with the number of functions.

Two things take most of a program's bytes, both measured on the reference UNet (``full_32x32``: 1,919 ops,
342 KB of program beside 2.1 MB of weights):

- names: the converter keeps torch.export's node names (``down_blocks_0_attentions_0_..._to_fp16``), 25 characters
  on average, each written three or four times (the op, its output, every use): 148 KB;
- small constants written inline, one ``const`` op per use (axes, shapes, epsilons): 747 of them.

``compact_pipeline`` is coremltools' default pass pipeline with its own ``common::const_deduplication`` extended to
constants of every size (coremltools already does this across functions when it merges them), plus
``postdiff::compact_names``, which renames the ops and variables inside a function to short unique names
(``v1``, ``v2``, ...). The function's inputs and outputs keep their names: they are the app's interface. Both
are renamings and sharings of identical values, so the computation is unchanged. The reference program shrinks
from 342 KB to 154 KB.
"""

from __future__ import annotations

import contextlib
import itertools

from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

COMPACT_NAMES = "postdiff::compact_names"
_DEDUP = "common::const_deduplication"


@register_pass(namespace="postdiff")
class compact_names(AbstractGraphPass):
    """Short unique names for every op and variable of each function except the function's inputs and outputs."""

    def apply(self, prog):
        for func in prog.functions.values():
            keep = set(func.inputs.values()) | set(func.outputs)
            taken = {v.name for v in keep}
            names = (n for n in (f"v{i:x}" for i in itertools.count(1)) if n not in taken)
            self._rename(func, keep, names)

    def _rename(self, block, keep, names) -> None:
        for op in list(block.operations):
            for inner in op.blocks:
                self._rename(inner, keep, names)
            name = next(names)
            op.name = name
            for i, var in enumerate(op.outputs):
                if var not in keep:
                    var.name = name if i == 0 else f"{name}_{i}"


@contextlib.contextmanager
def compact_pipeline(ct):
    """The pass pipeline for ``ct.convert``. coremltools keeps ``const_deduplication``'s threshold on its class, so
    the option would outlive the conversion: the old threshold is put back afterwards."""
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.set_options(_DEDUP, {"const_threshold": 1})
    pipeline.append_pass(COMPACT_NAMES)
    dedup = PASS_REGISTRY[_DEDUP]
    before = dedup.const_threshold
    try:
        yield pipeline
    finally:
        dedup.const_threshold = before
