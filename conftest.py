"""Fixtures every test folder may use."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def export_once(tmp_path_factory):
    """Bundles exported once per test session (an export takes 0.5-2.5 minutes on 2 cores):
    ``export_once(backend, model, plan, **options)`` -> the bundle folder."""
    made: dict[tuple, object] = {}

    def get(backend: str, model: str, plan, **options):
        """``plan``: a built-in name, or a recipe dict with a ``name``."""
        import json

        label = plan if isinstance(plan, str) else plan["name"]
        key = (backend, model, json.dumps(plan, sort_keys=True), tuple(sorted(options.items())))
        if key not in made:
            from postdiff.bundle.export import export_bundle

            folder = tmp_path_factory.mktemp(backend) / f"{model}-{label}"
            made[key] = export_bundle(backend, model, plan, folder, log=lambda m: None, **options)
        return made[key]

    return get
