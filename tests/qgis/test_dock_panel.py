"""The SARMAE dock panel: Run, Fine-tune and Similarity tabs, non-modal, remembering its state."""

from __future__ import annotations

import shutil

import pytest
from qgis.core import QgsRasterLayer
from qgis.gui import QgsDockWidget
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QCoreApplication, QEvent

import sarmae_qgis
from sarmae_qgis.gui.dock_panel import TABS, SarmaePanel
from sarmae_qgis.tasks.run_task import RunRequest

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("fresh_panel_state")]


@pytest.fixture
def models(assets, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("segment.pkg", "encoder.pkg"):
        shutil.copytree(assets / name, folder / name)
    return folder


def flush_deletes() -> None:
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)


def test_tabs_run_and_stay_open(qgis_iface, assets, models, project, tmp_path, open_panel):
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayer(scene)
    runs: list = []
    panel = open_panel(models, on_run=runs.append)
    assert isinstance(panel, QgsDockWidget)
    assert [panel.tabs.tabText(i) for i in range(panel.tabs.count())] == list(TABS)
    assert TABS == ("Run", "Fine-tune", "Similarity", "Text search")
    panel.show()
    panel.show_tab("Run", scene)
    form = panel.run_form
    assert form.layer_combo.currentLayer() is scene and form.model_combo.currentText().startswith("tiny-segment")
    form.output_widget.setFilePath(str(tmp_path / "out"))
    form.run_button.click()
    assert len(runs) == 1 and isinstance(runs[0], RunRequest) and runs[0].layer_id == scene.id()
    assert form.isVisibleTo(panel) and not panel.isHidden()  # non-modal: the form stays, with its choices
    form.reject()  # Esc in a tab does not hide it
    assert form.isVisibleTo(panel)
    panel.show_failure("Fine-tuning 'x' failed", "only 1 validation chip: label a wider area")
    assert panel.tabs.currentIndex() == TABS.index("Fine-tune")
    assert "label a wider area" in panel.finetune_form.notice.plain


def test_the_panel_remembers_its_tab(qgis_iface, models, project):
    first = SarmaePanel(qgis_iface.mainWindow(), canvas=qgis_iface.mapCanvas(), models_folder=models, project=project)
    first.tabs.setCurrentIndex(TABS.index("Similarity"))
    first.release()
    first.deleteLater()
    second = SarmaePanel(qgis_iface.mainWindow(), canvas=qgis_iface.mapCanvas(), models_folder=models,
                         project=project)
    assert second.tabs.currentIndex() == TABS.index("Similarity")
    second.release()
    second.deleteLater()
    flush_deletes()


def test_plugin_shows_the_panel_and_removes_it_on_unload(qgis_iface, monkeypatch, tmp_path):
    from sarmae_qgis.toolbelt import settings

    monkeypatch.setattr(settings, "models_folder", lambda s=None: tmp_path / "models")
    monkeypatch.setattr(qgis_iface, "addPluginToRasterMenu", lambda *a: None)
    monkeypatch.setattr(qgis_iface, "removePluginRasterMenu", lambda *a: None)
    plugin = sarmae_qgis.classFactory(qgis_iface)
    plugin.initGui()
    plugin.panel_action.trigger()
    panel = plugin.panel
    assert panel is not None and not panel.isHidden() and plugin.panel_action in plugin.toolbar.actions()
    plugin.panel_action.trigger()
    assert plugin.panel is panel  # one panel, shown again
    plugin.unload()
    flush_deletes()
    assert plugin.panel is None and sip.isdeleted(panel)
    assert settings.remembered("panel", "visible", False) is True  # reopened at the next start
    plugin.initGui()
    assert plugin.panel is not None
    plugin.unload()
    flush_deletes()


