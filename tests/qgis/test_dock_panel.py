"""The SARMAE dock panel: Run, Fine-tune and Similarity tabs, non-modal, remembering its state."""

from __future__ import annotations

import shutil

import pytest
from qgis.core import QgsRasterLayer, QgsSettings
from qgis.gui import QgsDockWidget
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QCoreApplication, QEvent

import sarmae_qgis
from sarmae_qgis.gui.dock_panel import TABS, SarmaePanel
from sarmae_qgis.tasks.run_task import RunRequest

pytestmark = pytest.mark.qgis


@pytest.fixture(autouse=True)
def fresh_panel_state():
    QgsSettings().remove("sarmae/panel")
    QgsSettings().remove("sarmae/finetune")
    yield
    QgsSettings().remove("sarmae/panel")
    QgsSettings().remove("sarmae/finetune")


@pytest.fixture
def models(assets, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("segment.pkg", "encoder.pkg"):
        shutil.copytree(assets / name, folder / name)
    return folder


def flush_deletes() -> None:
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)


def test_tabs_run_and_stay_open(qgis_iface, assets, models, project, tmp_path):
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayer(scene)
    runs: list = []
    panel = SarmaePanel(qgis_iface.mainWindow(), canvas=qgis_iface.mapCanvas(), on_run=runs.append,
                        models_folder=models, project=project)
    try:
        assert isinstance(panel, QgsDockWidget)
        assert [panel.tabs.tabText(i) for i in range(panel.tabs.count())] == list(TABS)
        assert "Text" not in " ".join(TABS)  # no placeholder tab: text search comes with SARCLIP models
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
    finally:
        panel.release()
        panel.deleteLater()
        flush_deletes()


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


def test_forms_fit_a_narrow_dock_and_offer_the_sar_image_first(qgis_iface, assets, models, project):
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
    panel = SarmaePanel(qgis_iface.mainWindow(), canvas=qgis_iface.mapCanvas(), models_folder=models, project=project)
    try:
        for form in (panel.run_form, panel.finetune_form, panel.similarity_form):
            assert form.minimumSizeHint().width() <= panel.minimumWidth() - 20, type(form).__name__
    finally:
        panel.release()
        panel.deleteLater()
        flush_deletes()
