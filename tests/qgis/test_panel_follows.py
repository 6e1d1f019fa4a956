"""The dock panel stays out of the way (issue 16, found in the real QGIS desktop): every tab's
lists follow the project when layers arrive after the panel was built (a raster opened from the
command line with the panel restored, New label layer…), a tab's warning goes when its inputs
change, and the Run tab moves to the model that fits once more models are installed."""

from __future__ import annotations

import shutil

import pytest
from qgis.core import QgsRasterLayer

pytestmark = pytest.mark.qgis


@pytest.fixture
def panel(open_panel, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    made = open_panel(folder)
    made.models = folder
    return made


def test_a_raster_added_after_the_panel_is_chosen_in_every_tab(panel, assets, project):
    raster_tabs = (panel.run_form, panel.similarity_form, panel.text_form)
    assert all(form.layer_combo.currentLayer() is None for form in raster_tabs)
    panel.text_form.run_button.click()
    assert "Choose an input raster layer" in panel.text_form.notice.plain
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayer(scene)  # QGIS started with the panel restored and a raster on the command line
    assert [form.layer_combo.currentLayer() for form in raster_tabs] == [scene, scene, scene]
    assert panel.text_form.notice.plain == "" and panel.text_form.notice.isHidden()  # its inputs changed
    other = QgsRasterLayer(str(assets / "scene.tif"), "other", "gdal")
    project.addMapLayer(other)
    assert all(form.layer_combo.currentLayer() is scene for form in raster_tabs)  # a choice is kept
    panel.run_form.layer_combo.setLayer(None)
    panel.run_form.run_button.click()
    assert "Choose an input raster layer" in panel.run_form.notice.plain
    panel.run_form.layer_combo.setLayer(other)  # picked by hand: the warning goes
    assert panel.run_form.notice.isHidden()
    project.removeMapLayer(scene.id())
    assert all(form.layer_combo.currentLayer() is other for form in raster_tabs)


def test_a_raster_not_yet_in_the_layer_tree_is_chosen(panel, assets, project):
    """While a project is read the layer tree comes after the layers."""
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayer(scene, False)
    assert panel.similarity_form.layer_combo.currentLayer() is scene


def test_a_new_label_layer_is_the_similarity_tabs_polygon_layer(panel, assets, project, tmp_path):
    from qgis.core import QgsCoordinateReferenceSystem, QgsVectorLayer

    from sarmae_qgis.labelling import create_label_layer

    assert panel.similarity_form.polygon_combo.currentLayer() is None
    table = QgsVectorLayer("None?field=name:string", "layer_styles", "memory")  # a GeoPackage's styles table
    project.addMapLayer(table)
    assert panel.similarity_form.polygon_combo.currentLayer() is None
    labels = create_label_layer(tmp_path / "labels.gpkg", QgsCoordinateReferenceSystem("EPSG:32631"),
                                [("water", "#1f77b4"), ("land", "#2ca02c")], project=project)
    assert panel.similarity_form.polygon_combo.currentLayer() is labels
    assert panel.finetune_form.label_combo.currentLayer() is labels
    labels.rollBack()


def test_a_new_label_layer_replaces_a_chosen_polygon_layer_a_plain_one_does_not(panel, project, tmp_path):
    """One rule for every polygon list (``layers.follow_new_polygons``; New label layer… used to set
    the Fine-tune tab from the plugin as well): a label layer just made is the one to use."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsVectorLayer

    from sarmae_qgis.labelling import create_label_layer

    combos = (panel.finetune_form.label_combo, panel.similarity_form.polygon_combo)
    drawn = QgsVectorLayer("Polygon?crs=EPSG:32631&field=kind:string", "drawn", "memory")
    project.addMapLayer(drawn)
    assert [c.currentLayer() for c in combos] == [drawn, drawn]
    labels = create_label_layer(tmp_path / "labels.gpkg", QgsCoordinateReferenceSystem("EPSG:32631"),
                                [("water", "#1f77b4"), ("land", "#2ca02c")], project=project)
    assert [c.currentLayer() for c in combos] == [labels, labels]
    project.addMapLayer(QgsVectorLayer("Polygon?crs=EPSG:32631&field=kind:string", "other", "memory"))
    assert [c.currentLayer() for c in combos] == [labels, labels]  # a choice is kept
    labels.rollBack()


def test_the_run_tab_moves_to_the_model_that_fits_once_more_are_installed(panel, assets, project):
    """The Run tab stayed on the only package there when the panel opened; the panel watches the
    models folder: a refresh re-ranks (model_cards.fit_rank) until the user picks a model by hand."""
    shutil.copytree(assets / "encoder.pkg", panel.models / "encoder.pkg")
    panel.refresh_models()
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayer(scene)
    form = panel.run_form
    assert form.layer_combo.currentLayer() is scene and form.current_card().task == "embed"
    shutil.copytree(assets / "segment.pkg", panel.models / "segment.pkg")
    panel.refresh_models()
    assert form.model_combo.count() == 2 and form.current_card().task == "segment"  # a task model first
    encoder = 1  # the encoder, ranked after the segment model
    form.model_combo.setCurrentIndex(encoder)
    form.model_combo.activated.emit(encoder)  # chosen by hand: kept from now on
    shutil.copytree(assets / "segment.pkg", panel.models / "segment_2.pkg")
    panel.refresh_models()
    assert form.model_combo.count() == 3 and form.current_card().task == "embed"


def test_a_reopened_label_geopackage_gives_its_class_field_and_a_short_name(panel, assets, project, tmp_path):
    """Reopening a saved label GeoPackage in QGIS gave two layers ("<file> — <table>" and the
    layer_styles table), class field ``fid`` and the model name
    segment_Spain_7370579_S1Hand_labels_spain_7370579_s1hand_lab."""
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    from sarmae_qgis.labelling import create_label_layer

    scene = QgsRasterLayer(str(assets / "scene.tif"), "Spain_7370579_S1Hand", "gdal")
    project.addMapLayer(scene)
    path = tmp_path / "Spain_7370579_S1Hand_labels.gpkg"
    made = create_label_layer(path, scene.crs(), [("water", "#1f77b4"), ("land", "#2ca02c")], project=project)
    x0, y0 = scene.extent().xMinimum(), scene.extent().yMinimum()
    for i, name in enumerate(("water", "water", "land", "land")):
        feature = QgsFeature(made.fields())
        x = x0 + 40 * i
        feature.setGeometry(QgsGeometry.fromWkt(f"POLYGON(({x} {y0}, {x + 30} {y0}, {x + 30} {y0 + 30}, {x} {y0}))"))
        feature["class"] = name
        assert made.addFeature(feature)
    assert made.commitChanges()
    table = made.source().split("layername=")[-1]
    project.removeMapLayer(made.id())
    form = panel.finetune_form
    assert form.label_combo.currentLayer() is None
    polygons = QgsVectorLayer(f"{path}|layername={table}", f"Spain_7370579_S1Hand_labels \u2014 {table}", "ogr")
    styles = QgsVectorLayer("None?field=f_table_name:string&field=styleName:string", "layer_styles", "memory")
    project.addMapLayers([polygons, styles])
    labels = [form.label_combo.layer(i) for i in range(form.label_combo.count())]
    assert styles not in labels and form.label_combo.currentLayer() is polygons  # a table is not a label layer
    assert form.field_combo.currentField() == "class" and "water (2)" in form.classes_label.text()
    request = form.build_request(snapshot=False)
    assert request.name == "segment_Spain_7370579_S1Hand_labels" and len(request.name) <= 40


def test_the_class_field_is_never_a_key_by_default(panel, project):
    from qgis.core import QgsVectorLayer

    form = panel.finetune_form
    layer = QgsVectorLayer("Polygon?crs=EPSG:32631&field=fid:integer&field=id:integer&field=Label:string",
                           "drawn", "memory")
    project.addMapLayer(layer)
    assert form.label_combo.currentLayer() is layer and form.field_combo.currentField() == "Label"
    from sarmae_qgis.gui.training_data import auto_model_name, default_class_field

    plain = QgsVectorLayer("Polygon?crs=EPSG:32631&field=fid:integer&field=area:double&field=kind:string", "p", "memory")
    assert default_class_field(plain) == "area"  # no class-like text field: the first that is not a key
    assert auto_model_name("segment", "a" * 30 + "_" + "b" * 30) == "segment_" + "a" * 30
    assert auto_model_name("detect", "ships \u2014 Ships") == "detect_ships"


def test_a_project_read_after_the_panel_fills_every_tab(panel, assets, project, tmp_path):
    """QGIS restores the panel before it reads the project given on the command line."""
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayer(scene)
    assert project.write(str(tmp_path / "p.qgz"))
    project.clear()
    assert panel.run_form.layer_combo.currentLayer() is None
    assert project.read(str(tmp_path / "p.qgz"))
    (read,) = project.mapLayersByName("scene")
    assert all(form.layer_combo.currentLayer() is read
               for form in (panel.run_form, panel.similarity_form, panel.text_form))
    project.clear()  # no file name left for the next tests (the output folder follows a saved project)