def test_the_resources_folder_holds_the_assets():
    """The icon, layer opacities and help page live in resources/ (copied into the plugin zip)."""
    from sarmae_qgis.toolbelt.resources import ICON_PATH, layer_opacities, opacity_for, resource

    assert ICON_PATH.is_file() and resource("help", "panel.html").is_file()
    assert layer_opacities()["class"] < 1 and opacity_for("similarity") < 1 and opacity_for("detections") == 1


def test_forms_fit_a_narrow_dock_and_offer_the_sar_image_first(qgis_iface, assets, models, project, open_panel):
    """A dock ~360 px wide shows every form without a horizontal scroll bar (labels go above their
    fields, short special texts); with a vector layer selected, the Run tab offers the SAR image, not
    the confidence raster of an earlier run above it."""
    from sarmae_qgis.styling import style_output
    from sarmae_qgis.toolbelt.layers import input_raster

    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    earlier = QgsRasterLayer(str(assets / "scene.tif"), "confidence", "gdal")
    style_output(earlier, "confidence", [])
    project.addMapLayer(earlier)  # on top of the layer tree: the first raster a naive default would take
    project.addMapLayer(scene)
    project.layerTreeRoot().findLayer(scene.id())  # both in the tree
    assert input_raster(None, project) is scene and input_raster(earlier, project) is earlier
    panel = open_panel(models)
    for form in (panel.run_form, panel.finetune_form, panel.similarity_form):
        assert form.minimumSizeHint().width() <= panel.minimumWidth() - 20, type(form).__name__


