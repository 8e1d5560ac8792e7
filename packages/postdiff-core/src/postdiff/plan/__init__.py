"""The plan layer: recipes (what a user writes), compiling one to a ``Plan`` (one ``Step`` per network call),
scheduler names, and the cost of a plan. Pure data: no PyTorch, no numpy."""
