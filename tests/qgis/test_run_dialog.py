"""The Run model dialog turns its widgets into a RunRequest, and refuses invalid choices with a
message in its message bar (the dialog stays open)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from osgeo import gdal
from qgis.core import QgsCoordinateTransform, QgsRasterLayer

from sarmae_qgis.errors import RequestError
from sarmae_qgis.gui.run_dialog import RunDialog
from sarmae_qgis.tasks.run_task import RunRequest

pytestmark = pytest.mark.qgis


@pytest.fixture
def models(assets, tmp_path) -> Path:
    """A models folder with three packages (one zipped) and some clutter."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(assets / "segment.pkg", folder / "segment.pkg")
    shutil.copytree(assets / "detect.pkg", folder / "detect.pkg")
    shutil.make_archive(str(folder / "classify"), "zip", assets, "classify.pkg")
    (folder / "notes.txt").write_text("not a model")
    (folder / "empty").mkdir()
    return folder


@pytest.fixture
def dialog(qgis_iface, models, project, assets, tmp_path):
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayer(scene)
    d = RunDialog(qgis_iface.mainWindow(), models_folder=models)
    d.output_widget.setFilePath(str(tmp_path / "out"))
    d.layer_combo.setLayer(scene)
    yield d
    d.close()
    d.deleteLater()


def select_model(d: RunDialog, name: str) -> None:
    labels = [d.model_combo.itemText(i) for i in range(d.model_combo.count())]
    d.model_combo.setCurrentIndex(next(i for i, t in enumerate(labels) if t.startswith(name)))


def messages(d: RunDialog) -> str:
    return d.notice.plain if d.notice.isVisibleTo(d) else ""


def test_lists_installed_packages_with_a_card(dialog, models):
    labels = [dialog.model_combo.itemText(i) for i in range(dialog.model_combo.count())]
    # ranked by fit to the layer (all take VV+VH here), then task models in the order analysts use them
    assert labels == ["tiny-segment (segment)", "tiny-detect (detect)", "tiny-classify (classify)"]
    select_model(dialog, "tiny-segment")
    card = dialog.card_label.text()
    assert "segment" in card and "water" in card and "#1f77b4" in card and "VV+VH" in card and "dB" in card
    assert dialog.bands_label.text() == "Layer bands: 1: VV, 2: VH"
    assert dialog.vectors_check.isEnabled()
    select_model(dialog, "tiny-detect")
    assert not dialog.vectors_check.isEnabled()


def test_widgets_become_a_request(dialog, assets, models, tmp_path):
    select_model(dialog, "tiny-segment")
    dialog.window_spin.setValue(48)
    dialog.overlap_spin.setValue(0.5)
    dialog.batch_spin.setValue(2)
    dialog.device_combo.setCurrentText("cpu")
    dialog.backend_combo.setCurrentText("torch")
    dialog.vectors_check.setChecked(True)
    dialog.name_edit.setText("Flood 2024")
    request = dialog.build_request()
    assert isinstance(request, RunRequest)
    assert request.raster_path == str(assets / "scene.tif") and request.layer_name == "scene"
    assert request.model_path == str(models / "segment.pkg") and request.task == "segment"
    assert request.run_name == "Flood 2024" and Path(request.output_dir).parent == tmp_path / "out"
    assert Path(request.output_dir).name.startswith("Flood_2024_")
    assert request.output_path.endswith("Flood_2024.tif")
    assert request.options() == {"batch_size": 2, "device": "cpu", "backend": "torch", "precision": "auto",
                                 "window": 48, "overlap": 0.5,
                                 "vector": True, "bands": ["VV", "VH"]}  # pre-filled from the model's bands
    dialog.accept()
    assert dialog.request is not None and dialog.request.run_name == "Flood 2024"
    assert dialog.result() == dialog.Accepted


def test_defaults_and_zipped_packages(dialog, models):
    select_model(dialog, "tiny-classify")
    request = dialog.build_request()
    assert request.model_path == str(models / "classify.zip") and request.task == "classify"
    assert request.window is None and request.overlap is None and request.bands == ("VV", "VH")
    assert request.run_name == "tiny-classify" and request.output_path.endswith(".gpkg")  # short: the group adds the time
    assert request.options() == {"batch_size": 4, "device": "auto", "backend": "auto", "precision": "auto",
                                 "bands": ["VV", "VH"]}


def test_no_layer_is_refused(dialog):
    dialog.layer_combo.setLayer(None)
    with pytest.raises(RequestError, match="Choose an input raster layer"):
        dialog.build_request()
    dialog.accept()
    assert dialog.request is None and dialog.result() != dialog.Accepted
    assert "Choose an input raster layer" in messages(dialog)


