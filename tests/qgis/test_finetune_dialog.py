"""Fine-tune dialog -> FinetuneRequest (validation before any training), the label snapshot, and a
real FinetuneTask through the engine worker that installs the new model in the models folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bars import RecordingBar
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsRasterLayer,
    QgsSettings,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QCoreApplication, Qt

from sarmae_qgis.errors import RequestError
from sarmae_qgis.gui.finetune_dialog import FinetuneDialog, FinetuneResultDialog, snapshot_labels
from sarmae_qgis.labelling import create_label_layer
from sarmae_qgis.model_cards import PackageCard, describe_html, read_card, validation_doubts
from sarmae_qgis.tasks.finetune_task import (
    FinetuneTask,
    budget_fraction,
    gui_text,
    summarise,
)

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


@pytest.fixture(autouse=True)
def fresh_choices():
    """Each test starts with nothing remembered by the Fine-tune form."""
    QgsSettings().remove("sarmae/finetune")
    yield
    QgsSettings().remove("sarmae/finetune")


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
    assert task.history  # progress lines reached the task (epochs, or the quick head's steps)
    card = read_card(request.output)
    assert card.task == "segment" and card.classes == (("water", "#0055ff"), ("land", "#22aa22"))
    assert (models / request.name / "training_curves.png").is_file()
    assert "validation mean IoU" in summarise(task.result)
    result = FinetuneResultDialog(task, can_run=True)
    assert "Confusion matrix" in result.figures  # curves too, unless quick mode fitted once (nothing to draw)
    assert ("Training curves" in result.figures) == (task.result["epochs_run"] > 1)
    if task.result["val_chips"] < 4:  # one polygon per class: the score cannot be trusted, and says so
        assert result.warnings and "How far to trust this score" in result.text.text()
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


def test_mode_choice_reaches_the_request(dialog):
    """Issue 16: Quick (frozen encoder) / Full fine-tune / Automatic -> config.mode. Automatic is
    the training side's default and is not sent, so engines without the field still train."""
    labels = [dialog.mode_combo.itemText(i) for i in range(dialog.mode_combo.count())]
    assert labels[0].startswith("Automatic") and "Quick (frozen encoder)" in labels and "Full fine-tune" in labels
    assert dialog.mode_combo.currentData() == "auto"
    assert "mode" not in dialog.build_request(snapshot=False).message()["config"]
    for text, mode in (("Quick (frozen encoder)", "head"), ("Full fine-tune", "full")):
        dialog.mode_combo.setCurrentIndex(dialog.mode_combo.findText(text))
        request = dialog.build_request(snapshot=False)
        assert request.mode == mode and request.message()["config"]["mode"] == mode


def test_choices_are_remembered_between_openings(models, labelled, project, tmp_path):
    """Issue 16, item 1: reopening the dialog had forgotten the settings (time budget back to 5 min)."""
    d = FinetuneDialog(project=project, models_folder=models)
    d.output_folder = tmp_path / "runs"
    d.label_combo.setLayer(labelled[1])
    d.minutes_spin.setValue(1.5)
    d.epochs_spin.setValue(7)
    d.batch_spin.setValue(4)
    d.mode_combo.setCurrentIndex(d.mode_combo.findData("head"))
    d.accept()
    assert d.request is not None
    again = FinetuneDialog(project=project, models_folder=models)
    assert again.minutes_spin.value() == 1.5 and again.epochs_spin.value() == 7 and again.batch_spin.value() == 4
    assert again.mode_combo.currentData() == "head" and again.encoder_picker.current_path() == str(models / "encoder.pkg")


def test_automatic_names_are_unique_and_errors_name_no_flag(dialog, models):
    (models / "segment_my_labels").mkdir()
    assert dialog.build_request(snapshot=False).name == "segment_my_labels_2"
    message = ("only 4 training and 1 validation chip(s) for a batch size of 16: lower the batch size "
               "(--batch-size), or raise --max-minutes")
    text = gui_text(message)
    assert "--" not in text and "the batch size (Advanced)" in text and "the time budget" in text


def test_errors_are_shown_whole_in_the_dialog(dialog):
    """Issue 16, item 7: two-line warnings were cut in the dialog's message bar."""
    dialog.resize(560, 700)
    dialog.show()
    long = "first line of a long explanation " * 6 + "\nsecond line: what to do about it " * 3
    dialog.show_error(long)
    QCoreApplication.processEvents()
    notice = dialog.notice
    assert notice.isVisible() and notice.wordWrap()
    assert notice.height() >= notice.heightForWidth(notice.width())  # nothing clipped
    assert "what to do about it" in notice.plain
    dialog.close()


