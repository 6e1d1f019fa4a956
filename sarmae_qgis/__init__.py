"""SARMAE QGIS plugin: SAR foundation model tools for QGIS.

This package only uses QGIS and Qt. The model runs in a separate engine process; never import
torch, onnxruntime, rasterio, ``engine`` or ``training`` here (tests/test_import_boundary.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qgis.gui import QgisInterface

    from .plugin import SarmaePlugin


def classFactory(iface: QgisInterface) -> SarmaePlugin:  # noqa: N802  # name required by QGIS
    """Entry point called by QGIS: build the plugin (imports are deferred until now)."""
    from .plugin import SarmaePlugin

    return SarmaePlugin(iface)