def test_layer_that_is_not_a_file_is_refused(dialog, assets, project):
    gdal.Translate("/vsimem/dialog_scene.tif", str(assets / "scene.tif"))
    try:
        layer = QgsRasterLayer("/vsimem/dialog_scene.tif", "memory scene", "gdal")
        project.addMapLayer(layer)
        dialog.layer_combo.setLayer(layer)
        dialog.accept()
        assert dialog.request is None and "not a file on disk" in messages(dialog)
    finally:
        gdal.Unlink("/vsimem/dialog_scene.tif")


def test_missing_or_removed_model_is_refused(qgis_iface, project, assets, tmp_path, models):
    empty = RunDialog(qgis_iface.mainWindow(), models_folder=tmp_path / "no_models")
    try:
        layer = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
        project.addMapLayer(layer)
        empty.layer_combo.setLayer(layer)
        assert empty.model_combo.count() == 0 and "No model packages" in empty.card_label.text()
        with pytest.raises(RequestError, match="Choose a model package"):
            empty.build_request()
        index = empty.add_model(models / "segment.pkg")  # Browse…
        assert empty.model_combo.currentIndex() == index and empty.build_request().task == "segment"
        shutil.rmtree(models / "segment.pkg")
        with pytest.raises(RequestError, match="model package not found"):
            empty.build_request()
    finally:
        empty.deleteLater()


def test_channel_mismatch_and_band_choice(dialog, assets, project):
    select_model(dialog, "tiny-segment")
    layer3 = QgsRasterLayer(str(assets / "scene3.tif"), "three bands", "gdal")
    project.addMapLayer(layer3)
    dialog.layer_combo.setLayer(layer3)
    assert dialog.bands_label.text() == "Layer bands: 1: VV, 2: VH, 3: angle"
    assert dialog.bands_edit.text() == "VV,VH"  # suggested from the band names
    assert dialog.build_request().bands == ("VV", "VH")
    dialog.bands_edit.setText("")
    dialog.accept()
    assert dialog.request is None and "takes 2 channel(s)" in messages(dialog) and "has 3 band(s)" in messages(dialog)
    dialog.bands_edit.setText("1,2,3")
    with pytest.raises(RequestError, match=r"3 band\(s\) chosen"):
        dialog.build_request()
    dialog.bands_edit.setText("1,4")
    with pytest.raises(RequestError, match="band 4 is not in layer"):
        dialog.build_request()
    dialog.bands_edit.setText("2, 1")
    assert dialog.build_request().options()["bands"] == [2, 1]


def test_window_must_fit_the_patch_size(dialog):
    select_model(dialog, "tiny-segment")
    dialog.window_spin.setValue(40)
    with pytest.raises(RequestError, match="multiple of the model's patch size"):
        dialog.build_request()



def test_extent_from_selected_polygons_and_canvas(dialog, project):
    """Selected polygons (any CRS) and the canvas extent become the layer's pixel window."""
    from qgis.core import (
        QgsCoordinateReferenceSystem,
        QgsFeature,
        QgsGeometry,
        QgsRectangle,
        QgsVectorLayer,
    )
    from qgis.gui import QgsMapCanvas

    select_model(dialog, "tiny-segment")
    assert dialog.build_request().extent is None and "extent" not in dialog.build_request().options()
    polygons = QgsVectorLayer("Polygon?crs=EPSG:32631", "aoi", "memory")
    for wkt in ("POLYGON((500200 4499400, 500600 4499400, 500600 4499800, 500200 4499800, 500200 4499400))",
                "POLYGON((502000 4490000, 502100 4490000, 502100 4490100, 502000 4490000))"):  # outside
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromWkt(wkt))
        polygons.dataProvider().addFeature(f)
    project.addMapLayer(polygons)
    dialog.extent_combo.setCurrentIndex(2)
    dialog.polygon_combo.setLayer(polygons)
    with pytest.raises(RequestError, match="No polygon is selected in 'aoi'"):
        dialog.build_request()
    polygons.selectByIds([1])
    request = dialog.build_request()
    assert request.extent == (10, 10, 20, 20) and request.options()["extent"] == [10, 10, 20, 20]
    polygons.selectByIds([2])
    with pytest.raises(RequestError, match="does not overlap layer 'scene'"):
        dialog.build_request()

    canvas = QgsMapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    canvas.resize(400, 400)
    dialog.canvas = canvas
    dialog.extent_combo.setCurrentIndex(1)
    # the canvas shows (in degrees) the area of UTM 500200..500600 E, 4499400..4499800 N
    to_wgs = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:32631"),
                                    QgsCoordinateReferenceSystem("EPSG:4326"), project)
    canvas.setExtent(to_wgs.transformBoundingBox(QgsRectangle(500200, 4499400, 500600, 4499800)))
    r, c, h, w = dialog.build_request().extent
    assert 8 <= r <= 10 and 8 <= c <= 10 and 20 <= h <= 24 and 20 <= w <= 24  # reprojected: a pixel or two more


