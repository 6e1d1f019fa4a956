"""Label layers for fine-tuning: a GeoPackage polygon layer with a class field, ready to digitise.

:func:`create_label_layer` writes a new GeoPackage (temporary file renamed on success), loads it,
and configures it the way an analyst expects from a labelling layer:

- the class field (default ``class``) edits through a **value map** listing the classes, with the
  first class as the default value, so every new polygon gets a valid class from a drop-down;
- a **categorised renderer** with the class colours (semi-transparent fills, solid outlines) so the
  raster stays visible under the labels;
- the classes and colours are kept as a layer property (``sarmae/classes``) and the whole style is
  stored in the GeoPackage as its default style, so reopening the file gives the same form and
  colours.

:func:`label_classes` reads the classes back (property, value map, or the values found), which the
Fine-tune dialog uses to pass class order and colours on; :func:`snapshot_labels` copies a label
layer (unsaved edits included, the class field only) into a fine-tuning run's folder.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsDefaultValue,
    QgsEditorWidgetSetup,
    QgsExpression,
    QgsFeature,
    QgsFeatureRequest,
    QgsField,
    QgsFields,
    QgsFillSymbol,
    QgsProject,
    QgsRendererCategory,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor

from .errors import LayerError, RequestError

CLASSES_PROPERTY = "sarmae/classes"
DEFAULT_FIELD = "class"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
"""Colours for classes without one (the engine's palette, so labels and results agree)."""


def default_colour(index: int, name: str = "") -> str:
    """The colour of a class without one: the conventional colour of a well-known name (water blue,
    land brown, ...; ``resources/styles/classes.json``), else the palette's colour for its row."""
    from .toolbelt.resources import named_class_colours

    key = " ".join(str(name).lower().replace("_", " ").split())
    named = named_class_colours()
    colour = named.get(key) or (named.get(key.split()[0]) if key else None)
    return colour or PALETTE[index % len(PALETTE)]


def check_classes(classes: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Validated (name, "#rrggbb") pairs: at least one, names non-empty and unique (case-insensitive)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, (name, colour) in enumerate(classes):
        name = str(name).strip()
        if not name:
            raise LayerError(f"class {i + 1} has no name: give every class a name (e.g. water, land)")
        if name.lower() in seen:
            raise LayerError(f"class '{name}' is listed twice: class names must be unique")
        seen.add(name.lower())
        c = QColor(str(colour or ""))
        out.append((name, c.name() if c.isValid() else default_colour(i, name)))
    if not out:
        raise LayerError("give at least one class (fine-tuning needs two or more, e.g. water and land)")
    return out


def layer_name_for(path: str | Path) -> str:
    """GeoPackage table name from the file name ("My labels.gpkg" -> "my_labels")."""
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", Path(path).stem).strip("_").lower()
    return stem or "labels"


def create_label_layer(path: str | Path, crs: QgsCoordinateReferenceSystem, classes: Sequence[tuple[str, str]],
                       field: str = DEFAULT_FIELD, name: str | None = None, project: QgsProject | None = None,
                       overwrite: bool = False, start_editing: bool = True) -> QgsVectorLayer:
    """Write an empty polygon GeoPackage at ``path`` and add it to ``project`` configured for labelling.

    Raises :class:`LayerError` (what is wrong and what to do) for a bad path, CRS or class list;
    an existing file is refused unless ``overwrite``; the file appears only when complete.
    """
    classes = check_classes(classes)
    path = Path(path).expanduser()
    if path.suffix.lower() != ".gpkg":
        path = path.with_suffix(".gpkg")
    field = field.strip() or DEFAULT_FIELD
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field) or field.lower() == "fid":
        raise LayerError(f"'{field}' cannot be a field name: use letters, digits and _ (e.g. class)")
    if not crs.isValid():
        raise LayerError("choose a valid CRS for the label layer (normally the raster's own CRS)")
    if path.exists() and not overwrite:
        raise LayerError(f"{path} already exists: choose another file name (or confirm replacing it)")
    if not path.parent.is_dir():
        raise LayerError(f"folder {path.parent} does not exist: choose an existing folder for the label layer")
    if not os.access(path.parent, os.W_OK):
        raise LayerError(f"folder {path.parent} is not writable: choose another folder for the label layer")
    project = project or QgsProject.instance()
    if overwrite:  # a layer of the project reading the old file would keep it open
        for layer in list(project.mapLayers().values()):
            if Path(layer.source().split("|")[0]) == path:
                project.removeMapLayer(layer.id())
    table = layer_name_for(path)
    fields = QgsFields()
    fields.append(QgsField(field, QVariant.String, "text", 64))
    fields.append(QgsField("note", QVariant.String, "text", 254))
    fd, tmp = tempfile.mkstemp(suffix=".gpkg", prefix=f".{path.stem}.", dir=str(path.parent))
    os.close(fd)
    os.unlink(tmp)  # the writer creates the file itself
    try:
        opts = QgsVectorFileWriter.SaveVectorOptions()
        opts.driverName = "GPKG"
        opts.layerName = table
        opts.fileEncoding = "UTF-8"
        writer = QgsVectorFileWriter.create(tmp, fields, QgsWkbTypes.MultiPolygon, crs,
                                            project.transformContext(), opts)
        if writer.hasError() != QgsVectorFileWriter.NoError:
            raise LayerError(f"cannot write {path}: {writer.errorMessage()}")
        del writer  # closes the file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    layer = QgsVectorLayer(f"{path}|layername={table}", name or path.stem, "ogr")
    if not layer.isValid():
        raise LayerError(f"QGIS cannot open the new label layer {path}")
    configure_label_layer(layer, classes, field)
    layer.saveStyleToDatabase("sarmae labels", "SARMAE label layer: class value map and colours", True, "")
    project.addMapLayer(layer, False)
    project.layerTreeRoot().insertLayer(0, layer)  # on top: the analyst sees what they draw
    if start_editing:
        layer.startEditing()
    return layer


def configure_label_layer(layer: QgsVectorLayer, classes: Sequence[tuple[str, str]], field: str = DEFAULT_FIELD) -> None:
    """Value-map editor (with a default class), categorised colours and the classes property."""
    classes = check_classes(classes)
    index = layer.fields().indexOf(field)
    if index < 0:
        raise LayerError(f"layer '{layer.name()}' has no field '{field}'")
    # the alias first: in QGIS 3.22 setFieldAlias resets the field's editor widget setup
    layer.setFieldAlias(index, "Class")
    layer.setDefaultValueDefinition(index, QgsDefaultValue("'{}'".format(classes[0][0].replace("'", "''"))))
    layer.setEditorWidgetSetup(index, QgsEditorWidgetSetup("ValueMap", {"map": [{n: n} for n, _ in classes]}))
    categories = []
    for n, colour in classes:
        c = QColor(colour)
        symbol = QgsFillSymbol.createSimple({"color": f"{c.red()},{c.green()},{c.blue()},90", "outline_color": c.name(),
                                             "outline_width": "0.5", "outline_width_unit": "MM"})
        categories.append(QgsRendererCategory(n, symbol, n))
    layer.setRenderer(QgsCategorizedSymbolRenderer(field, categories))
    layer.setCustomProperty(CLASSES_PROPERTY, json.dumps({"field": field, "classes": [list(c) for c in classes]}))
    layer.triggerRepaint()


def label_classes(layer: QgsVectorLayer, field: str) -> list[tuple[str, str]]:
    """The classes of a label layer in order, with colours: from the SARMAE property when it
    describes ``field``, else the field's value map, else the distinct values found (sorted)."""
    raw = layer.customProperty(CLASSES_PROPERTY)
    if raw:
        try:
            d = json.loads(raw)
            if d.get("field") == field:
                return [(str(n), str(c)) for n, c in d["classes"]]
        except (ValueError, KeyError, TypeError):
            pass
    index = layer.fields().indexOf(field)
    if index < 0:
        return []
    setup = layer.editorWidgetSetup(index)
    names: list[str] = []
    if setup.type() == "ValueMap":
        value_map = setup.config().get("map")
        items = value_map if isinstance(value_map, list) else [value_map or {}]
        for item in items:
            names += [str(v) for v in item.values()]
    if not names:
        names = sorted({str(v) for v in layer.uniqueValues(index) if v not in (None, "") and str(v) != "NULL"})
    return [(n, default_colour(i, n)) for i, n in enumerate(names)]


def count_labels(layer: QgsVectorLayer, field: str) -> dict[str, int]:
    """Polygons per class value (NULL / empty values counted under "")."""
    counts: dict[str, int] = {}
    index = layer.fields().indexOf(field)
    if index < 0:
        return counts
    for feature in layer.getFeatures():
        v = feature.attribute(index)
        key = "" if v is None or str(v) in ("", "NULL") else str(v)
        counts[key] = counts.get(key, 0) + 1
    return counts


def snapshot_labels(layer: QgsVectorLayer, field: str, path: str | Path, project: QgsProject | None = None) -> int:
    """Write the layer's polygons with a non-empty ``field`` (edit buffer included, the class field
    only, the layer's CRS) to a new GeoPackage at ``path``; returns the number written."""
    project = project or QgsProject.instance()
    index = layer.fields().indexOf(field)
    if index < 0:
        raise RequestError(f"Layer '{layer.name()}' has no field '{field}'.")
    fields = QgsFields()
    fields.append(QgsField(field, QVariant.String, "text", 254))
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    opts.layerName = "labels"
    opts.fileEncoding = "UTF-8"
    tmp = f"{path}.part.gpkg"
    if os.path.exists(tmp):
        os.unlink(tmp)
    writer = QgsVectorFileWriter.create(tmp, fields, QgsWkbTypes.multiType(layer.wkbType()), layer.crs(),
                                        project.transformContext(), opts)
    if writer.hasError() != QgsVectorFileWriter.NoError:
        message = writer.errorMessage()
        del writer
        raise RequestError(f"Cannot copy the labels of '{layer.name()}' to {path}: {message}")
    quoted = field.replace('"', '""')
    request = QgsFeatureRequest(QgsExpression(f'"{quoted}" IS NOT NULL AND trim(to_string("{quoted}")) <> \'\''))
    n = 0
    for feature in layer.getFeatures(request):
        if not feature.hasGeometry():
            continue
        out = QgsFeature(fields)
        geometry = feature.geometry()
        geometry.convertToMultiType()
        out.setGeometry(geometry)
        out.setAttributes([str(feature.attribute(index)).strip()])
        writer.addFeature(out)
        n += 1
    del writer  # closes the file
    os.replace(tmp, path)
    return n
