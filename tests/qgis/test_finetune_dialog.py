"""Fine-tune dialog -> FinetuneRequest (validation before any training), the label snapshot, and a
real FinetuneTask through the engine worker that installs the new model in the models folder."""

from __future__ import annotations

import shutil

import pytest
from bars import RecordingBar
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import Qt

from sarmae_qgis.errors import RequestError
from sarmae_qgis.gui.finetune_dialog import FinetuneDialog, FinetuneResultDialog, snapshot_labels
from sarmae_qgis.labelling import create_label_layer
from sarmae_qgis.model_cards import read_card
from sarmae_qgis.tasks.finetune_task import FinetuneTask, summarise

pytestmark = pytest.mark.qgis
CLASSES = [("water", "#0055ff"), ("land", "#22aa22")]




@pytest.fixture
def models(assets, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(assets / "encoder.pkg", folder / "encoder.pkg")
    shutil.copytree(assets / "segment.pkg", folder / "segment.pkg")  # not an encoder: not offered
    return folder


@pytest.fixture
def labelled(assets, tmp_path, project):
    """train.tif and a label layer made the plugin's way, with the polygons of labels.gpkg copied in
    (left unsaved in the edit buffer, as an analyst would)."""
    raster = QgsRasterLayer(str(assets / "train.tif"), "train")
    project.addMapLayer(raster)
    layer = create_label_layer(tmp_path / "my_labels.gpkg", QgsCoordinateReferenceSystem("EPSG:32631"), CLASSES,
                               project=project)
    source = QgsVectorLayer(str(assets / "labels.gpkg"), "src", "ogr")
    for f in source.getFeatures():
        feature = QgsFeature(layer.fields())
        feature.setGeometry(f.geometry())
        feature["class"] = f["class"]
        assert layer.addFeature(feature)
    return raster, layer


@pytest.fixture
def dialog(models, labelled, tmp_path, project):
    d = FinetuneDialog(project=project, models_folder=models)
    d.output_folder = tmp_path / "runs"
    d.label_combo.setLayer(labelled[1])
    return d


def test_widgets_become_a_request_and_a_snapshot(dialog, labelled, models):
    raster, layer = labelled
    assert dialog.raster_list.count() == 1 and dialog.checked_rasters() == [raster]  # the only raster: ticked
    assert dialog.field_combo.currentField() == "class"
    assert "water (1)" in dialog.classes_label.text() and "land (1)" in dialog.classes_label.text()
    encoders = [dialog.encoder_combo.itemText(i) for i in range(dialog.encoder_combo.count())]
    assert encoders[0].startswith("tiny-encoder") and not any("tiny-segment" in e for e in encoders)
    dialog.name_edit.setText("My water model")
    dialog.minutes_spin.setValue(2.5)
    dialog.background_combo.setCurrentText("land")
    r = dialog.build_request()
    assert r.name == "My_water_model" and r.output == str(models / "My_water_model")
    assert r.task == "segment" and r.rasters == (str(raster.source()),) and r.class_field == "class"
    assert r.classes == ("water", "land") and r.colours == ("#0055ff", "#22aa22") and r.background == "land"
    assert r.max_minutes == 2.5 and r.encoder == str(models / "encoder.pkg") and r.layer_name == "train"
    snap = QgsVectorLayer(f"{r.labels}|layername=labels", "snap", "ogr")  # the unsaved edits, class field only
    assert snap.featureCount() == 2 and [f.name() for f in snap.fields()] == ["fid", "class"]
    msg = r.message()
    assert msg["task"] == "finetune" and msg["kind"] == "segment" and msg["config"]["max_minutes"] == 2.5
    assert msg["labels"] == r.labels and msg["colours"] == ["#0055ff", "#22aa22"]


def test_invalid_choices_are_blocked_with_a_message(dialog, labelled, assets, models, project):
    raster, layer = labelled
    dialog.raster_list.item(0).setCheckState(Qt.Unchecked)
    with pytest.raises(RequestError, match="Tick at least one raster"):
        dialog.build_request(snapshot=False)
    dialog.raster_list.item(0).setCheckState(Qt.Checked)
    dialog.accept()
    assert dialog.request is not None  # sanity: valid now
    dialog.request = None

    # one class only
    layer.selectByExpression("\"class\" = 'land'")
    layer.deleteSelectedFeatures()
    dialog._update_classes()
    with pytest.raises(RequestError, match="Only one class .*water.*background"):
        dialog.build_request(snapshot=False)
    dialog.background_combo.setCurrentText("land")  # segmentation: one class + a background is fine
    dialog.build_request(snapshot=False)
    dialog.task_combo.setCurrentText("detect")
    with pytest.raises(RequestError, match="Only one class"):
        dialog.build_request(snapshot=False)
    dialog.task_combo.setCurrentText("segment")

    # no labelled polygon at all
    layer.selectAll()
    layer.deleteSelectedFeatures()
    dialog._update_classes()
    with pytest.raises(RequestError, match="no polygon with a class"):
        dialog.build_request(snapshot=False)
    dialog.label_combo.setLayer(None)
    with pytest.raises(RequestError, match="Choose the label layer"):
        dialog.build_request(snapshot=False)


def test_encoder_channels_and_taken_names(dialog, labelled, assets, project, models):
    scene3 = QgsRasterLayer(str(assets / "scene3.tif"), "three bands")
    project.addMapLayer(scene3)
    dialog.refresh_rasters()
    dialog.set_rasters_checked([scene3])
    with pytest.raises(RequestError, match="takes 2 channel.*has 3 band"):
        dialog.build_request(snapshot=False)
    dialog.set_rasters_checked([labelled[0]])
    dialog.name_edit.setText("encoder.pkg")
    with pytest.raises(RequestError, match="already installed"):
        dialog.build_request(snapshot=False)
    dialog.name_edit.setText("")
    dialog.accept()  # a valid request closes the dialog
    assert dialog.request is not None and dialog.request.name == "segment_my_labels"


def test_snapshot_skips_polygons_without_a_class(labelled, tmp_path):
    _, layer = labelled
    empty = QgsFeature(layer.fields())
    empty.setGeometry(next(layer.getFeatures()).geometry())
    empty["class"] = None
    layer.addFeature(empty)
    assert snapshot_labels(layer, "class", tmp_path / "snap.gpkg") == 2
    with pytest.raises(RequestError, match="no field"):
        snapshot_labels(layer, "nope", tmp_path / "snap2.gpkg")


def test_finetune_task_installs_a_model_with_the_label_colours(dialog, models):
    dialog.epochs_spin.setValue(2)
    dialog.minutes_spin.setValue(0.2)
    dialog.batch_spin.setValue(8)
    dialog.device_combo.setCurrentText("cpu")
    request = dialog.build_request()
    bar, done = RecordingBar(), []
    task = FinetuneTask(request, message_bar=bar, on_done=done.append)
    statuses: list[str] = []
    task.status.connect(statuses.append)
    ok = task.run()
    task.finished(ok)
    assert ok, task.error
    assert done == [task] and bar.messages[-1][2] == Qgis.Success and "validation mean IoU" in bar.messages[-1][1]
    assert any(s.startswith("epoch 1/2") for s in task.history)
    card = read_card(request.output)
    assert card.task == "segment" and card.classes == (("water", "#0055ff"), ("land", "#22aa22"))
    assert (models / request.name / "training_curves.png").is_file()
    assert "validation mean IoU" in summarise(task.result)
    result = FinetuneResultDialog(task, can_run=True)
    assert result.curves.pixmap() is not None and not result.curves.pixmap().isNull()
    assert "train" in result.run_button.text()
    result.accept()
    assert result.run_requested


def test_finetune_task_reports_engine_errors(dialog, models, tmp_path):
    request = dialog.build_request()
    broken = request.__class__(**{**request.__dict__, "rasters": (str(tmp_path / "gone.tif"),)})
    bar = RecordingBar()
    task = FinetuneTask(broken, message_bar=bar)
    ok = task.run()
    task.finished(ok)
    assert not ok and bar.messages[-1][2] == Qgis.Critical and "gone.tif" in bar.messages[-1][1]
    assert not (models / request.name).exists()


def test_rasters_under_the_labels_are_ticked(models, labelled, assets, project, tmp_path):
    """With several rasters, the ones the labels overlap and the encoder can read are ticked."""
    raster, layer = labelled
    project.addMapLayer(QgsRasterLayer(str(assets / "scene3.tif"), "three bands"))  # same area, 3 bands
    d = FinetuneDialog(project=project, models_folder=models)  # the label layer is chosen at once
    assert d.checked_rasters() == [raster]
    d.set_rasters_checked([])
    d.label_combo.setLayer(None)
    d.label_combo.setLayer(layer)
    assert d.checked_rasters() == [raster]
