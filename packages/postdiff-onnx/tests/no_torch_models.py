"""Runs the ``postdiff`` CLI with ``torch.nn.Module`` construction disabled (used by the tests to prove that
generation from a bundle builds no PyTorch model)."""

import sys

import torch


def _forbidden(self, *args, **kwargs):
    raise RuntimeError(f"a PyTorch model was built: {type(self).__name__}")


torch.nn.Module.__init__ = _forbidden

from postdiff_cli.main import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
