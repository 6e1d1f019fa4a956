"""QGIS layers -> what the engine reads: a file path GDAL can open, and band names.

The engine is a separate process reading files with its own GDAL: it can only use layers backed
by a plain file on disk (GeoTIFF, JP2, SAFE measurement files, VRT, ...). Layers from a
database, a web service, memory or GDAL's virtual file systems must be saved to a file first.
"""

from __future__ import annotations

import math
import os

from qgis.core import (
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject

from ..errors import LayerError


def is_input_raster(layer) -> bool:
    """A raster layer that is not a SARMAE output (``styling.ROLE_PROPERTY``: a class map, a
    confidence raster...): the SAR image a form should offer."""
    from ..styling import ROLE_PROPERTY

    return isinstance(layer, QgsRasterLayer) and layer.customProperty(ROLE_PROPERTY) in (None, "", "input")


def input_raster(active=None, project: QgsProject | None = None) -> QgsRasterLayer | None:
    """The raster a form should offer first: ``active`` when it is a raster layer, else the first
    raster of the layer tree (top down) that ``is_input_raster``: the SAR image, not the
    confidence raster of an earlier run."""
    if isinstance(active, QgsRasterLayer):
        return active
    root = (project or QgsProject.instance()).layerTreeRoot()
    rasters = [n.layer() for n in root.findLayers() if isinstance(n.layer(), QgsRasterLayer)]
    inputs = [lyr for lyr in rasters if is_input_raster(lyr)]
    return (inputs or rasters or [None])[0]


class _NewPolygons(QObject):
    """``follow_new_polygons``' slot: a child of the combo, so that the connection to the project
    goes with the combo (a bound method of a QObject is disconnected when it is destroyed)."""

    def __init__(self, combo, project: QgsProject):
        super().__init__(combo)
        self.combo = combo
        project.layersAdded.connect(self.added)

    def added(self, layers) -> None:
        from ..labelling import CLASSES_PROPERTY

        if sip.isdeleted(self) or sip.isdeleted(self.combo):
            return
        polygons = [lyr for lyr in layers if isinstance(lyr, QgsVectorLayer) and lyr.isSpatial()
                    and lyr.geometryType() == QgsWkbTypes.PolygonGeometry]
        labels = [lyr for lyr in polygons if lyr.customProperty(CLASSES_PROPERTY)]
        if labels or (polygons and self.combo.currentLayer() is None):
            self.combo.setLayer((labels or polygons)[-1])


def follow_new_polygons(combo, project: QgsProject) -> None:
    """``combo`` (a polygon layer list of a form) takes a polygon layer added to ``project``: the
    last one added, while none is chosen; a SARMAE label layer (New label layer…, with
    ``labelling.CLASSES_PROPERTY``) even over a choice, since the analyst made it to use it. The
    one rule of every form for a new polygon layer; wired for the combo's lifetime."""
    _NewPolygons(combo, project)


def raster_file(layer: QgsRasterLayer | None) -> str:
    """The file behind a raster layer; :class:`LayerError` (with what to do) when there is none."""
    if layer is None:
        raise LayerError("no raster layer chosen: add a SAR raster to the project and choose it")
    if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
        raise LayerError(f"layer '{layer.name()}' is not a valid raster layer")
    name = layer.name()
    if layer.providerType() != "gdal":
        raise LayerError(f"layer '{name}' comes from the '{layer.providerType()}' data provider, not a file: "
                         "SARMAE reads rasters from files. Save it as a GeoTIFF first (right-click > Export > "
                         "Save As...) and run on that layer")
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    path = parts.get("path") or layer.source()
    if parts.get("layerName"):
        raise LayerError(f"layer '{name}' is the sub-dataset '{parts['layerName']}' of {path}: SARMAE reads "
                         "whole files. Save the layer as a GeoTIFF first (right-click > Export > Save As...)")
    if path.startswith("/vsi") or not os.path.isfile(path):
        raise LayerError(f"layer '{name}' is not a file on disk ({path}): SARMAE's engine runs in its own process "
                         "and reads files only. Save it as a GeoTIFF first (right-click > Export > Save As...)")
    return path


def band_names(layer: QgsRasterLayer) -> list[str]:
    """One name per band: the band's description (e.g. "VV") when it has one, else "band <n>".

    GDAL layers name their bands "Band 1: VV" (with a description) or "Band 1" (without).
    """
    names = []
    for b in range(1, layer.bandCount() + 1):
        label = layer.bandName(b) or ""
        head, sep, tail = label.partition(":")
        names.append(tail.strip() if sep and tail.strip() else f"band {b}")
    return names


def pixel_window(layer: QgsRasterLayer, rect: QgsRectangle) -> tuple[int, int, int, int]:
    """(row_off, col_off, height, width) of the pixels of ``layer`` that ``rect`` (in the layer's
    CRS) touches, clipped to the raster; :class:`LayerError` when they do not overlap."""
    ext, w, h = layer.extent(), layer.width(), layer.height()
    if w <= 0 or h <= 0 or ext.isEmpty():
        raise LayerError(f"layer '{layer.name()}' has no pixel grid to take an extent of")
    px, py = ext.width() / w, ext.height() / h
    c0 = max(0, math.floor((rect.xMinimum() - ext.xMinimum()) / px))
    c1 = min(w, math.ceil((rect.xMaximum() - ext.xMinimum()) / px))
    r0 = max(0, math.floor((ext.yMaximum() - rect.yMaximum()) / py))
    r1 = min(h, math.ceil((ext.yMaximum() - rect.yMinimum()) / py))
    if c1 <= c0 or r1 <= r0:
        raise LayerError(f"the chosen extent does not overlap layer '{layer.name()}': zoom to the layer or choose "
                         "polygons over it")
    return r0, c0, r1 - r0, c1 - c0
