"""Label layers: the GeoPackage, its value map, colours, stored style, and the New label layer dialog."""

from __future__ import annotations

import json
import os

import pytest
from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsGeometry,
    QgsRasterLayer,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtGui import QColor

from sarmae_qgis.errors import LayerError, RequestError
from sarmae_qgis.gui.label_layer_dialog import LabelLayerDialog
from sarmae_qgis.labelling import CLASSES_PROPERTY, count_labels, create_label_layer, label_classes

pytestmark = pytest.mark.qgis
UTM = QgsCoordinateReferenceSystem("EPSG:32631")
CLASSES = [("water", "#1f77b4"), ("land", "#2ca02c"), ("ship", "#d62728")]


def test_label_layer_is_ready_to_digitise(tmp_path, project):
    layer = create_label_layer(tmp_path / "labels.gpkg", UTM, CLASSES, project=project)
    assert layer.isValid() and layer.isEditable()
    assert layer.geometryType() == QgsWkbTypes.PolygonGeometry and layer.crs().authid() == "EPSG:32631"
    assert project.mapLayer(layer.id()) is layer
    # no temporary file left (the -wal/-shm files are SQLite's, while the layer is open)
    assert {n for n in os.listdir(tmp_path) if not n.startswith("labels.gpkg-")} == {"labels.gpkg"}
    index = layer.fields().indexOf("class")
    setup = layer.editorWidgetSetup(index)
    assert setup.type() == "ValueMap"
    assert [next(iter(d.values())) for d in setup.config()["map"]] == ["water", "land", "ship"]
    renderer = layer.renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == "class"
    assert [(c.value(), c.symbol().color().name()) for c in renderer.categories()] == CLASSES
    # a new polygon gets the first class by default
    feature = QgsFeature(layer.fields())
    feature.setGeometry(QgsGeometry.fromWkt("POLYGON((0 0, 10 0, 10 10, 0 10, 0 0))"))
    assert layer.defaultValue(index, feature) == "water"
    assert json.loads(layer.customProperty(CLASSES_PROPERTY))["classes"] == [list(c) for c in CLASSES]


def test_reopened_label_layer_keeps_its_form_and_colours(tmp_path, project):
    create_label_layer(tmp_path / "l.gpkg", UTM, CLASSES, project=project, start_editing=False)
    again = QgsVectorLayer(f"{tmp_path / 'l.gpkg'}|layername=l", "again", "ogr")  # loads the default style
    assert again.editorWidgetSetup(again.fields().indexOf("class")).type() == "ValueMap"
    assert label_classes(again, "class") == CLASSES


def test_label_classes_and_counts_without_our_property(assets):
    layer = QgsVectorLayer(str(assets / "labels.gpkg"), "labels", "ogr")
    assert [n for n, _ in label_classes(layer, "class")] == ["land", "water"]  # values found, sorted
    assert count_labels(layer, "class") == {"water": 1, "land": 1}
    assert label_classes(layer, "nope") == []


@pytest.mark.parametrize("classes, message", [
    ([], "at least one class"),
    ([("water", "#000000"), ("Water", "#ffffff")], "listed twice"),
    ([("", "#000000")], "has no name"),
])
def test_bad_class_lists_are_refused(tmp_path, project, classes, message):
    with pytest.raises(LayerError, match=message):
        create_label_layer(tmp_path / "x.gpkg", UTM, classes, project=project)
    assert not any(tmp_path.iterdir())


def test_existing_file_is_kept_unless_replacing(tmp_path, project):
    path = tmp_path / "labels.gpkg"
    path.write_bytes(b"precious")
    with pytest.raises(LayerError, match="already exists"):
        create_label_layer(path, UTM, CLASSES, project=project)
    assert path.read_bytes() == b"precious"
    with pytest.raises(LayerError, match="does not exist"):
        create_label_layer(tmp_path / "missing" / "l.gpkg", UTM, CLASSES, project=project)
    with pytest.raises(LayerError, match="field name"):
        create_label_layer(tmp_path / "f.gpkg", UTM, CLASSES, field="my class", project=project)
    layer = create_label_layer(path, UTM, CLASSES, project=project, overwrite=True)
    assert layer.isValid() and layer.featureCount() == 0


def test_dialog_takes_crs_and_folder_from_the_raster(assets, tmp_path, project, monkeypatch):
    raster = QgsRasterLayer(str(assets / "scene.tif"), "S1 scene")
    project.addMapLayer(raster)
    dialog = LabelLayerDialog(project=project, models_folder=assets, ask=False)
    dialog.raster_combo.setLayer(raster)
    assert dialog.crs_widget.crs().authid() == "EPSG:32631"
    assert dialog.file_widget.filePath().endswith("S1_scene_labels.gpkg")
    # classes from an installed model (the tiny segmenter: water, land)
    index = next(i for i in range(dialog.from_model_combo.count()) if "tiny-segment" in dialog.from_model_combo.itemText(i))
    dialog._on_model_classes(index)
    assert [n for n, _ in dialog.classes()] == ["water", "land"]
    dialog.add_class("ship", "#d62728")
    dialog.file_widget.setFilePath(str(tmp_path / "mine"))  # .gpkg added
    request = dialog.build_request()
    assert request.path == str(tmp_path / "mine.gpkg") and [n for n, _ in request.classes] == ["water", "land", "ship"]
    dialog.accept()
    assert dialog.result() == LabelLayerDialog.Accepted and dialog.layer.isValid()
    assert dialog.layer.crs().authid() == "EPSG:32631"


