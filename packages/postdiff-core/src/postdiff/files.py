"""Files a user gives or asks for: read with one-line errors, checked before the work starts, written whole or not at all.

* ``read_text`` reads a text file the user named (a recipe, a prompts file) as UTF-8, refusing bytes that are not
  UTF-8 or a file that cannot be read in one line that names it.

* ``check_output`` refuses, before any model loads, an output path that is a folder, lies in a folder that cannot
  be written, or has a suffix the writer cannot produce, so a long run never fails at its last line.
* ``atomic_write`` writes through a temporary file in the destination's folder and renames it into place: a reader,
  or a run cut short, never sees half a file. The file gets the mode a plain ``open`` would give (0666 less the
  umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from postdiff.errors import PostDiffError


def umask_mode(base: int) -> int:
    """``base`` (0o666 for files, 0o777 for folders) less the process umask, as ``open``/``mkdir`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def check_output(path: str | Path | None, flag: str, *, suffixes: Sequence[str] = ()) -> Path | None:
    """``path`` as a writable file destination, or a ``PostDiffError`` naming ``flag`` and the fix. None passes."""
    if path is None:
        return None
    text = str(path)
    if not text.strip():
        raise PostDiffError(f"{flag} is empty; give a file path")
    p = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or p.is_dir():
        raise PostDiffError(
            f"{flag} {text} is a folder; give a file path inside it, e.g. {p / ('out' + (suffixes[0] if suffixes else ''))}"
        )
    if suffixes and p.suffix.lower() not in suffixes:
        raise PostDiffError(f"{flag} {text} must end in {' or '.join(suffixes)} (it is written in that format)")
    _check_writable_parent(p, flag, text)
    if p.exists() and not os.access(p, os.W_OK):
        raise PostDiffError(f"{flag} {text} exists and is read-only; choose another path or make it writable")
    return p


def check_output_folder(path: str | Path, flag: str) -> Path:
    """A folder to be created at ``path`` (an export): its parent must be, or be creatable as, a writable folder."""
    text = str(path)
    if not text.strip():
        raise PostDiffError(f"{flag} is empty; give the folder to create")
    p = Path(text).expanduser()
    if p.exists() and not p.is_dir():
        raise PostDiffError(f"{flag} {text} is a file; give a folder path to create")
    _check_writable_parent(p, flag, text)
    return p


def _check_writable_parent(p: Path, flag: str, text: str) -> None:
    """The nearest existing folder above ``p`` must take a new entry: probed by making (and removing) a temporary
    folder there, since permission bits say nothing for root, read-only mounts or /proc."""
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PostDiffError(f"{flag} {text}: {parent} is a file, not a folder; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".postdiff-probe-", dir=parent))
    except OSError as exc:
        raise PostDiffError(f"{flag} {text}: cannot write in {parent} ({exc.strerror}); choose a writable folder") from None


def read_text(path: Path, where: str, error: type[PostDiffError] = PostDiffError, *, hint: str = "") -> str:
    """The UTF-8 text of ``path`` (a byte-order mark is dropped); ``where`` names it in the errors ("plan file x.json"),
    ``hint`` ends the not-UTF-8 one."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{where} is not UTF-8 text (byte {exc.start}){'; ' + hint if hint else ''}") from None
    except OSError as exc:
        raise error(f"cannot read {where}: {exc.strerror}") from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