@pytest.fixture(scope="module")
def clip_pkg(tmp_path_factory):
    """A tiny random CLIP (zeroshot) package, made by the engine (``sarmae init --clip custom``)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tiny = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                                            "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    out = tmp_path_factory.mktemp("clip") / "tiny_clip.pkg"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(Path(__file__).parents[2])}
    subprocess.run([sys.executable, "-m", "engine.cli", "init", "--clip", "custom", "--clip-config", json.dumps(tiny),
                    "--name", "tiny-clip", "--output", str(out)], check=True, cwd=Path(__file__).parents[2], env=env,
                   timeout=300, capture_output=True)
    return out


def test_text_search_tab_maps_a_phrase_through_the_run_path(qgis_iface, assets, models, project, tmp_path, clip_pkg,
                                                            monkeypatch, open_panel):
    """Text search: a CLIP package, the layer, a phrase -> the Run form's RunRequest (task zeroshot,
    query) -> RunTask: a translucent similarity layer in the run's group above the input; the second
    phrase reads the layer's embeddings from the engine's cache."""
    from sarmae_qgis.tasks.run_task import RunTask

    monkeypatch.setenv("SARMAE_CACHE_DIR", str(tmp_path / "cache"))
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayer(scene)
    runs: list = []
    panel = open_panel(models, on_run=runs.append)
    form = panel.text_form
    panel.show_tab("Text search", scene)
    assert panel.tabs.currentIndex() == TABS.index("Text search") and form.layer_combo.currentLayer() is scene
    assert form.model_combo.count() == 0 and "No CLIP (zeroshot) model" in form.card_label.text()  # segment/encoder only
    shutil.copytree(clip_pkg, models / "tiny-clip")
    panel.refresh_models()  # a model installed: listed at once
    assert form.model_combo.count() == 1 and form.current_card().task == "zeroshot"
    assert not form.window_spin.isVisibleTo(form) and form.run_button.text() == "Search"
    form.output_widget.setFilePath(str(tmp_path / "out"))
    form.run_button.click()
    assert runs == [] and "Type what to find" in form.notice.plain
    texts = []
    for phrase in ("ships at sea", "a harbour"):
        form.query_edit.setText(phrase)
        form.run_button.click()
        request = runs[-1]
        assert request.task == "zeroshot" and request.query == (phrase,) and request.classes is None
        assert request.run_name == phrase and request.layer_id == scene.id()
        task = RunTask(request, project=project)
        ok = task.run()
        task.finished(ok)
        assert ok, task.error
        (layer,) = [node.layer() for node in task.group.findLayers()]
        assert layer.renderer().opacity() < 1.0  # translucent over the SAR image
        root = project.layerTreeRoot()
        assert root.children().index(task.group) < root.children().index(root.findLayer(scene.id()))
        texts.append(task.result)
    assert texts[1]["statistics"]["embeddings"]["cached"] is True  # the second phrase: no image tower


def test_lists_follow_the_project_and_the_models_folder(qgis_iface, assets, models, project, tmp_path, open_panel):
    """Issue 16 (desktop): the Fine-tune tab kept 'Label layer' empty after New label layer, its
    polygon counts stayed at the first class chosen, and a new model was not listed."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsFeature, QgsGeometry

    from sarmae_qgis.labelling import create_label_layer

    panel = open_panel(models)
    form = panel.finetune_form
    assert form.raster_list.count() == 0
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayer(scene)
    assert [form.raster_list.item(i).text() for i in range(form.raster_list.count())] == ["scene"]
    assert [lyr.name() for lyr in form.checked_rasters()] == ["scene"]
    labels = create_label_layer(tmp_path / "labels.gpkg", QgsCoordinateReferenceSystem("EPSG:32631"),
                                [("water", "#1f77b4"), ("land", "#2ca02c")], project=project)
    assert form.label_combo.currentLayer() is labels  # the new label layer is chosen
    assert "water (0)" in form.classes_label.text()
    x0, y0 = scene.extent().xMinimum(), scene.extent().yMinimum()
    feature = QgsFeature(labels.fields())
    feature.setGeometry(QgsGeometry.fromWkt(f"POLYGON(({x0} {y0}, {x0 + 50} {y0}, {x0 + 50} {y0 + 50}, "
                                            f"{x0} {y0}))"))
    feature["class"] = "water"
    assert labels.addFeature(feature)
    assert "water (1)" in form.classes_label.text()  # drawn: counted at once
    fid = next(labels.getFeatures()).id()
    labels.changeAttributeValue(fid, labels.fields().indexOf("class"), "land")
    assert "water (0)" in form.classes_label.text() and "land (1)" in form.classes_label.text()
    from sarmae_qgis.styling import mark_output

    result = QgsRasterLayer(str(assets / "scene.tif"), "classes", "gdal")
    mark_output(result, "class")  # a run's output is not offered for training
    project.addMapLayer(result)
    assert [form.raster_list.item(i).text() for i in range(form.raster_list.count())] == ["scene"]
    project.removeMapLayer(scene.id())
    assert form.raster_list.count() == 0
    run_models = [panel.run_form.model_combo.itemText(i) for i in range(panel.run_form.model_combo.count())]
    shutil.copytree(assets / "segment.pkg", models / "segment_new")
    panel.refresh_models()
    again = [panel.run_form.model_combo.itemText(i) for i in range(panel.run_form.model_combo.count())]
    assert len(again) == len(run_models) + 1
    labels.rollBack()


def test_a_model_installed_elsewhere_is_listed_without_a_click(qgis_iface, assets, models, project, open_panel):
    """A model that lands in the models folder from outside the panel (Processing's fine-tune, a file
    manager) appears in the lists: the panel watches the folder (issue 16, stale lists)."""
    import time

    from qgis.PyQt.QtCore import QCoreApplication

    panel = open_panel(models)
    combo = panel.run_form.model_combo
    before = combo.count()
    shutil.copytree(assets / "segment.pkg", models / "from_processing")
    deadline = time.monotonic() + 30
    while combo.count() == before and time.monotonic() < deadline:
        QCoreApplication.processEvents()
        time.sleep(0.05)
    assert combo.count() == before + 1


