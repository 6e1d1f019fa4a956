"""Write the demo's QGIS project (.qgz) with styled layers, and render a PNG preview of it.

    python scripts/demo_project.py SPEC.json

Runs in its own process with QGIS's Python bindings only (no torch, no rasterio, no engine), the
way the plugin does, and styles results with the plugin's own code (``sarmae_qgis.styling``) so
the project looks exactly like a run from the Run model dialog. SPEC.json::

    {"project": ".../sarmae_demo.qgz", "png": ".../preview.png", "title": "...",
     "layers": [{"path": "...", "name": "...", "role": "input|labels|class|confidence|detections|
                 grid|vectors|embedding|pca|similarity|reconstruction", "classes": [[name, colour], ...],
                 "group": "...", "visible": true, "opacity": 1.0}, ...]}

Layers are listed top first. The preview shows the visible layers over the extent of the first
"input" layer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def style_input(layer, band: int = 1) -> None:
    """Grey stretch of one band (2-98 % cumulative cut), the usual look of a SAR backscatter image."""
    from qgis.core import (
        QgsContrastEnhancement,
        QgsRasterMinMaxOrigin,
        QgsSingleBandGrayRenderer,
    )

    renderer = QgsSingleBandGrayRenderer(layer.dataProvider(), band)
    ce = QgsContrastEnhancement(layer.dataProvider().dataType(band))
    ce.setContrastEnhancementAlgorithm(QgsContrastEnhancement.StretchToMinimumMaximum)
    stats = layer.dataProvider().cumulativeCut(band, 0.02, 0.98, layer.extent(), 250000)
    ce.setMinimumValue(stats[0])
    ce.setMaximumValue(stats[1])
    renderer.setContrastEnhancement(ce)
    origin = QgsRasterMinMaxOrigin()
    origin.setLimits(QgsRasterMinMaxOrigin.CumulativeCut)
    renderer.setMinMaxOrigin(origin)
    layer.setRenderer(renderer)


def style_labels(layer, classes) -> None:
    """Ground-truth polygons: coloured outlines only."""
    from qgis.core import QgsCategorizedSymbolRenderer, QgsFillSymbol, QgsRendererCategory

    cats = [QgsRendererCategory(name, QgsFillSymbol.createSimple(
        {"style": "no", "outline_color": colour, "outline_width": "0.4", "outline_style": "dash"}), f"{name} (label)")
        for name, colour in classes]
    layer.setRenderer(QgsCategorizedSymbolRenderer("class", cats))


def build(spec: dict) -> dict:
    from qgis.core import (
        QgsMapRendererParallelJob,
        QgsMapSettings,
        QgsProject,
        QgsRasterLayer,
        QgsReferencedRectangle,
        QgsVectorLayer,
    )
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    from sarmae_qgis.styling import style_output

    project = QgsProject.instance()
    project.clear()
    project.setTitle(spec.get("title") or "SARMAE demo")
    root = project.layerTreeRoot()
    groups: dict = {}
    loaded = []
    for item in spec["layers"]:
        path, role = item["path"], item["role"]
        name = item.get("name") or Path(path).stem
        is_vector = Path(path).suffix.lower() in (".gpkg", ".shp", ".geojson")
        layer = QgsVectorLayer(path, name, "ogr") if is_vector else QgsRasterLayer(path, name, "gdal")
        if not layer.isValid():
            raise SystemExit(f"QGIS cannot open {path} ({role})")
        classes = [tuple(c) for c in item.get("classes") or []]
        if role == "input":
            style_input(layer)
        elif role == "labels":
            style_labels(layer, classes)
        else:
            style_output(layer, role, classes)
        if "opacity" in item and is_vector:
            layer.setOpacity(float(item["opacity"]))
        elif "opacity" in item:
            layer.renderer().setOpacity(float(item["opacity"]))
        project.addMapLayer(layer, False)
        group_name = item.get("group") or ""
        parent = root
        if group_name:
            if group_name not in groups:
                groups[group_name] = root.addGroup(group_name)
            parent = groups[group_name]
        node = parent.addLayer(layer)
        node.setItemVisibilityChecked(bool(item.get("visible", True)))
        loaded.append((layer, role, bool(item.get("visible", True))))
    inputs = [layer for layer, role, _ in loaded if role == "input"]
    if inputs:
        project.setCrs(inputs[0].crs())
        # QGIS opens the project zoomed to the scene (a project without a view opens at 1:1, empty)
        project.viewSettings().setDefaultViewExtent(QgsReferencedRectangle(inputs[0].extent(), inputs[0].crs()))
    qgz = Path(spec["project"])
    tmp = qgz.with_name(f".{qgz.stem}.part.qgz")
    if not project.write(str(tmp)):
        raise SystemExit(f"could not write the project {qgz}: {project.error()}")
    os.replace(tmp, qgz)

    png = spec.get("png")
    if png:
        visible = [layer for layer, _role, on in loaded if on]
        settings = QgsMapSettings()
        settings.setLayers(visible)
        settings.setDestinationCrs(project.crs())
        settings.setBackgroundColor(QColor("white"))
        extent = inputs[0].extent() if inputs else visible[-1].extent()
        side = int(spec.get("png_size", 1000))
        ratio = extent.height() / max(extent.width(), 1e-9)
        settings.setOutputSize(QSize(side, max(1, int(side * ratio))))
        settings.setExtent(extent)
        job = QgsMapRendererParallelJob(settings)
        job.start()
        job.waitForFinished()
        image = job.renderedImage()
        if not image.save(str(png)):
            raise SystemExit(f"could not write the preview {png}")
    return {"project": str(qgz), "png": png, "layers": len(loaded)}


def main(argv: list[str]) -> int:
    from qgis.core import QgsApplication

    spec = json.loads(Path(argv[0]).read_text())
    app = QgsApplication([], False)
    app.initQgis()
    try:
        print(json.dumps(build(spec)))
    finally:
        from qgis.core import QgsProject

        QgsProject.instance().clear()
        app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
