"""From an engine result record to styled layers in a layer-tree group, and a one-line summary.

The result record (DESIGN.md, worker protocol): ``{"task", "outputs": {role: path}, "classes":
[{"name", "colour"}], "statistics", "timings", ...}``. Roles: segment -> class, confidence,
[probabilities], [vectors]; detect -> detections; classify -> grid; embed -> embedding, pca;
reconstruct -> reconstruction; similarity -> similarity. Call :func:`add_result_layers` on the main
thread only.

Placement: the group goes right above the input layer (so label layers kept on top stay there),
named after the run plus the time (:func:`unique_group_name`: never two groups of one name); its
layers carry short names ("classes", "confidence") and the details (model, input, options,
statistics) in their metadata (Layer Properties > Metadata: title and abstract). Opacities come
from ``resources/styles/layers.json``: class rasters and similarity are translucent.
"""

from __future__ import annotations

import time
from pathlib import Path

from qgis.core import (
    QgsLayerMetadata,
    QgsLayerTreeGroup,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)

from .styling import as_pairs, style_output
from .toolbelt.resources import opacity_for

VECTOR_ROLES = ("vectors", "detections", "grid")
# role -> (layer name suffix, visible); order = order in the group, top first
ROLE_ORDER = {"detections": ("detections", True), "grid": ("classes", True), "vectors": ("polygons", False),
              "class": ("classes", True), "confidence": ("confidence", False),
              "probabilities": ("probabilities", False), "pca": ("PCA", True), "embedding": ("embedding", False),
              "reconstruction": ("reconstruction", True), "similarity": ("similarity", True)}
AREA_UNITS = {"m2": "m²", "px": "px", "crs_units2": "map units²"}


def load_output(path: str, role: str, name: str):
    """The layer for one output file (not added to a project); None when it cannot be read."""
    if role in VECTOR_ROLES or Path(path).suffix.lower() == ".gpkg":
        layer = QgsVectorLayer(path, name, "ogr")
    else:
        layer = QgsRasterLayer(path, name, "gdal")
    return layer if layer.isValid() else None


def unique_group_name(name: str, project: QgsProject | None = None, when: float | None = None) -> str:
    """``"<name> HH:MM"``, with " (2)", " (3)"... when the project already has a group of that name."""
    project = project or QgsProject.instance()
    base = f"{name} {time.strftime('%H:%M', time.localtime(when))}"
    root = project.layerTreeRoot()
    out, k = base, 2
    while root.findGroup(out) is not None:
        out, k = f"{base} ({k})", k + 1
    return out


def set_details(layer, title: str, details: str) -> None:
    """The layer's metadata title and abstract (Layer Properties > Metadata, and the legend tip)."""
    meta = QgsLayerMetadata(layer.metadata())
    meta.setTitle(title)
    meta.setAbstract(details)
    layer.setMetadata(meta)
    layer.setTitle(title)
    layer.setAbstract(details)


def insert_group(project: QgsProject, name: str, above_layer_id: str | None = None) -> QgsLayerTreeGroup:
    """A new group right above the layer ``above_layer_id`` (in that layer's parent group), or at the
    top of the layer tree when it is not in the project."""
    root = project.layerTreeRoot()
    node = root.findLayer(above_layer_id) if above_layer_id else None
    if node is None or node.parent() is None:
        return root.insertGroup(0, name)
    parent = node.parent()
    return parent.insertGroup(parent.children().index(node), name)


def details_text(result: dict, details: str = "") -> str:
    """What a result layer's abstract says: the caller's details, then the result's summary."""
    lines = [details] if details else []
    summary = summarise(result)
    if summary:
        lines.append(f"Result: {summary}")
    return "\n".join(lines)


def add_result_layers(result: dict, group_name: str, project: QgsProject | None = None,
                      above_layer_id: str | None = None, details: str = "") -> tuple[QgsLayerTreeGroup, list]:
    """Add the outputs of ``result`` under a new group ``group_name`` (right above the layer
    ``above_layer_id``, else at the top), styled with the model's classes and translucent where
    the image must show through; returns the group and the layers (top first). Unreadable outputs
    are skipped. ``details`` (model, input, options) goes into each layer's metadata abstract."""
    project = project or QgsProject.instance()
    classes = as_pairs(result.get("classes"))
    outputs = result.get("outputs") or {}
    group = insert_group(project, group_name, above_layer_id)
    abstract = details_text(result, details)
    layers = []
    roles = sorted(outputs, key=lambda r: list(ROLE_ORDER).index(r) if r in ROLE_ORDER else len(ROLE_ORDER))
    for role in roles:
        suffix, visible = ROLE_ORDER.get(role, (role, False))
        layer = load_output(outputs[role], role, suffix)
        if layer is None:
            continue
        style_output(layer, role, classes)
        layer.setOpacity(opacity_for(role))
        set_details(layer, f"{group_name}: {suffix}", f"{abstract}\nFile: {outputs[role]}".strip())
        project.addMapLayer(layer, False)
        node = group.addLayer(layer)
        node.setItemVisibilityChecked(visible)
        if not visible:
            node.setExpanded(False)
        layers.append(layer)
    return group, layers


def _area(value: float, unit: str) -> str:
    if unit == "m2":
        return f"{value / 1e6:.3g} km²" if value >= 1e6 else (f"{value / 1e4:.3g} ha" if value >= 1e4 else f"{value:.0f} m²")
    return f"{value:.4g} {AREA_UNITS.get(unit, unit)}"


def summarise(result: dict) -> str:
    """One line for the message bar: what was found (areas or counts per class) and the time."""
    task = result.get("task", "")
    stats = result.get("statistics") or {}
    per_class = stats.get("per_class") or {}
    parts = []
    if task in ("segment", "zeroshot"):
        unit = stats.get("area_unit", "px")
        parts = [f"{name} {_area(float(s.get('area', 0.0)), unit)} ({100 * float(s.get('fraction', 0.0)):.1f} %)"
                 for name, s in per_class.items()]
    elif task == "detect":
        parts = [f"{stats.get('detections', 0)} detection(s)"] + [f"{n} {k}" for k, n in per_class.items() if n]
    elif task == "classify":
        parts = [f"{stats.get('windows', 0)} window(s)"] + [f"{k} {n}" for k, n in per_class.items() if n]
    elif task == "embed" and stats.get("grid"):
        parts = [f"{stats.get('dim')}-d features on a {stats['grid'][0]} x {stats['grid'][1]} grid"]
    elif task == "textquery":
        parts = [f"'{q}' best cosine {float(v.get('max', 0.0)):.2f}" for q, v in (stats.get("per_query") or {}).items()]
    elif "query_cells" in result:
        parts = [f"similarity to {result['query_cells']} embedding cell(s)"]
    seconds = (result.get("timings") or {}).get("total_s")
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return ", ".join(parts)
