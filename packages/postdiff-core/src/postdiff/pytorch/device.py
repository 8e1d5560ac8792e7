"""Where PyTorch runs a model and in which floating-point type: ``--device`` and ``--dtype`` of the CLI, and the Python
API's ``Model.to``.

``auto`` picks CUDA, then Apple's MPS, then the CPU; the dtype's ``auto`` is float16 on CUDA and MPS (what SD users
run there) and float32 on the CPU (PyTorch's CPU kernels for float16 are slow, and bfloat16 needs AVX512-BF16 or AMX
to be fast). A device that is not here is refused in one line that names the devices found, before any model loads.
"""

from __future__ import annotations

from postdiff.errors import PostDiffError

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICE_HELP = "PyTorch device: auto, cpu, cuda, cuda:N or mps (default: auto, which is CUDA, then MPS, then the CPU)"
DTYPE_HELP = (
    "PyTorch weights and activations: auto, float32, float16 or bfloat16 (default: auto, float16 on CUDA and MPS, float32 on the CPU)"
)
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}


def found_devices() -> list[str]:
    """The PyTorch devices of this machine: cpu, cuda:0 .., mps."""
    import torch

    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = ["mps"] if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else []
    return ["cpu", *cuda, *mps]


def resolve_device(name: str | None):
    """``torch.device`` for a ``--device`` value (None: auto), or one line naming the devices found."""
    import torch

    text = (name or "auto").strip().lower()
    found = found_devices()
    if text == "auto":
        return torch.device(next((d for d in found if d != "cpu"), "cpu"))
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise PostDiffError(f"unknown PyTorch device {name!r}; use auto, cpu, cuda, cuda:N or mps (found here: {', '.join(found)})")
    wanted = f"cuda:{index or 0}" if kind == "cuda" else kind
    if wanted not in found:
        raise PostDiffError(f"PyTorch has no {text} device here (found: {', '.join(found)}); pass --device {found[-1]} or leave it out")
    return torch.device(wanted if kind == "cuda" else kind)


def resolve_dtype(name: str | None, device):
    """``torch.dtype`` for a ``--dtype`` value (None: auto) on ``device``."""
    import torch

    text = (name or "auto").strip().lower()
    text = _ALIASES.get(text, text)
    if text not in DTYPES:
        raise PostDiffError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if text == "auto":
        return torch.float16 if torch.device(device).type in ("cuda", "mps") else torch.float32
    if text == "bfloat16" and torch.device(device).type == "mps" and not _mps_has_bf16():
        raise PostDiffError("this MPS device has no bfloat16 (macOS 14 or later is needed); use --dtype float16")
    return getattr(torch, text)


def check_target(device: str | None, dtype: str | None) -> None:
    """Refuse, before any model loads, a ``--device`` that is not here or a ``--dtype`` it cannot run (one line)."""
    resolve_dtype(dtype, resolve_device(device))


def short_dtype(dtype: str) -> str:
    """The weight-type name ``--weights`` uses for a dtype name: fp32, fp16, bf16."""
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]


def _mps_has_bf16() -> bool:
    import torch

    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


def dtype_name(dtype) -> str:
    """ "float16" for ``torch.float16``."""
    return str(dtype).removeprefix("torch.")
