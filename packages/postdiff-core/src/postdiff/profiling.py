"""Timing a generation from the inside: every UNet call, by variant, latent size and batch.

Every ``Denoiser`` reports its calls through ``timed_call``; nothing is recorded unless a recorder is active
(``with recording(r): ...``; the lab's ``StepTimes`` is one), so the cost outside a benchmark is one
context-variable lookup.
A context variable, not an argument, because the denoisers are built deep inside the pipelines (the reference
pipeline, a bundle pipeline, the diffusers hook) and a benchmark should not need a way into each of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

_ACTIVE: contextvars.ContextVar[object | None] = contextvars.ContextVar("postdiff_step_times", default=None)


@contextlib.contextmanager
def recording(recorder) -> Iterator[None]:
    """Send every UNet call made inside to ``recorder.record(variant, latent "HxW", batch, seconds)``."""
    token = _ACTIVE.set(recorder)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def timed_call(variant: str, latent_hw, batch: int) -> Iterator[None]:
    """Wrap one UNet call; timed only while a recorder is active (``recording``)."""
    recorder = _ACTIVE.get()
    if recorder is None:
        yield
        return
    start = time.perf_counter()
    yield
    recorder.record(variant, f"{latent_hw[0]}x{latent_hw[1]}", int(batch), time.perf_counter() - start)
