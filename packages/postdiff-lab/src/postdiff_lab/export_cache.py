"""Exported bundles cached by content, so a second benchmark run does not export again.

The key is a SHA-256 over everything that decides what an export writes: the backend and its options, the
recipe, image size, steps and scheduler, the model's identity (the bytes of its weight and config files; for
files over ``HASH_LIMIT`` their size and modification time, so a multi-GB checkpoint is not read on every run),
and the source of the code that exports (the backend's exporter and the core's graph, UNet-split and bundle
modules) with the installed versions of the tools. Change any of them and the key changes.

Bundles live under ``cache_root()``: ``--cache-dir``, else ``$POSTDIFF_CACHE``, else
``$XDG_CACHE_HOME/postdiff`` (``~/.cache/postdiff``), in ``bundles/<model>-<plan>-<backend>-<key>``. Exports are
written to a staging folder and renamed when complete (``bundle.staged_bundle``), so an interrupted export
leaves no bundle that looks finished.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postdiff.bundle import backends
from postdiff.bundle.manifest import tool_versions
from postdiff.plan.recipe import Recipe

HASH_LIMIT = 64 << 20  # bytes; larger files enter the key by size and mtime
_CODE = (
    "postdiff.pytorch.graphs",
    "postdiff.pytorch.unet",
    "postdiff.bundle",
    "postdiff.plan.cost",
    "postdiff.bundle.export",
    "postdiff.families",
)


def cache_root(explicit: str | Path | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("POSTDIFF_CACHE"):
        return Path(os.environ["POSTDIFF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "postdiff"


def _file_digest(path: Path, h) -> None:
    st = path.stat()
    h.update(f"{path.name}:{st.st_size}".encode())
    if st.st_size > HASH_LIMIT:
        h.update(str(st.st_mtime_ns).encode())
        return
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def model_identity(model: str) -> str:
    """A digest of what defines ``model``'s weights: built-ins by name (random-weight ones are seeded, the
    reference model by its shipped files), folders by their files, Hub ids by name."""
    h = hashlib.sha256(model.encode())
    from .builtin_models import reference_weights_dir

    folder = reference_weights_dir(model)  # None unless an embedded model
    if folder is None and Path(model).expanduser().exists():
        folder = Path(model).expanduser()
    if folder is not None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(folder)).encode())
            _file_digest(path, h)
    return h.hexdigest()


def _code_identity(backend: str) -> str:
    """The engine's graph, split, bundle and cost modules and every module of the backend's own package."""
    h = hashlib.sha256()
    files = []
    for name in _CODE:
        spec = importlib.util.find_spec(name)
        if spec and spec.origin:
            files.append(Path(spec.origin))
    package = importlib.util.find_spec(type(backends.get(backend)).__module__.split(".")[0])
    if package and package.submodule_search_locations:
        for folder in package.submodule_search_locations:
            files += sorted(Path(folder).rglob("*.py"))
    for path in files:
        h.update(path.read_bytes())
    return h.hexdigest()


def bundle_key(backend: str, model: str, recipe: Recipe, options: dict[str, Any]) -> str:
    b = backends.get(backend)
    payload = {
        "backend": backend,
        "model": model_identity(model),
        "recipe": recipe.to_dict(),
        "options": options,
        "code": _code_identity(backend),
        "tools": tool_versions(*([b.package] if b.package else [])),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "model"


def cached_export(
    backend: str,
    model: str,
    recipe: Recipe,
    *,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    **options,
) -> tuple[Path, bool, float]:
    """The bundle for (backend, model, recipe, options): (folder, True, 0.0) when cached, else exported now
    (folder, False, seconds). ``options`` go to the backend's exporter (height, width, steps, scheduler, ...)."""
    key = bundle_key(backend, model, recipe, options)
    folder = cache_root(cache_dir) / "bundles" / f"{_slug(Path(model).name or model)}-{_slug(recipe.label)}-{backend}-{key[:16]}"
    if (folder / "manifest.json").is_file():
        return folder, True, 0.0
    from postdiff.bundle.export import export_bundle

    log(f"export: {backend} bundle for {model}, plan {recipe.label} -> {folder}")
    start = time.perf_counter()
    export_bundle(backend, model, recipe, folder, overwrite=folder.exists(), log=log, **options)
    return folder, False, time.perf_counter() - start
