"""Renderers for SARMAE outputs: class colours from the model, a 0..1 ramp for confidence.

- class raster (uint8, 255 = nodata): paletted renderer, one entry per class with the model's
  colour and the class name as label (the legend then reads like the model card);
- confidence (0..1) and similarity (cosine, -1..1): single-band pseudocolour, Viridis, fixed range;
- class polygons: categorised on ``class_name`` with the class colours;
- detections: the same categories drawn as outlined boxes (no fill);
- classification grid: semi-transparent fills so the image stays visible.

Every function only builds renderers; call them on the main thread (``QgsTask.finished`` or a
Processing layer post-processor), never from a background thread on a layer in the project.
"""

from __future__ import annotations

from collections.abc import Sequence

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsColorRampShader,
    QgsFillSymbol,
    QgsGradientColorRamp,
    QgsPalettedRasterRenderer,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRendererCategory,
    QgsSingleBandPseudoColorRenderer,
    QgsStyle,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

CLASS_FIELD = "class_name"
Classes = Sequence[tuple[str, str]]  # (name, "#rrggbb") in class-index order


def as_pairs(classes) -> list[tuple[str, str]]:
    """Class lists from a result record ([{"name", "colour"}]) or a PackageCard ((name, colour))."""
    out = []
    for c in classes or []:
        if isinstance(c, dict):
            out.append((str(c.get("name")), str(c.get("colour") or "#808080")))
        else:
            out.append((str(c[0]), str(c[1])))
    return out


def style_class_raster(layer: QgsRasterLayer, classes: Classes) -> QgsPalettedRasterRenderer:
    """Paletted renderer: value i -> classes[i] colour, labelled with its name."""
    entries = [QgsPalettedRasterRenderer.Class(i, QColor(colour), name) for i, (name, colour) in enumerate(classes)]
    renderer = QgsPalettedRasterRenderer(layer.dataProvider(), 1, entries)
    layer.setRenderer(renderer)
    layer.triggerRepaint()
    return renderer


def _ramp():
    ramp = QgsStyle.defaultStyle().colorRamp("Viridis")
    if ramp is None:  # a profile without the default ramps
        ramp = QgsGradientColorRamp(QColor("#440154"), QColor("#fde725"))
    return ramp


def style_unit_interval(layer: QgsRasterLayer, steps: int = 5, minimum: float = 0.0,
                        maximum: float = 1.0) -> QgsSingleBandPseudoColorRenderer:
    """Single-band pseudocolour over [minimum, maximum] (confidence, similarity)."""
    ramp = _ramp()
    shader = QgsColorRampShader(minimum, maximum)
    shader.setColorRampType(QgsColorRampShader.Interpolated)
    shader.setSourceColorRamp(ramp.clone())
    items = []
    for k in range(steps):
        t = k / (steps - 1)
        value = minimum + t * (maximum - minimum)
        items.append(QgsColorRampShader.ColorRampItem(value, ramp.color(t), f"{value:.2f}"))
    shader.setColorRampItemList(items)
    raster_shader = QgsRasterShader()
    raster_shader.setRasterShaderFunction(shader)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, raster_shader)
    renderer.setClassificationMin(minimum)
    renderer.setClassificationMax(maximum)
    layer.setRenderer(renderer)
    layer.triggerRepaint()
    return renderer


def style_categories(layer: QgsVectorLayer, classes: Classes, kind: str = "fill",
                     field: str = CLASS_FIELD) -> QgsCategorizedSymbolRenderer:
    """Categorised renderer on ``field``: ``kind`` "fill" (polygons), "outline" (detection boxes)
    or "translucent" (classification grid)."""
    categories = []
    for name, colour in classes:
        c = QColor(colour)
        if kind == "outline":
            symbol = QgsFillSymbol.createSimple({"style": "no", "outline_color": c.name(), "outline_width": "0.6",
                                                 "outline_width_unit": "MM"})
        elif kind == "translucent":
            symbol = QgsFillSymbol.createSimple({"color": f"{c.red()},{c.green()},{c.blue()},110",
                                                 "outline_color": c.name(), "outline_width": "0.2"})
        else:
            symbol = QgsFillSymbol.createSimple({"color": c.name(), "outline_style": "no"})
        categories.append(QgsRendererCategory(name, symbol, name))
    renderer = QgsCategorizedSymbolRenderer(field, categories)
    layer.setRenderer(renderer)
    layer.triggerRepaint()
    return renderer


ROLE_PROPERTY = "sarmae/role"  # a layer's role in a SARMAE result (class, confidence, detections, ...)


def mark_output(layer, role: str) -> None:
    """A SARMAE output layer: its role (``ROLE_PROPERTY``) and the role's opacity (translucent class
    rasters, similarity, ...: ``resources/styles/layers.json``)."""
    from .toolbelt.resources import opacity_for

    layer.setCustomProperty(ROLE_PROPERTY, role)
    layer.setOpacity(opacity_for(role))  # a raster's is its renderer's: call after setting the renderer


def style_output(layer, role: str, classes: Classes) -> None:
    """Style a loaded output by its role in the result record (``outputs`` keys), with the role's
    opacity (the run task, the similarity search, Processing's loaded outputs and the demo), and mark the
    layer as a SARMAE output (``ROLE_PROPERTY``) so the forms do not offer it as a model input first."""
    if role == "class" and isinstance(layer, QgsRasterLayer):
        style_class_raster(layer, classes)
    elif role == "confidence" and isinstance(layer, QgsRasterLayer):
        style_unit_interval(layer)
    elif role == "similarity" and isinstance(layer, QgsRasterLayer):
        style_unit_interval(layer, minimum=-1.0)  # cosine similarity
    elif isinstance(layer, QgsVectorLayer) and classes:
        kind = {"vectors": "fill", "detections": "outline", "grid": "translucent"}.get(role)
        if kind is not None:
            style_categories(layer, classes, kind)
    mark_output(layer, role)  # after the renderer: a raster layer's opacity is its renderer's
