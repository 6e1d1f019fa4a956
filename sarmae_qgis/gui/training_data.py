"""The Fine-tune form's training data: the list of raster layers to tick, the label layer's polygons
per class, and where the labels lie. Split from ``finetune_dialog.py`` (which keeps the form and
its request); Qt widgets and QGIS geometry only, no engine.

- :class:`RasterList`: one checkable item per raster layer of the project, refreshed when layers
  are added or removed (ticks kept).
- :class:`LabelWatch`: calls back when the chosen label layer's polygons or classes change (a
  polygon drawn, deleted, its class edited, edits saved or rolled back), so the counts shown under
  the class field are never stale.
- :func:`check_labels`, :func:`check_encoder`: what training would refuse, said before it starts.
- :func:`label_bounds`, :func:`covers`, :func:`class_counts`, :func:`classes_html`,
  :func:`default_class_field`, :func:`auto_model_name`, :func:`unique_model_name`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from qgis.core import (
    QgsCoordinateTransform,
    QgsCsException,
    QgsFeatureRequest,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject, Qt, QVariant
from qgis.PyQt.QtWidgets import QAbstractItemView, QListWidget, QListWidgetItem, QWidget

from ..errors import RequestError, SarmaePluginError
from ..labelling import CLASSES_PROPERTY, count_labels, label_classes
from ..model_cards import PackageCard, check_channels
from ..tasks.run_task import slug
from ..toolbelt.layers import band_names, is_input_raster

KEY_NAMES = {"fid", "ogc_fid", "id", "gid", "objectid", "pk", "rowid"}  # never a class field by default
CLASS_FIELD_NAMES = ("class", "klasse", "label", "type", "name")  # in this order of preference
FEW_LABELS = 3  # fewer polygons of a class than this gets a warning
EDIT_SIGNALS = ("featureAdded", "featuresDeleted", "attributeValueChanged", "geometryChanged",
                "afterCommitChanges", "afterRollBack", "dataChanged")


def label_bounds(layer: QgsVectorLayer) -> QgsRectangle:
    """The bounding box of the layer's polygons (edit buffer included), in the layer's CRS."""
    bounds = QgsRectangle()
    bounds.setMinimal()
    for feature in layer.getFeatures(QgsFeatureRequest().setNoAttributes()):
        if feature.hasGeometry():
            bounds.combineExtentWith(feature.geometry().boundingBox())
    return bounds


def covers(labels: QgsVectorLayer, raster: QgsRasterLayer, project: QgsProject,
           bounds: QgsRectangle | None = None) -> bool:
    """Whether the labels' bounding box overlaps the raster (after reprojection)."""
    bounds = bounds if bounds is not None else label_bounds(labels)
    if bounds.isEmpty():
        return False
    try:
        extent = QgsCoordinateTransform(labels.crs(), raster.crs(), project).transformBoundingBox(bounds)
    except QgsCsException:
        return False
    return extent.intersects(raster.extent())



def rasters_under(project: QgsProject, labels: QgsVectorLayer, in_chans: int | None) -> list[QgsRasterLayer]:
    """The project's rasters that the label layer's extent overlaps (with ``in_chans`` bands when
    given: the encoder's), to tick by default."""
    bounds = label_bounds(labels)
    if bounds.isEmpty():
        return []
    return [layer for layer in project.mapLayers().values() if isinstance(layer, QgsRasterLayer)
            and (in_chans is None or layer.bandCount() == in_chans) and covers(labels, layer, project, bounds)]