def test_reliability_is_called_out():
    """Issue 16, item 2: a one-class, one-chip validation reported IoU 1.000 without a warning."""
    one_land_chip = {"val_mean_iou": 1.0, "val_iou": {"land": 1.0}, "val_chips": 1, "train_chips": 4}
    warnings = validation_doubts(one_land_chip, ("water", "land"))
    assert any("1 chip" in w for w in warnings) and any("no water" in w for w in warnings)
    from_training = {"val_mean_iou": 0.5, "warnings": ["Validation holds one class only."],
                     "validation": {"chips": 2, "classes_present": ["land"], "reliable": False,
                                    "note": "2 validation chips, land only: cross-validated over the polygons."}}
    assert validation_doubts(from_training, ("water", "land")) == [
        "Validation holds one class only.", "2 validation chips, land only: cross-validated over the polygons."]
    fine = {"val_mean_iou": 0.8, "val_iou": {"water": 0.7, "land": 0.9}, "val_chips": 12}
    assert validation_doubts(fine, ("water", "land")) == []
    # a package card keeps the record under provenance.metrics: the Models dialog's card shows it too
    card_prov = {"metrics": {"val_mean_iou": 1.0, "validation": {"chips": 1, "classes_present": ["dry"],
                                                                 "reliable": False, "note": "validation is weak"}}}
    assert validation_doubts(card_prov) == ["validation is weak"]
    assert "validation is weak" in describe_html(PackageCard(path="p", name="m", task="segment",
                                                             raw={"provenance": card_prov}))


def test_progress_follows_the_time_budget():
    """Issue 16, item 8: 6 % at 13 s of a 60 s budget, then a jump to 100 %."""
    assert budget_fraction(0.06, 30.0, 1.0) == pytest.approx(0.5)
    assert budget_fraction(0.06, 13.0, 1.0) == pytest.approx(13 / 60)
    assert budget_fraction(0.8, 13.0, 1.0) == pytest.approx(0.8)  # the engine is further: keep its fraction
    assert budget_fraction(0.06, 600.0, 1.0) == pytest.approx(0.99)  # never 100 % before the end
    assert budget_fraction(0.3, 600.0, 0.0) == pytest.approx(0.3)  # no budget: the engine's fraction


def test_results_dialog_shows_the_map_over_the_labels(dialog, models, tmp_path):
    """The prediction over the labelled area (``preview_png``), readable figures, integers as integers."""
    from qgis.PyQt.QtGui import QColor, QImage

    request = dialog.build_request(snapshot=False)
    package = Path(request.output)
    package.mkdir(parents=True)
    image = QImage(640, 320, QImage.Format_RGB32)
    image.fill(QColor("#1f77b4"))
    image.save(str(package / "preview.png"))
    task = FinetuneTask(request)
    task.result = {"val_mean_iou": 0.75, "val_iou": {"water": 0.6, "land": 0.9}, "epochs_run": 9, "best_epoch": 5.0,
                   "train_chips": 40, "val_chips": 12, "preview_png": "preview.png",
                   "warnings": ["Validation covers 3 % of the labelled area."]}
    result = FinetuneResultDialog(task)
    assert list(result.figures) == ["Prediction over your labels"]
    assert result.tabs.tabText(0) == "Prediction over your labels"
    text = result.text.text()
    assert "best at epoch 5" in text and "5.000" not in text and "0.750" in text
    assert "Validation covers 3 % of the labelled area." in text and "not reliable" in text


@pytest.mark.parametrize("result", [
    {"val_map_50": 1.0, "val_ap_per_class": {"ship": 1.0}, "train_chips": 4, "val_chips": 4, "val_boxes": 1,
     "validation": {"chips": 4, "classes_present": ["ship"], "reliable": False, "held_out_per_class": {"ship": 1},
                    "note": "validation is weak (only 1 ship box held out): its score says little about the map"}},
    {"val_accuracy": 1.0, "val_per_class_accuracy": {"water": 1.0, "land": 1.0}, "train_chips": 10, "val_chips": 4,
     "validation": {"chips": 4, "classes_present": ["water", "land"], "reliable": False,
                    "held_out_per_class": {"water": 3, "land": 1}, "cross_validation": {"balanced_accuracy": 0.8},
                    "note": "validation is weak (only 1 land chip held out); cross-validation over the training "
                            "chips (5 folds by chip) gives a balanced accuracy of 0.80"}},
], ids=["detect", "classify"])
def test_detect_and_classify_results_say_how_far_to_trust_them(dialog, result):
    """Issue 16, item 2: the ``validation`` record of a detector or a classifier (4 validation chips,
    every class present: the plugin's own fallback sees nothing wrong) reaches the results dialog."""
    task = FinetuneTask(dialog.build_request(snapshot=False))
    task.result = result
    shown = FinetuneResultDialog(task)  # kept: its labels live as long as the dialog
    text = shown.text.text()
    assert "not reliable" in text and "How far to trust this score" in text
    assert result["validation"]["note"].split(":")[0].split(";")[0] in text
