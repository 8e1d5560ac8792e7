"""Measuring a generation from the inside: time per UNet call (by variant, latent size and batch) and peak memory.

``StepTimes`` records the engine's ``timed_call`` reports (``postdiff.profiling.recording``) while active;
``PeakMemory`` samples the resident memory.
"""

from __future__ import annotations

import os
import statistics
import threading
from collections import defaultdict

from postdiff.profiling import recording


class StepTimes:
    """Seconds of every UNet call made while active, keyed by (variant, latent "HxW", batch)."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str, int], list[float]] = defaultdict(list)
        self._token = None

    def __enter__(self) -> StepTimes:
        self._token = recording(self)
        self._token.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._token.__exit__(*exc)

    def record(self, variant: str, latent: str, batch: int, seconds: float) -> None:
        self.calls[(variant, latent, batch)].append(seconds)

    def summary(self) -> list[dict]:
        """One row per (variant, latent, batch): calls, median/min/max milliseconds per call."""
        rows = []
        for (variant, latent, batch), secs in self.calls.items():
            rows.append(
                {
                    "variant": variant,
                    "latent": latent,
                    "batch": batch,
                    "calls": len(secs),
                    "median_ms": 1000 * statistics.median(secs),
                    "min_ms": 1000 * min(secs),
                    "max_ms": 1000 * max(secs),
                }
            )
        return rows


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_rss_bytes() -> int:
    """The process's lifetime peak RSS (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakMemory:
    """Peak resident memory while active, sampled every ``interval`` seconds by a background thread.

    ``peak_mb``: the highest RSS seen; ``growth_mb``: that peak minus the RSS on entry (what the measured work
    added). Sampling can miss a spike shorter than ``interval``; the lifetime ``ru_maxrss`` is recorded beside it.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = _rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    def to_dict(self) -> dict:
        mb = 1 / (1 << 20)
        return {
            "peak_rss_mb": round(self.peak * mb, 1),
            "growth_mb": round((self.peak - self.start) * mb, 1),
            "process_max_rss_mb": round(_peak_rss_bytes() * mb, 1),
        }