def class_counts(layer, field: str) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(classes with colours: the layer's own, then other values found), polygons per class."""
    if not isinstance(layer, QgsVectorLayer) or not field:
        return [], {}
    counts = count_labels(layer, field)
    classes = label_classes(layer, field)
    known = {n for n, _ in classes}
    extra = sorted(k for k in counts if k and k not in known)
    classes += [(n, "#808080") for n in extra]
    return classes, counts


def classes_html(classes: list[tuple[str, str]], counts: dict[str, int]) -> str:
    """ "Polygons per class: ■ water (3), ■ land (1)", the classes with few polygons in red."""
    if not classes:
        return ""
    parts = []
    for name, colour in classes:
        n = counts.get(name, 0)
        style = " style='color:#b00'" if n < FEW_LABELS else ""
        parts.append(f"<span style='color:{colour}'>&#9632;</span>&nbsp;<span{style}>{name} ({n})</span>")
    unlabelled = counts.get("", 0)
    text = "Polygons per class: " + ", ".join(parts)
    if unlabelled:
        text += f"; {unlabelled} without a class (skipped)"
    return text


def check_labels(layer: QgsVectorLayer, field: str, rasters: list[QgsRasterLayer], task: str, background: str,
                 project: QgsProject) -> list[tuple[str, str]]:
    """The classes (name, colour) to train, after the checks on the labels that training would
    refuse: no labelled polygon, polygons off the ticked rasters, a single class (segmentation:
    unless a background class is named). :class:`RequestError` says what to fix."""
    classes, counts = class_counts(layer, field)
    used = [(n, c) for n, c in classes if counts.get(n, 0) > 0]
    if not used:
        raise RequestError(f"Layer '{layer.name()}' has no polygon with a class in '{field}': draw polygons and "
                           "give each a class first.")
    bounds = label_bounds(layer)
    outside = [r.name() for r in rasters if not covers(layer, r, project, bounds)]
    if len(outside) == len(rasters):
        raise RequestError(f"The polygons of '{layer.name()}' do not overlap the ticked raster(s) "
                           f"({', '.join(outside)}): tick the raster(s) you drew them on, or check the label "
                           "layer's CRS.")
    if outside:
        raise RequestError(f"No polygon of '{layer.name()}' lies on {', '.join(outside)}: untick it, or label "
                           "examples on it too.")
    if len({n for n, _ in used} | ({background} if background else set())) < 2:
        raise RequestError(f"Only one class ('{used[0][0]}') is labelled in '{layer.name()}': label at least "
                           "two classes" + (", or choose a background class for unlabelled pixels"
                                            if task == "segment" else "") + ".")
    if task == "segment" and background:
        class_list = [(n, c) for n, c in classes if counts.get(n, 0) > 0 or n == background]
    else:
        class_list = used
    return class_list



def check_encoder(path: str, card: PackageCard | None, rasters: list[QgsRasterLayer]) -> None:
    """:class:`RequestError` when the encoder package does not read, or a raster cannot feed its channels."""
    if card is None:
        raise RequestError(f"The encoder {path} is not a readable model package: choose another one.")
    for r in rasters:
        try:
            check_channels(card, band_names(r), None, r.name(), can_choose_bands=False)
        except SarmaePluginError as e:
            raise RequestError(f"{e} (fine-tuning feeds every band of each raster, in file order)") from e


def default_class_field(layer) -> str:
    """The field a label layer's classes are in, by default: the one SARMAE's label layer names,
    else a text field named like class / label / type / name, else the first field that is not a
    key. Never ``fid`` or another primary key: a reopened GeoPackage had ``fid`` picked while the
    counts shown were those of ``class``."""
    if not isinstance(layer, QgsVectorLayer):
        return ""
    fields = layer.fields()
    keys = set(layer.primaryKeyAttributes())
    usable = [f for i, f in enumerate(fields) if i not in keys and f.name().lower() not in KEY_NAMES]
    try:
        named = json.loads(layer.customProperty(CLASSES_PROPERTY) or "{}").get("field")
    except (ValueError, AttributeError):
        named = None
    if named and any(f.name() == named for f in usable):
        return named
    text = [f.name() for f in usable if f.type() == QVariant.String]
    for pattern in CLASS_FIELD_NAMES:
        for name in text:
            if pattern in name.lower():
                return name
    return usable[0].name() if usable else ""


def auto_model_name(task: str, label_name: str, limit: int = 40) -> str:
    """``<task>_<label layer>``, short and without repeats: QGIS names a GeoPackage's table
    "<file> — <table>", which gave ``segment_Spain_7370579_S1Hand_labels_spain_7370579_s1hand_lab``
    (the raster's name twice); a part already contained in another (case aside) is dropped, and a
    name over ``limit`` characters is cut at a word boundary."""
    parts: list[str] = []
    for part in re.split(r"\s+[\u2014\u2013-]\s+", label_name):
        token = slug(part)
        low = [p.lower() for p in parts]
        if not part.strip() or any(token.lower() in p for p in low):
            continue
        parts = [p for p in parts if p.lower() not in token.lower()] + [token]
    name = slug(f"{task}_{'_'.join(parts)}")
    if len(name) > limit:
        cut = name[:limit].rsplit("_", 1)[0]
        name = cut if len(cut) >= limit // 2 else name[:limit]
    return name.strip("._-") or task


def unique_model_name(base: str, models_folder: Path) -> str:
    """``slug(base)``, or ``slug(base)_2``, ``_3``... : the first that is not installed yet."""
    name, k = slug(base), 2
    while (models_folder / name).exists():
        name, k = f"{slug(base)}_{k}", k + 1
    return name

class RasterList(QListWidget):
    """Checkable raster layers of ``project`` (not SARMAE's outputs: the class map or confidence of a
    run), listed again when layers are added or removed; :meth:`refresh` keeps the ticks of layers
    still there (a single raster is ticked)."""

    def __init__(self, project: QgsProject, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project = project
        self.setSelectionMode(QAbstractItemView.NoSelection)
        self.setMinimumHeight(48)
        self.setMaximumHeight(80)
        project.layersAdded.connect(self._on_project_changed)
        project.layersRemoved.connect(self._on_project_changed)

    def _on_project_changed(self, *_args) -> None:
        if not sip.isdeleted(self):
            self.refresh()

    def refresh(self) -> None:
        ticked = {layer.id() for layer in self.checked()}
        self.clear()
        for layer in self.project.mapLayers().values():
            if isinstance(layer, QgsRasterLayer) and (is_input_raster(layer) or layer.id() in ticked):
                item = QListWidgetItem(layer.name(), self)
                item.setData(Qt.UserRole, layer.id())
                item.setToolTip(layer.source())
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked if layer.id() in ticked else Qt.Unchecked)
        if self.count() == 1:
            self.item(0).setCheckState(Qt.Checked)

    def set_checked(self, layers) -> None:
        ids = {layer.id() for layer in layers}
        for i in range(self.count()):
            item = self.item(i)
            item.setCheckState(Qt.Checked if item.data(Qt.UserRole) in ids else Qt.Unchecked)

    def checked(self) -> list[QgsRasterLayer]:
        out = []
        for i in range(self.count()):
            item = self.item(i)
            layer = self.project.mapLayer(item.data(Qt.UserRole))
            if item.checkState() == Qt.Checked and isinstance(layer, QgsRasterLayer):
                out.append(layer)
        return out


class LabelWatch(QObject):
    """Follows one vector layer's edits: ``on_change()`` after each (see :data:`EDIT_SIGNALS`)."""

    def __init__(self, on_change: Callable[[], None], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.on_change = on_change
        self.layer: QgsVectorLayer | None = None

    def watch(self, layer) -> None:
        self.unwatch()
        if isinstance(layer, QgsVectorLayer):
            self.layer = layer
            for name in EDIT_SIGNALS:
                getattr(layer, name).connect(self._changed)

    def unwatch(self) -> None:
        if self.layer is not None and not sip.isdeleted(self.layer):
            for name in EDIT_SIGNALS:
                try:
                    getattr(self.layer, name).disconnect(self._changed)
                except (TypeError, RuntimeError):
                    pass
        self.layer = None

    def _changed(self, *_args) -> None:
        self.on_change()
