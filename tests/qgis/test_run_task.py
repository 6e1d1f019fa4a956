"""RunTask: the engine run in run(), styled layers under a group named after the run in
finished(): class colours from the model (paletted renderer), a 0..1 confidence ramp, categorised
polygons and outlined detection boxes, all on the input's grid; a summary in the message bar."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from bars import RecordingBar
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsPalettedRasterRenderer,
    QgsRasterLayer,
    QgsSingleBandPseudoColorRenderer,
    QgsTask,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QCoreApplication
from qgis.PyQt.QtGui import QColor

from sarmae_qgis.labelling import create_label_layer
from sarmae_qgis.results import summarise
from sarmae_qgis.tasks.run_task import RunRequest, RunTask

pytestmark = pytest.mark.qgis




def request_for(assets: Path, tmp_path: Path, task: str, **kw) -> RunRequest:
    return RunRequest(run_name=f"test {task}", layer_name="scene", raster_path=str(assets / "scene.tif"),
                      model_path=str(assets / f"{task}.pkg"), model_name=f"tiny-{task}", task=task,
                      output_dir=str(tmp_path / f"run_{task}"), **kw)


def run_now(task: RunTask) -> bool:
    """run() then finished() on this thread: what the task manager does, minus the thread."""
    ok = task.run()
    task.finished(ok)
    return ok


def test_segment_layers_styled_on_the_input_grid(assets, tmp_path, project):
    bar = RecordingBar()
    task = RunTask(request_for(assets, tmp_path, "segment", vectors=True, batch_size=8), message_bar=bar)
    assert run_now(task), task.error
    group = task.group
    assert group.name().startswith("test segment ") and project.layerTreeRoot().children()[0] is group
    names = [node.layer().name() for node in group.findLayers()]
    assert names == ["polygons", "classes", "confidence"]  # short: the details are in the metadata
    polygons, classes, confidence = (node.layer() for node in group.findLayers())
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    for layer in (classes, confidence):
        assert layer.crs() == scene.crs() and layer.extent() == scene.extent()
        assert (layer.width(), layer.height()) == (scene.width(), scene.height())
    renderer = classes.renderer()
    assert isinstance(renderer, QgsPalettedRasterRenderer)
    assert [(c.value, c.color.name(), c.label) for c in renderer.classes()] == [
        (0, "#1f77b4", "water"), (1, "#d62728", "land")]  # the colours of model.json
    conf = confidence.renderer()
    assert isinstance(conf, QgsSingleBandPseudoColorRenderer)
    assert (conf.classificationMin(), conf.classificationMax()) == (0.0, 1.0)
    assert isinstance(polygons, QgsVectorLayer) and isinstance(polygons.renderer(), QgsCategorizedSymbolRenderer)
    cats = {c.value(): c.symbol().color().name() for c in polygons.renderer().categories()}
    assert polygons.renderer().classAttribute() == "class_name" and cats == {"water": "#1f77b4", "land": "#d62728"}
    visible = {node.layer().name(): node.isVisible() for node in group.findLayers()}
    assert visible["classes"] and not visible["confidence"]
    assert 0.3 <= classes.opacity() <= 0.7 and 0.3 <= polygons.opacity() <= 0.7  # the image shows through
    assert "tiny-segment" in classes.metadata().abstract() and "scene.tif" in classes.abstract()
    assert "water" in classes.metadata().abstract()  # the result's summary
    (title, text, level), = bar.messages
    assert level == Qgis.Success and "water" in text and "land" in text and " s" in text
    assert text == task.summary == summarise(task.result)
    assert Path(task.request.output_path).is_file()


def test_detect_boxes_are_outlined(assets, tmp_path, project):
    task = RunTask(request_for(assets, tmp_path, "detect"))
    assert run_now(task), task.error
    (layer,) = task.layers
    assert layer.name() == "detections" and "tiny-detect" in layer.abstract()
    renderer = layer.renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == "class_name"
    (cat,) = renderer.categories()
    symbol_layer = cat.symbol().symbolLayer(0)
    assert cat.value() == "ship" and symbol_layer.brushStyle() == 0  # Qt.NoBrush: outline only
    assert symbol_layer.strokeColor().name() == QColor(task.result["classes"][0]["colour"]).name()


def test_embed_shows_the_pca_preview(assets, tmp_path, project):
    task = RunTask(request_for(assets, tmp_path, "embed"))
    assert run_now(task), task.error
    names = [layer.name() for layer in task.layers]
    assert names == ["PCA", "embedding"]


def test_through_the_task_manager(assets, tmp_path, project):
    """The real path: QGIS's task manager runs run() on a thread and finished() on this one."""
    task = RunTask(request_for(assets, tmp_path, "classify"))
    QgsApplication.taskManager().addTask(task)
    deadline = time.monotonic() + 120
    while not task.is_done and time.monotonic() < deadline:
        QCoreApplication.processEvents()
        time.sleep(0.02)
    assert task.is_done and task.status() == QgsTask.Complete, task.error
    (grid,) = task.layers
    assert grid.featureCount() == 4 and project.layerTreeRoot().findGroup(task.group.name()) is not None