def test_the_wheel_scrolls_the_panel_not_the_encoder(qgis_iface, models, project, open_panel):
    """In the desktop, scrolling down the Fine-tune tab over the encoder combo switched it to
    'random initialisation' without a click."""
    from qgis.PyQt.QtCore import QPoint, QPointF, Qt
    from qgis.PyQt.QtGui import QWheelEvent
    from qgis.PyQt.QtWidgets import QApplication

    panel = open_panel(models)
    panel.show()
    combo = panel.finetune_form.encoder_combo
    assert combo.count() >= 2
    before = combo.currentIndex()

    def wheel() -> None:
        event = QWheelEvent(QPointF(5, 5), QPointF(combo.mapToGlobal(QPoint(5, 5))), QPoint(0, -120),
                            QPoint(0, -120), Qt.NoButton, Qt.NoModifier, Qt.NoScrollPhase, False)
        QApplication.sendEvent(combo, event)

    wheel()
    assert combo.currentIndex() == before  # not focused: the wheel goes to the scroll area
    combo.setFocus()
    QCoreApplication.processEvents()
    if combo.hasFocus():  # offscreen platforms may refuse focus to an inactive window
        wheel()
        assert combo.currentIndex() != before
    # the guard itself, whatever the platform does with focus: a focused field takes the wheel
    from qgis.PyQt.QtWidgets import QComboBox

    from sarmae_qgis.gui.dock_panel import WheelGuard

    class Focused(QComboBox):
        def hasFocus(self) -> bool:  # noqa: N802  # Qt API
            return True

    event = QWheelEvent(QPointF(5, 5), QPointF(5, 5), QPoint(0, -120), QPoint(0, -120), Qt.NoButton,
                        Qt.NoModifier, Qt.NoScrollPhase, False)
    guard, focused, unfocused = WheelGuard(), Focused(), QComboBox()
    assert guard.eventFilter(focused, event) is False and guard.eventFilter(unfocused, event) is True


def test_text_search_tab_draws_only_its_own_fields(qgis_iface, models, project, open_panel):
    """In the desktop the Text search tab drew the Run form's unused fields at its top-left corner."""
    panel = open_panel(models)
    panel.show()
    panel.show_tab("Text search")
    form = panel.text_form
    for widget in (form.extent_combo, form.polygon_combo, form.vectors_check, form.classes_edit, form.window_spin):
        assert not widget.isVisibleTo(form)
    assert form.query_edit.isVisibleTo(form) and form.layer_combo.isVisibleTo(form)
    assert panel.run_form.model_picker.browse_button.text() == "…"  # the combo gets the dock's width


def test_text_search_tab_offers_example_phrases(qgis_iface, models, project, open_panel):
    """Issue 16, resources/: the Text search tab lists the phrases of resources/prompts/text_search.json
    (a drop-down that adds the one picked to Find, and completion while typing); the Run form's own
    Find by text completes them too but shows no list."""
    from sarmae_qgis.toolbelt.resources import resource, text_search_phrases

    phrases = text_search_phrases()
    assert resource("prompts", "text_search.json").is_file()
    assert {"water", "flooded fields", "a ship on open water", "urban area", "forest"} <= set(phrases)
    panel = open_panel(models)
    panel.show()
    panel.show_tab("Text search")
    form = panel.text_form
    combo = form.examples_combo
    assert combo.isVisibleTo(form) and combo.itemText(0) == "Examples…"
    assert [combo.itemText(i) for i in range(1, combo.count())] == list(phrases)
    combo.activated.emit(phrases.index("water") + 1)  # picked: into Find, the list back at "Examples…"
    combo.activated.emit(phrases.index("forest") + 1)
    combo.activated.emit(phrases.index("water") + 1)  # already there: not twice
    assert form.query_edit.text() == "water; forest" and combo.currentIndex() == 0
    completer = form.query_edit.completer()
    completer.setCompletionPrefix("ship")  # contains, not only starts with
    found = {completer.completionModel().index(i, 0).data() for i in range(completer.completionCount())}
    assert "a ship on open water" in found and "ships at sea" in found and "water" not in found
    assert panel.run_form.query_edit.completer() is not None and not panel.run_form.examples_combo.isVisibleTo(
        panel.run_form)
