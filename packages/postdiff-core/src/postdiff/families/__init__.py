"""The families layer: one module per model family (what depends on the kind of model), the registry that
recognises a model's family, and ``Model`` with the resolution of ``--model`` values."""
