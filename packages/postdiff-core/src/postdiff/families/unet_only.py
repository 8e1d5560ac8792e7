"""A bare UNet (an ``arch:`` architecture, a UNet folder): plans, costs and per-graph benchmarks, no images."""

from __future__ import annotations

from typing import Any

from postdiff.families.base import Family, register_family


@register_family
class UNetOnly(Family):
    """A bare UNet (an ``arch:`` architecture, a UNet folder): plans, costs and per-graph benchmarks, no images."""

    name = "unet"
    generates = False

    def matches(self, model) -> bool:
        return model.pipeline is None

    def bundle_info(self, model) -> dict[str, Any]:
        return {}
