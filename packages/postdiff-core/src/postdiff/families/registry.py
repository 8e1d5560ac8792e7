"""Which family a model or a bundle belongs to: the built-in families, registered in order (most specific first).

Importing this module registers the built-in families; a family of another package registers itself with
``postdiff.families.base.register_family`` when its module is imported.
"""

from __future__ import annotations

from postdiff.errors import BundleError, ModelError, brief

# imported for their registration; the order is the one family_of falls back on (pixart, sana and sd3 import
# text_to_image, so SD, SDXL and LCM register before PixArt, SANA and SD3, as a test checks)
from postdiff.families import class_conditional, pixart, sana, sd3, text_to_image, unet_only  # noqa: F401
from postdiff.families.base import FAMILIES, Family, Model


def family_named(kind: str) -> Family:
    for family in FAMILIES.values():
        if kind == family.name or kind in family.aliases:
            return family
    raise BundleError(f"unknown model family {brief(kind)} in the bundle; known: {', '.join(FAMILIES)}. Re-export it with this version")


def family_of(model: Model) -> Family:
    """The family that recognises ``model``: a subclass before its base (LCM before SD), else in registration order."""
    for family in sorted(FAMILIES.values(), key=lambda f: -len(type(f).__mro__)):
        if family.matches(model):
            return family
    raise ModelError(f"{model.name}: no model family recognises it (known: {', '.join(FAMILIES)})")
