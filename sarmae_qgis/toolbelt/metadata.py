"""Read the plugin's ``metadata.txt`` (name, version, links) with :mod:`configparser`.

The file lives in one of two places:

* inside an installed plugin (the zip made by ``scripts/build_plugin.py``):
  ``<plugins>/sarmae_qgis/metadata.txt``, next to this package's ``__init__.py``;
* in a development checkout: at the repository root, one level above ``sarmae_qgis/``.
"""

from __future__ import annotations

import configparser
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
"""The ``sarmae_qgis`` package folder (also the installed plugin's folder)."""


class MetadataNotFoundError(FileNotFoundError):
    """``metadata.txt`` is neither in the plugin folder nor at the repository root."""


def metadata_candidates(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Places where ``metadata.txt`` may be, in the order they are tried."""
    return [package_dir / "metadata.txt", package_dir.parent / "metadata.txt"]


def find_metadata_file(package_dir: Path = PACKAGE_DIR) -> Path:
    """Return the path of ``metadata.txt`` for the plugin in ``package_dir``.

    Raises:
        MetadataNotFoundError: when no candidate exists (lists the places tried).
    """
    candidates = metadata_candidates(package_dir)
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise MetadataNotFoundError(
        f"SARMAE plugin metadata.txt not found (tried {tried}); "
        "reinstall the plugin zip or run from a full repository checkout."
    )


def read_metadata(path: Path) -> dict[str, str]:
    """Parse the ``[general]`` section of a QGIS ``metadata.txt`` into a dict.

    Interpolation is off: descriptions may contain ``%`` signs.
    """
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep qgisMinimumVersion's case
    parser.read(path, encoding="utf-8")
    if not parser.has_section("general"):
        raise ValueError(f"{path} has no [general] section; it is not a QGIS plugin metadata file")
    return dict(parser.items("general"))


@lru_cache(maxsize=1)
def plugin_metadata() -> dict[str, str]:
    """The metadata of this plugin (read once and cached)."""
    return read_metadata(find_metadata_file())


def plugin_version() -> str:
    """The plugin's version string, e.g. ``"0.1.0"``."""
    return plugin_metadata().get("version", "unknown")
