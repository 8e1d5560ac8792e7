"""What every recorded result carries about the machine it was measured on."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path


def machine_info() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_json(path: str | Path, data) -> None:
    """Write ``data`` as strict JSON (RFC 8259: a non-finite number becomes null) through a temporary file, so a
    reader, or a run cut short, never sees half a file."""
    import json

    from postdiff.files import atomic_write_text

    atomic_write_text(path, json.dumps(strict_json(data), indent=2, allow_nan=False))


def write_results(path: str | Path, data, table: str) -> Path:
    """A benchmark's results: ``data`` as strict JSON at ``path`` and its Markdown ``table`` beside it (``.txt``)."""
    from postdiff.files import atomic_write_text

    path = Path(path)
    write_json(path, data)
    atomic_write_text(path.with_suffix(".txt"), table + "\n")
    return path


def strict_json(value):
    """``value`` with every NaN or infinity replaced by None: Python's ``json`` writes them as ``NaN``/``Infinity``,
    which JSON does not have and strict parsers (browsers, jq, Go, Rust) refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        return strict_json(value.item())
    return value
