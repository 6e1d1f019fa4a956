"""Similarity search from the map: the dialog turns its widgets into an embedding source (refusing
no layer / no model / a non-embed model), a click (reprojected from the canvas CRS) runs the
embed task once and caches it, every further click reuses it, a click outside the layer is
refused, and selected polygons work as a query. Real engine worker, real tasks.

With SARMAE_SCREENSHOTS=<folder> the dialog is saved there as similarity_dialog.png.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from bars import RecordingBar
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsSingleBandPseudoColorRenderer,
    QgsTask,
    QgsVectorLayer,
)
from qgis.gui import QgsMapMouseEvent
from qgis.PyQt.QtCore import QCoreApplication, QEvent, QPoint, Qt

from sarmae_qgis.errors import RequestError
from sarmae_qgis.gui.similarity_tool import SimilarityDialog, SimilarityMapTool
from sarmae_qgis.tasks.similarity_task import (
    GROUP_NAME,
    STATS,
    EmbeddingSource,
    SimilarityRequest,
    SimilarityTask,
)

pytestmark = pytest.mark.qgis

X0, Y1, CELL = 500000.0, 4500000.0, 320.0  # scene.tif: origin, 20 m pixels x 16 px per embedding cell
WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")
UTM = QgsCoordinateReferenceSystem("EPSG:32631")




def cell_centre(row: int, col: int) -> QgsPointXY:
    return QgsPointXY(X0 + (col + 0.5) * CELL, Y1 - (row + 0.5) * CELL)


def to_wgs84(p: QgsPointXY) -> QgsPointXY:
    return QgsCoordinateTransform(UTM, WGS84, QgsProject.instance().transformContext()).transform(p)


def wait(task: SimilarityTask, timeout: float = 240.0) -> None:
    """Let QGIS's task manager run the task (run() on a thread, finished() here)."""
    deadline = time.monotonic() + timeout
    while not task.is_done and time.monotonic() < deadline:
        QCoreApplication.processEvents()
        time.sleep(0.05)
    assert task.is_done, "the similarity task did not finish in time"
    assert task.status() == QgsTask.Complete, task.error


def values(layer: QgsRasterLayer) -> list[list[float]]:
    block = layer.dataProvider().block(1, layer.extent(), layer.width(), layer.height())
    return [[block.value(r, c) for c in range(layer.width())] for r in range(layer.height())]


def click(tool: SimilarityMapTool, point: QgsPointXY) -> None:
    """A left click released at ``point`` (canvas CRS), as the canvas delivers it."""
    event = QgsMapMouseEvent(tool.canvas(), QEvent.MouseButtonRelease, QPoint(0, 0), Qt.LeftButton)
    event.setMapPoint(point)
    tool.canvasReleaseEvent(event)


