"""Where the plugin's non-code assets live: the ``resources/`` folder (icons, layer styles, help,
the Text search tab's example phrases).

In the plugin zip, ``scripts/build_plugin.py`` copies the repository's top-level ``resources/``
into ``sarmae_qgis/resources/``; in a development checkout it sits one level above the package.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .metadata import PACKAGE_DIR


def resources_dir(package_dir: Path = PACKAGE_DIR) -> Path:
    """``<plugin>/resources`` when installed, else ``<repository>/resources``."""
    inside = package_dir / "resources"
    return inside if inside.is_dir() else package_dir.parent / "resources"


def resource(*parts: str) -> Path:
    """The path of one asset, e.g. ``resource("icons", "sarmae.svg")``."""
    return resources_dir().joinpath(*parts)


ICON_PATH = resource("icons", "sarmae.svg")
DEFAULT_OPACITY = 0.6


@lru_cache(maxsize=1)
def layer_opacities() -> dict[str, float]:
    """Output role -> layer opacity, from ``styles/layers.json`` (empty when it does not read)."""
    try:
        data = json.loads(resource("styles", "layers.json").read_text(encoding="utf-8"))
        return {str(k): float(v) for k, v in (data.get("opacity") or {}).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def opacity_for(role: str) -> float:
    """The opacity of an output role ("class", "similarity", ...), 0.6 when not listed."""
    return layer_opacities().get(role, DEFAULT_OPACITY)


@lru_cache(maxsize=1)
def named_class_colours() -> dict[str, str]:
    """Lower-case class name -> '#rrggbb' for well-known names, from ``styles/classes.json``."""
    try:
        data = json.loads(resource("styles", "classes.json").read_text(encoding="utf-8"))
        return {str(k).lower(): str(v) for k, v in (data.get("colours") or {}).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


@lru_cache(maxsize=1)
def text_search_phrases() -> tuple[str, ...]:
    """Example phrases of the Text search tab (its list and the Find field's completion), from
    ``prompts/text_search.json``; empty when it does not read."""
    try:
        data = json.loads(resource("prompts", "text_search.json").read_text(encoding="utf-8"))
        return tuple(dict.fromkeys(str(p).strip() for p in data.get("phrases") or [] if str(p).strip()))
    except (OSError, ValueError, AttributeError, TypeError):
        return ()