def test_starts_on_the_given_layer_with_the_models_that_fit_it_first(qgis_iface, assets, models, project, tmp_path):
    """Issue 16, item 6: the selected layer, and a model whose input fits it, not the alphabetically
    first raster and an embed model; advice that can be followed for a single-band raster."""
    from osgeo import gdal

    shutil.copytree(assets / "embed.pkg", models / "aaa_embed.pkg")  # alphabetically first, an encoder
    single = str(tmp_path / "single.tif")
    gdal.Translate(single, str(assets / "scene.tif"), bandList=[1])
    first = QgsRasterLayer(single, "a single band", "gdal")
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayers([first, scene])
    d = RunDialog(qgis_iface.mainWindow(), models_folder=models, layer=scene)
    try:
        assert d.layer_combo.currentLayer() is scene
        texts = [d.model_combo.itemText(i) for i in range(d.model_combo.count())]
        assert texts[0] == "tiny-segment (segment)" and texts.index("tiny-embed (embed)") > 2, texts
        assert d.bands_edit.text() == "VV,VH"  # pre-filled: which bands feed the model
        d.layer_combo.setLayer(first)
        with pytest.raises(RequestError) as e:
            d.build_request()
        assert "choose the bands" not in str(e.value) and "choose a model made for 1 band" in str(e.value)
        d.bands_edit.setText("")
        scene3 = QgsRasterLayer(str(assets / "scene3.tif"), "three", "gdal")
        project.addMapLayer(scene3)
        d.layer_combo.setLayer(scene3)
        d.bands_edit.setText("")
        with pytest.raises(RequestError, match="choose 2 of its bands in the Bands field"):
            d.build_request()
    finally:
        d.close()
        d.deleteLater()


def test_a_browsed_model_survives_a_layer_change(dialog, assets, project, tmp_path):
    """A package picked with Browse… (outside the models folder) stays chosen when the layer changes
    and the list is ranked again for the new layer."""
    outside = tmp_path / "elsewhere" / "my_segmenter.pkg"
    shutil.copytree(assets / "segment.pkg", outside)
    dialog.model_picker.add_package(outside)
    assert dialog.model_picker.current_path() == str(outside)
    other = QgsRasterLayer(str(assets / "scene3.tif"), "three", "gdal")
    project.addMapLayer(other)
    dialog.layer_combo.setLayer(other)
    dialog.model_picker.refresh()  # what a layer change does before any model was picked in the combo
    assert dialog.model_picker.current_path() == str(outside)


def test_a_clip_model_takes_classes_or_phrases(dialog, assets, tmp_path):
    import json
    import os
    import subprocess
    import sys

    tiny = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                                            "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    pkg = tmp_path / "clip.pkg"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "engine.cli", "init", "--clip", "custom", "--clip-config", json.dumps(tiny),
                    "--name", "tiny-clip", "--output", str(pkg)], check=True, cwd=Path(__file__).resolve().parents[2],
                   env=env, timeout=300, capture_output=True)
    dialog.add_model(pkg)
    assert dialog.classes_edit.isEnabled() and dialog.query_edit.isEnabled()
    with pytest.raises(RequestError, match="either class names .* or phrases"):
        dialog.build_request()
    dialog.classes_edit.setText("water, land")
    req = dialog.build_request()
    assert req.task == "zeroshot" and req.options()["classes"] == ["water", "land"] and "query" not in req.options()
    dialog.query_edit.setText("ships at sea")
    with pytest.raises(RequestError, match="fill in one"):
        dialog.build_request()
    dialog.classes_edit.setText("")
    dialog.query_edit.setText("ships at sea; a harbour ;")
    assert dialog.build_request().options()["query"] == ["ships at sea", "a harbour"]
    dialog.extent_combo.setCurrentIndex(2)
    with pytest.raises(RequestError, match="whole layer"):
        dialog.build_request()
    select_model(dialog, "tiny-segment")
    assert not dialog.classes_edit.isEnabled()


def test_a_warning_goes_when_the_dialogs_inputs_change(qgis_iface, assets, models, project):
    """Issue 16 (desktop): "Choose an input raster layer" stayed after the layer was picked; the
    modal Run dialog clears it like the panel's tabs (Notice.clear_on, wired by the form itself)."""
    d = RunDialog(qgis_iface.mainWindow(), models_folder=models)
    try:
        d.run_button.click()
        assert "Choose an input raster layer" in d.notice.plain and not d.notice.isHidden()
        scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
        project.addMapLayer(scene)
        d.layer_combo.setLayer(scene)
        assert d.notice.plain == "" and d.notice.isHidden()
    finally:
        d.deleteLater()