@pytest.fixture
def models(assets, tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("embed", "encoder", "segment", "reconstruct"):
        shutil.copytree(assets / f"{name}.pkg", folder / f"{name}.pkg")
    return folder


@pytest.fixture
def canvas(qgis_canvas):
    """The session canvas showing EPSG:4326: clicks must be reprojected to the raster's UTM."""
    old = qgis_canvas.mapSettings().destinationCrs()
    qgis_canvas.setDestinationCrs(WGS84)
    yield qgis_canvas
    if qgis_canvas.mapTool() is not None:
        qgis_canvas.unsetMapTool(qgis_canvas.mapTool())
    qgis_canvas.setDestinationCrs(old)


@pytest.fixture
def scene(project, assets) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    assert layer.isValid()
    project.addMapLayer(layer)
    return layer


@pytest.fixture
def bar() -> RecordingBar:
    return RecordingBar()


@pytest.fixture
def dialog(qgis_iface, canvas, models, scene, bar, tmp_path):
    d = SimilarityDialog(canvas, qgis_iface.mainWindow(), message_bar=bar, models_folder=models)
    d.output_widget.setFilePath(str(tmp_path / "out"))
    d.layer_combo.setLayer(scene)
    yield d
    d.close()
    d.deleteLater()


def dialog_messages(d: SimilarityDialog) -> str:
    return " ".join([item.text() for item in d.message_bar.items()] + [d.notice.plain])


def test_dialog_lists_embed_models_and_builds_a_source(dialog, scene, assets, models, tmp_path, project):
    labels = [dialog.model_combo.itemText(i) for i in range(dialog.model_combo.count())]
    assert labels == ["tiny-embed (embed)", "tiny-encoder (embed)"]  # segment/reconstruct are not listed
    assert "embed" in dialog.card_label.text() and "VV+VH" in dialog.card_label.text()
    labels_layer = QgsVectorLayer(str(assets / "labels.gpkg"), "labels", "ogr")
    project.addMapLayer(labels_layer)
    dialog.polygon_combo.setLayer(labels_layer)
    source = dialog.build_source()
    assert isinstance(source, EmbeddingSource)
    assert (source.layer_name, source.raster_path, source.model_name) == ("scene", str(assets / "scene.tif"), "tiny-embed")
    assert Path(source.model_path) == models / "embed.pkg" and source.output_folder == str(tmp_path / "out")
    assert source.bands is None
    assert source.cache_dir().parent == tmp_path / "out" / "similarity"
    folder = os.environ.get("SARMAE_SCREENSHOTS")
    if folder:
        dialog.resize(560, dialog.sizeHint().height())
        dialog.show()
        QCoreApplication.processEvents()
        Path(folder).mkdir(parents=True, exist_ok=True)
        assert dialog.grab().save(str(Path(folder) / "similarity_dialog.png"))


def test_dialog_refuses_invalid_choices(dialog, canvas, scene, assets, tmp_path):
    dialog.layer_combo.setLayer(None)
    assert dialog.pick_point() is None
    assert "raster layer" in dialog_messages(dialog) and not isinstance(canvas.mapTool(), SimilarityMapTool)
    dialog.layer_combo.setLayer(scene)
    dialog.add_model(assets / "segment.pkg")  # Browse… to a package of another task
    assert dialog.pick_point() is None
    text = dialog_messages(dialog)
    assert "segment model" in text and "embed" in text
    empty = SimilarityDialog(canvas, message_bar=RecordingBar(), models_folder=tmp_path / "no_models")
    try:
        empty.layer_combo.setLayer(scene)
        assert empty.model_combo.count() == 0 and "No embed" in empty.card_label.text()
        with pytest.raises(RequestError, match="embed model package"):
            empty.build_source()
        assert empty.use_selected_polygons() is None and "embed model package" in dialog_messages(empty)
    finally:
        empty.deleteLater()


def test_click_computes_the_embedding_once_then_reuses_it(dialog, canvas, scene, bar, project):
    tool = dialog.pick_point()
    assert isinstance(tool, SimilarityMapTool) and canvas.mapTool() is tool
    runs = STATS.embed_runs

    click(tool, to_wgs84(cell_centre(1, 2)))  # the canvas is in EPSG:4326, the raster in UTM 31N
    first = tool.tasks[-1]
    wait(first)
    assert first.embedded and STATS.embed_runs == runs + 1
    embedding = Path(first.embedding_path)
    assert embedding.is_file() and embedding.name == "embedding.tif"
    layer = first.layer
    group = project.layerTreeRoot().findGroup(GROUP_NAME)
    assert group is not None and project.layerTreeRoot().children()[0] is group
    assert [n.layer() for n in group.findLayers()] == [layer]
    assert 0.3 <= layer.opacity() <= 0.7  # translucent: the SAR image shows through (issue 16, item 5)
    assert layer.name() == "similarity @ 500800.0, 4499520.0"  # the clicked point in the raster's CRS
    # on the input's CRS and extent, one cell per 16 x 16 pixel patch
    assert layer.crs() == scene.crs() and layer.extent() == scene.extent()
    assert (layer.width(), layer.height()) == (scene.width() // 16, scene.height() // 16)
    grid = values(layer)
    flat = [v for row in grid for v in row]
    assert all(-1.0 - 1e-5 <= v <= 1.0 + 1e-5 for v in flat)
    assert grid[1][2] == pytest.approx(1.0, abs=1e-4) and grid[1][2] == max(flat)  # the clicked cell
    renderer = layer.renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer) and renderer.classificationMax() == 1.0
    assert renderer.classificationMin() <= min(flat)
    assert any(level == Qgis.Success and "embedding computed" in text for _t, text, level in bar.messages)

    stamp = embedding.stat().st_mtime_ns
    click(tool, to_wgs84(cell_centre(3, 0)))
    second = tool.tasks[-1]
    assert second is not first
    wait(second)
    assert not second.embedded and STATS.embed_runs == runs + 1  # the embed step did not run again
    assert embedding.stat().st_mtime_ns == stamp and second.embedding_path == str(embedding)
    assert [n.layer() for n in group.findLayers()] == [second.layer, layer]  # newest on top
    grid2 = values(second.layer)
    assert grid2[3][0] == pytest.approx(1.0, abs=1e-4) and grid2[3][0] == max(v for row in grid2 for v in row)
    assert any("cached embedding" in text for _t, text, _level in bar.messages)

    dialog.close()  # closing the dialog unsets its map tool
    assert canvas.mapTool() is not tool


def test_click_outside_the_layer_is_refused(dialog, canvas, bar):
    tool = dialog.pick_point()
    before = len(tool.tasks)
    click(tool, to_wgs84(QgsPointXY(X0 - 5000.0, Y1 + 5000.0)))
    assert len(tool.tasks) == before
    assert "click inside layer 'scene'" in tool.last_message
    assert "click inside layer 'scene'" in bar.texts(Qgis.Warning)
    assert tool.query_point(QgsPointXY(X0 + 10.0, Y1 - 10.0), UTM) is not None  # inside, given in the layer CRS
    wait(tool.tasks[-1])


def test_selected_polygon_query(dialog, assets, project, bar, scene):
    labels = QgsVectorLayer(str(assets / "labels.gpkg"), "labels", "ogr")
    assert labels.isValid()
    project.addMapLayer(labels)
    dialog.polygon_combo.setLayer(labels)
    assert dialog.use_selected_polygons() is None  # nothing selected
    assert "No feature of 'labels' is selected" in dialog_messages(dialog)

    ids = {f["class"]: f.id() for f in labels.getFeatures()}
    labels.selectByIds([ids["land"]])  # the land polygon lies east of scene.tif (it covers train.tif)
    assert dialog.use_selected_polygons() is None
    assert "outside layer 'scene'" in dialog_messages(dialog)

    labels.selectByIds([ids["water"]])
    task = dialog.use_selected_polygons()
    assert task is not None and isinstance(task.request.query, str) and task.request.query.startswith("Polygon")
    wait(task)
    assert task.result["query_cells"] > 1  # the mean embedding of the cells under the polygon
    assert task.layer.name().startswith("similarity to polygon @")
    group = project.layerTreeRoot().findGroup(GROUP_NAME)
    assert [n.layer() for n in group.findLayers()] == [task.layer]
    flat = [v for row in values(task.layer) for v in row]
    assert all(-1.0 - 1e-5 <= v <= 1.0 + 1e-5 for v in flat)

    # the same polygon straight through the tool (WKT in the raster's CRS) reuses the embedding
    again = dialog.tool.query_polygon(task.request.query)
    wait(again)
    assert not again.embedded and again.embedding_path == task.embedding_path


def test_cache_key_follows_the_raster_file(dialog, assets, tmp_path):
    copy = tmp_path / "scene_copy.tif"
    shutil.copy(assets / "scene.tif", copy)
    layer = QgsRasterLayer(str(copy), "copy", "gdal")
    source = SimilarityMapTool(dialog.canvas, layer, str(assets / "embed.pkg"), output_folder=tmp_path).source
    key = source.cache_key()
    assert key == source.cache_key()
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was rewritten
    assert source.cache_key() != key
    other = SimilarityMapTool(dialog.canvas, layer, str(assets / "encoder.pkg"), output_folder=tmp_path).source
    assert other.cache_key() != source.cache_key()
    with pytest.raises(RequestError, match="reconstruct model"):
        SimilarityMapTool(dialog.canvas, layer, str(assets / "reconstruct.pkg"))


def test_cancelled_search_adds_nothing(dialog, scene, bar, project):
    tool = dialog.make_tool()
    task = SimilarityTask(SimilarityRequest(tool.source, (X0 + 10.0, Y1 - 10.0), "cancelled"), message_bar=bar)
    task.cancel()
    assert not task.run()
    task.finished(False)
    assert task.layer is None and project.layerTreeRoot().findGroup(GROUP_NAME) is None
    assert bar.messages[-1][2] == Qgis.Info and "cancelled" in bar.messages[-1][1]
    assert not Path(task.embedding_path).exists()
