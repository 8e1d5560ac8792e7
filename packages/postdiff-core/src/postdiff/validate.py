"""Checks of numbers a user gives, one rule per kind of number, shared by the CLI's flags and the library's calls.

Zero, negatives, NaN and infinity are refused wherever they have no meaning, with the allowed range in the
message. Where zero has a meaning it is kept and documented: ``--warmup 0`` (no untimed run), ``--holdout 0``
(no held-out check), a gate of 0 (no gate), and guidance at most 1, which means "no classifier-free guidance", as
in diffusers (``guidance_scale <= 1`` disables it).
"""

from __future__ import annotations

import math

from postdiff.errors import PostDiffError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed
MAX_STEPS = 1000  # the usual num_train_timesteps; the scheduler's own value is checked when a plan compiles
MAX_IMAGE_SIDE = 16384  # pixels: beyond any diffusion model's reach, and a typo's guard against hours of work


def integer(value, name: str, *, minimum: int | None = 1, maximum: int | None = None, meaning: str = "") -> int:
    """``value`` as an int within [minimum, maximum], or a PostDiffError naming ``name`` and the range."""
    if isinstance(value, bool):
        raise PostDiffError(f"{name} must be an integer, got {value!r}")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)
        if not isinstance(value, str) and number != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise PostDiffError(f"{name} must be an integer{_range(minimum, maximum)}, got {_show(value)}") from None
    if minimum is not None and number < minimum:
        raise PostDiffError(f"{name} must be at least {minimum}{meaning}, got {number}")
    if maximum is not None and number > maximum:
        raise PostDiffError(f"{name} must be at most {maximum}{meaning}, got {number}")
    return number


def number(
    value, name: str, *, minimum: float | None = None, maximum: float | None = None, above: float | None = None, meaning: str = ""
) -> float:
    """``value`` as a finite float within [minimum, maximum] (or above ``above``, exclusive)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PostDiffError(f"{name} must be a number, got {_show(value)}") from None
    lo = f" above {above:g}" if above is not None else (f" of at least {minimum:g}" if minimum is not None else "")
    hi = f" and at most {maximum:g}" if maximum is not None else ""
    if not math.isfinite(x):
        raise PostDiffError(f"{name} must be a finite number{lo}{hi}{meaning}, got {value}")
    if (above is not None and x <= above) or (minimum is not None and x < minimum) or (maximum is not None and x > maximum):
        raise PostDiffError(f"{name} must be a number{lo}{hi}{meaning}, got {x:g}")
    return x


def steps(value, name: str = "steps") -> int:
    return integer(value, name, minimum=1, maximum=MAX_STEPS)


def image_side(value, name: str) -> int:
    return integer(value, name, minimum=1, maximum=MAX_IMAGE_SIDE, meaning=" (pixels)")


def seed(value, name: str = "seed") -> int:
    return integer(value, name, minimum=0, maximum=MAX_SEED)


def guidance(value, name: str = "guidance") -> float:
    return number(value, name, minimum=0.0, maximum=100.0, meaning=" (at most 1: no classifier-free guidance)")


def _range(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of at least {minimum}"
    return f" of at most {maximum}" if maximum is not None else ""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