def test_dialog_blocks_invalid_choices(tmp_path, project, assets):
    dialog = LabelLayerDialog(project=project, models_folder=assets, ask=False)
    dialog.file_widget.setFilePath(str(tmp_path / "l.gpkg"))
    dialog.set_classes([("water", "#1f77b4"), ("water", "#2ca02c")])
    with pytest.raises(RequestError, match="listed twice"):
        dialog.build_request()
    dialog.set_classes([("water", "#1f77b4"), ("land", "#2ca02c")])
    dialog.crs_widget.setCrs(QgsCoordinateReferenceSystem())
    with pytest.raises(RequestError, match="CRS"):
        dialog.build_request()
    dialog.crs_widget.setCrs(UTM)
    dialog.set_classes([("water", "#1f77b4"), ("water", "#2ca02c")])
    dialog.accept()  # shows the message instead of closing
    assert dialog.layer is None and dialog.result() != LabelLayerDialog.Accepted
    assert "listed twice" in dialog.notice.plain
    dialog.set_classes([("water", "#1f77b4")])
    dialog.file_widget.setFilePath(str(tmp_path / "nowhere" / "l.gpkg"))
    with pytest.raises(RequestError, match="does not exist"):
        dialog.build_request()
    dialog.file_widget.setFilePath("")
    with pytest.raises(RequestError, match="GeoPackage file"):
        dialog.build_request()
    dialog.table.setCurrentCell(0, 0)
    dialog.remove_selected()
    dialog.file_widget.setFilePath(str(tmp_path / "l.gpkg"))
    with pytest.raises(RequestError, match="at least one class"):
        dialog.build_request()


def test_default_file_in_a_missing_output_folder_is_made(assets, tmp_path, project, monkeypatch):
    """Issue 16 (real desktop): a new user's first label layer went to ~/sarmae_outputs, which did not
    exist yet, and Create layer refused its own default ("the folder does not exist")."""
    from sarmae_qgis.toolbelt import settings

    folder = tmp_path / "not_yet" / "sarmae_outputs"
    monkeypatch.setattr(settings, "output_folder", lambda *a: folder)
    project.setFileName("")  # no saved project: the output folder is the default
    raster = QgsRasterLayer(str(assets / "scene.tif"), "S1 scene")
    project.addMapLayer(raster)
    dialog = LabelLayerDialog(project=project, models_folder=assets, ask=False)
    dialog.raster_combo.setLayer(raster)
    assert dialog.file_widget.filePath() == str(folder / "S1_scene_labels.gpkg")
    dialog.accept()
    assert dialog.notice.plain == "" and dialog.layer is not None and dialog.layer.isValid()
    assert (folder / "S1_scene_labels.gpkg").is_file()
    typed = LabelLayerDialog(project=project, models_folder=assets, ask=False)  # a folder typed in is not made
    typed.file_widget.setFilePath(str(tmp_path / "typo" / "l.gpkg"))
    with pytest.raises(RequestError, match="does not exist"):
        typed.build_request()


def test_well_known_class_names_get_their_conventional_colours(project, assets):
    """Classes typed as 'land, water' must not come out as land blue, water red (the palette by row),
    as in the desktop scenario; a colour the user picked is kept."""
    from sarmae_qgis.labelling import PALETTE, default_colour

    assert default_colour(0, "land") == "#a6761d" and default_colour(1, "Water") == "#1f77b4"
    assert default_colour(0, "open_water") == "#1f77b4" and default_colour(1, "water body") == "#1f77b4"
    assert default_colour(2, "quarry") == PALETTE[2]  # not a known name: the palette by row
    dialog = LabelLayerDialog(project=project, models_folder=assets, ask=False)
    assert dict(dialog.classes()) == {"water": "#1f77b4", "land": "#a6761d"}
    dialog.set_classes([])
    for _ in range(3):
        dialog.add_class()
    for row, name in enumerate(["land", "water", "quarry"]):
        dialog.table.item(row, 0).setText(name)  # as typed into the table
    assert dialog.classes() == [("land", "#a6761d"), ("water", "#1f77b4"), ("quarry", PALETTE[2])]
    dialog.table.cellWidget(0, 1).setColor(QColor("#ff00ff"))  # the user's choice
    dialog.table.item(0, 0).setText("dry land")
    assert dialog.classes()[0] == ("dry land", "#ff00ff")
