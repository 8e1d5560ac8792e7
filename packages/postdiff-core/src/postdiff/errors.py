"""Errors a user can cause. Each message names the field or input at fault and the fix.

The CLI prints these in one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PostDiffError(Exception):
    """Base class for every error caused by user input."""


class RecipeError(PostDiffError, ValueError):
    """A recipe (what a user writes) is malformed or asks for something impossible."""


class PlanError(PostDiffError, ValueError):
    """A compiled plan cannot run: inconsistent steps, or a backend/model that cannot serve it."""


class ModelError(PostDiffError, ValueError):
    """A model cannot be loaded, or does not have what a plan needs."""


class BundleError(PostDiffError, ValueError):
    """An exported bundle is missing, damaged, or cannot serve what was asked of it."""


class ExportError(PostDiffError, RuntimeError):
    """An export cannot be made as asked (existing output folder, unsupported option, failed verification)."""


class PostDiffWarning(UserWarning):
    """Work that runs as asked but will likely give poor results (the CLI prints it in one line)."""


_WARNED_ONCE: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A ``PostDiffWarning`` the first time ``key`` is met in this process, not once per plan, size or graph."""
    import warnings

    if key not in _WARNED_ONCE:
        _WARNED_ONCE.add(key)
        warnings.warn(message, PostDiffWarning, stacklevel=3)


def warnings_in_one_line(prog: str) -> None:
    """Print ``PostDiffWarning``s as ``prog: warning: ...`` on stderr (the CLIs' form for errors too); other warnings
    keep Python's format."""
    import sys
    import warnings

    previous = warnings.showwarning
    if getattr(previous, "postdiff_prog", None) == prog:  # installed already (main() called again in one process)
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PostDiffWarning):
            print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    show.postdiff_prog = prog
    warnings.showwarning = show


def brief(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for echoing user input in an error (a 100k-character prompt
    must not become a 100k-character message)."""
    text = repr(value) if not isinstance(value, str) else repr(value.replace("\n", " "))
    return text if len(text) <= limit else f"{text[: limit - 12]}... ({len(str(value))} characters)"