def test_failure_and_cancel_are_reported_without_layers(assets, tmp_path, project):
    bar = RecordingBar()
    bad = RunTask(request_for(assets, tmp_path, "segment", bands=("VV", "HH")), message_bar=bar)
    assert not run_now(bad)
    (_title, text, level), = bar.messages
    assert level == Qgis.Critical and "HH" in text
    cancelled = RunTask(request_for(assets, tmp_path, "segment"), message_bar=bar)
    cancelled.cancel()
    assert not run_now(cancelled)
    assert bar.messages[-1][2] == Qgis.Info and "cancelled" in bar.messages[-1][1]
    assert project.layerTreeRoot().children() == [] and project.count() == 0
    assert not Path(cancelled.request.output_path).exists()


def test_results_go_right_above_the_input_below_the_labels_in_unique_groups(assets, tmp_path, project):
    """Issue 16, item 5: label layers stay on top, results sit right above their input, and two runs
    of one name get two groups."""
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    other = QgsRasterLayer(str(assets / "scene.tif"), "other image", "gdal")
    project.addMapLayers([other, scene])
    labels = create_label_layer(tmp_path / "labels.gpkg", QgsCoordinateReferenceSystem("EPSG:32631"),
                                [("water", "#1f77b4"), ("land", "#d62728")], project=project)
    root = project.layerTreeRoot()
    assert root.children()[0].layer() is labels  # a new label layer goes on top
    tasks = []
    for k in range(2):
        task = RunTask(request_for(assets, tmp_path / str(k), "classify", layer_id=scene.id()))
        assert run_now(task), task.error
        tasks.append(task)
    names = [node.name() for node in root.children()]
    assert names[0] == labels.name()
    scene_index = names.index("scene")
    assert names[scene_index - 1] == tasks[1].group.name() and names[scene_index - 2] == tasks[0].group.name()
    assert tasks[0].group.name() != tasks[1].group.name()
    assert tasks[1].group.name().startswith("test classify ") and tasks[1].group.name().endswith("(2)")


def test_a_success_clears_an_earlier_failure_from_the_bar(assets, tmp_path, project):
    """Issue 16, item 4: an old critical line must not stay over later successes."""
    bar = RecordingBar()
    bad = RunTask(request_for(assets, tmp_path, "segment", bands=("VV", "HH")), message_bar=bar)
    assert not run_now(bad)
    assert any("HH" in text for text in bar.shown())
    good = RunTask(request_for(assets, tmp_path, "classify"), message_bar=bar)
    assert run_now(good), good.error
    assert not any("HH" in text for text in bar.shown()) and len(bar.shown()) == 1


def test_run_on_an_extent_writes_only_that_window(assets, tmp_path, project):
    """The dialog's extent (a pixel window) reaches the engine: outputs cover just that window,
    on the input's grid."""
    task = RunTask(request_for(assets, tmp_path, "segment", extent=(10, 12, 32, 40), batch_size=8),
                   message_bar=RecordingBar())
    assert run_now(task), task.error
    classes = next(layer for layer in task.layers if layer.name().endswith("classes"))
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    assert (classes.width(), classes.height()) == (40, 32)
    assert classes.extent().xMinimum() == pytest.approx(scene.extent().xMinimum() + 12 * 20.0)
    assert classes.extent().yMaximum() == pytest.approx(scene.extent().yMaximum() - 10 * 20.0)


def test_worker_killed_mid_run_fails_readably_then_the_next_run_works(assets, tmp_path, project):
    """The engine process dies during a run (killed here, as the OOM killer would): the task
    fails with a message saying so, QGIS (this process) carries on, and the next run restarts the
    worker and succeeds."""
    import os
    import signal
    import threading

    from osgeo import gdal

    from sarmae_qgis.toolbelt.engine import get_client

    big = tmp_path / "big.tif"  # large enough to still be running when the worker is killed
    ds = gdal.GetDriverByName("GTiff").Create(str(big), 1536, 1536, 2, gdal.GDT_Float32)
    ds.SetGeoTransform((500000.0, 20.0, 0.0, 4500000.0, 0.0, -20.0))
    ds.SetProjection(QgsRasterLayer(str(assets / "scene.tif"), "s").crs().toWkt())
    for b in (1, 2):
        ds.GetRasterBand(b).Fill(-15.0)
        ds.GetRasterBand(b).SetDescription(("VV", "VH")[b - 1])
    ds = None
    request = RunRequest(run_name="killed", layer_name="big", raster_path=str(big),
                         model_path=str(assets / "segment.pkg"), model_name="tiny-segment", task="segment",
                         output_dir=str(tmp_path / "killed"), batch_size=1)
    bar = RecordingBar()
    task = RunTask(request, message_bar=bar)
    client = get_client()
    client.start()
    pid = client.proc.pid

    def kill_when_running():
        deadline = time.monotonic() + 60
        while task.progress() <= 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    ok = task.run()
    killer.join()
    task.finished(ok)
    assert not ok and bar.messages[-1][2] == Qgis.Critical
    assert "stopped unexpectedly" in bar.messages[-1][1] and "restarted" in bar.messages[-1][1]
    assert project.count() == 0 and not Path(request.output_path).exists()
    again = RunTask(request_for(assets, tmp_path, "segment"), message_bar=bar)
    assert run_now(again), again.error
    assert get_client().proc.pid != pid and len(again.layers) == 2
