"""Every dialog rendered offscreen, filled the way a user would fill it: the images must not be
blank, and with ``SARMAE_SCREENSHOTS=<folder>`` they are saved there (``docs/screenshots`` holds the
ones the README shows). The Models and Similarity dialogs have theirs in their own test modules."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from qgis.core import QgsCoordinateReferenceSystem, QgsFeature, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtCore import QCoreApplication, Qt

from sarmae_qgis.gui.about_dialog import AboutDialog
from sarmae_qgis.gui.finetune_dialog import FinetuneDialog, FinetuneResultDialog
from sarmae_qgis.gui.label_layer_dialog import LabelLayerDialog
from sarmae_qgis.gui.run_dialog import RunDialog
from sarmae_qgis.gui.settings_dialog import SettingsDialog
from sarmae_qgis.labelling import create_label_layer
from sarmae_qgis.tasks.finetune_task import FinetuneTask

pytestmark = pytest.mark.qgis


def shoot(widget, name: str, width: int | None = None) -> None:
    widget.setWindowFlag(Qt.Window)
    widget.resize(width or widget.sizeHint().width(), widget.sizeHint().height())
    widget.show()
    QCoreApplication.processEvents()
    image = widget.grab().toImage()
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert image.width() > 300 and len(colours) > 10, f"{name}: blank rendering"
    folder = os.environ.get("SARMAE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        assert image.save(str(Path(folder) / name))
    widget.close()


@pytest.fixture
def models(assets, tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("segment", "detect", "encoder"):
        shutil.copytree(assets / f"{name}.pkg", folder / f"{name}.pkg")
    return folder


@pytest.fixture
def scene(assets, project) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(assets / "train.tif"), "S1 flood scene")
    project.addMapLayer(layer)
    return layer


@pytest.fixture
def labels(assets, tmp_path, project, scene) -> QgsVectorLayer:
    layer = create_label_layer(tmp_path / "flood_labels.gpkg", QgsCoordinateReferenceSystem("EPSG:32631"),
                               [("water", "#1f78b4"), ("land", "#33a02c")], project=project)
    for f in QgsVectorLayer(str(assets / "labels.gpkg"), "src", "ogr").getFeatures():
        feature = QgsFeature(layer.fields())
        feature.setGeometry(f.geometry())
        feature["class"] = f["class"]
        layer.addFeature(feature)
    layer.commitChanges()
    return layer


def test_run_dialog(qgis_iface, models, scene, tmp_path):
    d = RunDialog(qgis_iface.mainWindow(), models_folder=models)
    d.layer_combo.setLayer(scene)
    d.model_combo.setCurrentIndex(d.model_combo.findText("tiny-segment (segment)"))
    d.vectors_check.setChecked(True)
    d.output_widget.setFilePath(str(tmp_path / "sarmae_outputs"))
    d.name_edit.setText("Flood extent 2024-05")
    shoot(d, "run_dialog.png", 620)


def test_label_layer_dialog(models, scene, project, tmp_path):
    d = LabelLayerDialog(project=project, models_folder=models, ask=False)
    d.raster_combo.setLayer(scene)
    d.add_class("flooded vegetation", "#b15928")
    shoot(d, "label_layer_dialog.png", 560)


def test_finetune_dialog_and_results(models, scene, labels, project, tmp_path):
    d = FinetuneDialog(project=project, models_folder=models)
    d.output_folder = tmp_path / "runs"
    d.label_combo.setLayer(labels)
    d.name_edit.setText("flood_water")
    d.background_combo.setCurrentText(d.background_combo.itemText(0))
    d.epochs_spin.setValue(3)
    d.minutes_spin.setValue(0.3)
    d.batch_spin.setValue(8)
    d.device_combo.setCurrentText("cpu")
    shoot(d, "finetune_dialog.png", 600)
    task = FinetuneTask(d.build_request())
    ok = task.run()
    task.finished(ok)
    assert ok, task.error
    shoot(FinetuneResultDialog(task), "finetune_results.png", 880)


def test_dock_panel(qgis_iface, models, scene, labels, project, tmp_path):
    from sarmae_qgis.gui.dock_panel import SarmaePanel

    panel = SarmaePanel(qgis_iface.mainWindow(), canvas=qgis_iface.mapCanvas(), models_folder=models,
                        project=project)
    panel.show_tab("Fine-tune", labels)
    panel.finetune_form.output_folder = tmp_path / "runs"
    panel.setFloating(True)
    panel.resize(600, 900)
    panel.show()
    QCoreApplication.processEvents()
    image = panel.grab().toImage()
    assert image.width() >= 400
    folder = os.environ.get("SARMAE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        assert image.save(str(Path(folder) / "dock_panel.png"))
    panel.show_tab("Run", scene)
    QCoreApplication.processEvents()
    if folder:
        assert panel.grab().toImage().save(str(Path(folder) / "dock_panel_run.png"))
    panel.release()
    panel.close()


def test_settings_and_about(qgis_iface):
    shoot(SettingsDialog(qgis_iface.mainWindow()), "settings_dialog.png", 600)
    shoot(AboutDialog(qgis_iface.mainWindow()), "about_dialog.png")
