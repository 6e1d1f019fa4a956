"""Load the plugin into pytest-qgis's stub ``iface``: initGui, About box, Processing provider, unload.

The stub ``QgisInterface`` answers unknown methods with MagicMocks, so the Raster-menu calls are
replaced here by a small fake that behaves like QGIS (a submenu per plugin menu name, deleted when
its last action is removed) and builds real ``QMenu`` objects we can inspect.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from qgis.core import Qgis, QgsApplication
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QCoreApplication, QEvent
from qgis.PyQt.QtWidgets import QAction, QMenu, QToolBar

import sarmae_qgis
from sarmae_qgis.gui.about_dialog import AboutDialog
from sarmae_qgis.plugin import MENU_NAME, TOOLBAR_OBJECT_NAME, SarmaePlugin
from sarmae_qgis.processing.provider import ALGORITHMS, PROVIDER_ID
from sarmae_qgis.toolbelt import log
from sarmae_qgis.toolbelt.metadata import plugin_metadata, plugin_version

pytestmark = pytest.mark.qgis
MENU = ["SARMAE panel", "Run model…", "New label layer…", "Fine-tune…", "Similarity search…", "Models…", "Settings…", "About SARMAE…"]


class FakeRasterMenu:
    """Mimics ``iface.addPluginToRasterMenu`` / ``removePluginRasterMenu`` of QGIS."""

    def __init__(self) -> None:
        self.menu = QMenu("&Raster")

    def submenu(self, name: str) -> QMenu | None:
        """The plugin submenu called ``name``, if present."""
        for action in self.menu.actions():
            if action.menu() is not None and action.text() == name:
                return action.menu()
        return None

    def add(self, name: str, action: QAction) -> None:
        """Add ``action`` to the submenu ``name`` (created on first use)."""
        sub = self.submenu(name) or self.menu.addMenu(name)
        sub.addAction(action)

    def remove(self, name: str, action: QAction) -> None:
        """Remove ``action``; drop the submenu when it becomes empty (as QGIS does)."""
        sub = self.submenu(name)
        if sub is None:
            return
        sub.removeAction(action)
        if not sub.actions():
            self.menu.removeAction(sub.menuAction())
            sub.deleteLater()


def flush_deletes() -> None:
    """Run pending ``deleteLater()`` calls now."""
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)


def sarmae_toolbars(qgis_iface) -> list[QToolBar]:
    """Live SARMAE toolbars under the main window."""
    return qgis_iface.mainWindow().findChildren(QToolBar, TOOLBAR_OBJECT_NAME)


@pytest.fixture
def raster_menu(qgis_iface, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRasterMenu]:
    """Route the stub iface's Raster-menu calls to a :class:`FakeRasterMenu`."""
    fake = FakeRasterMenu()
    monkeypatch.setattr(qgis_iface, "addPluginToRasterMenu", fake.add)
    monkeypatch.setattr(qgis_iface, "removePluginRasterMenu", fake.remove)
    yield fake
    fake.menu.deleteLater()
    flush_deletes()


def test_metadata_version() -> None:
    """metadata.txt is found from the dev checkout and parsed."""
    meta = plugin_metadata()
    assert meta["name"] == "SARMAE"
    assert meta["qgisMinimumVersion"] == "3.22"
    assert plugin_version() == "0.1.0"


def test_class_factory_init_gui_and_unload(qgis_app, qgis_iface, raster_menu) -> None:
    """classFactory -> initGui adds menu, action and toolbar; unload removes all of them."""
    before = len(sarmae_toolbars(qgis_iface))
    plugin = sarmae_qgis.classFactory(qgis_iface)
    assert isinstance(plugin, SarmaePlugin)
    assert raster_menu.submenu(MENU_NAME) is None  # nothing before initGui

    plugin.initGui()
    sub = raster_menu.submenu(MENU_NAME)
    assert sub is not None
    assert [a.text() for a in sub.actions()] == MENU
    assert plugin.about_action in sub.actions()
    toolbars = sarmae_toolbars(qgis_iface)
    assert len(toolbars) == before + 1
    assert plugin.toolbar is not None and plugin.run_action in plugin.toolbar.actions()
    assert QgsApplication.processingRegistry().providerById(PROVIDER_ID) is not None
    actions = list(plugin.actions)
    toolbar = plugin.toolbar

    plugin.unload()
    flush_deletes()
    assert raster_menu.submenu(MENU_NAME) is None
    assert raster_menu.menu.actions() == []
    assert plugin.actions == [] and plugin.toolbar is None
    assert sip.isdeleted(toolbar)
    assert all(sip.isdeleted(a) for a in actions)
    assert len(sarmae_toolbars(qgis_iface)) == before
    assert QgsApplication.processingRegistry().providerById(PROVIDER_ID) is None


def test_init_gui_twice_after_unload(qgis_iface, raster_menu) -> None:
    """A reload (unload then initGui again) leaves exactly one menu entry and one toolbar."""
    plugin = sarmae_qgis.classFactory(qgis_iface)
    plugin.initGui()
    plugin.unload()
    plugin.initGui()
    flush_deletes()
    assert len(raster_menu.submenu(MENU_NAME).actions()) == len(MENU)
    assert len(sarmae_toolbars(qgis_iface)) == 1
    registry = QgsApplication.processingRegistry()
    assert [p.id() for p in registry.providers()].count(PROVIDER_ID) == 1
    plugin.unload()
    flush_deletes()
    assert sarmae_toolbars(qgis_iface) == []
    assert registry.providerById(PROVIDER_ID) is None
    assert not [a for a in registry.algorithms() if a.provider() is not None and a.id().startswith("sarmae:")]


def test_processing_only_load_like_qgis_process(qgis_app) -> None:
    """qgis_process: classFactory(None) then initProcessing() only; every algorithm is there with help."""
    registry = QgsApplication.processingRegistry()
    plugin = sarmae_qgis.classFactory(None)
    plugin.initProcessing()
    plugin.initProcessing()  # idempotent (initGui calls it too)
    try:
        provider = registry.providerById(PROVIDER_ID)
        assert provider is not None and provider.name() == "SARMAE" and not provider.icon().isNull()
        ids = sorted(a.id() for a in provider.algorithms())
        assert ids == sorted(f"sarmae:{cls.NAME}" for cls in ALGORITHMS)
        assert {"sarmae:segment", "sarmae:detect", "sarmae:classify", "sarmae:embed", "sarmae:similarity",
                "sarmae:finetune", "sarmae:pretrain", "sarmae:export_onnx"} <= set(ids)
        for alg in provider.algorithms():
            assert len(alg.shortHelpString()) > 100, alg.id()
            assert alg.group() and alg.displayName()
            assert alg.flags() & alg.FlagSupportsBatch and alg.flags() & alg.FlagCanCancel
            assert alg.createInstance().name() == alg.name()
        assert provider.supportedOutputRasterLayerExtensions() == ["tif"]
    finally:
        plugin.unload()  # no iface: only the provider (and the engine) to remove
    assert registry.providerById(PROVIDER_ID) is None


def test_about_dialog_shows_version(qgis_app, qgis_iface) -> None:
    """The About box (built, not executed) shows name, version and links."""
    dialog = AboutDialog(qgis_iface.mainWindow())
    try:
        assert dialog.version == "0.1.0"
        assert "Version 0.1.0" in dialog.text()
        assert "SARMAE" in dialog.windowTitle()
        assert "https://github.com/sarmae/sarmae/issues" in dialog.text()
        dialog.show()  # offscreen: renders without blocking
        assert dialog.isVisible()
    finally:
        dialog.close()
        dialog.deleteLater()
        flush_deletes()


def test_about_action_opens_dialog(qgis_iface, raster_menu, monkeypatch) -> None:
    """Triggering the About action opens an AboutDialog (exec_ patched so nothing blocks)."""
    opened: list[AboutDialog] = []
    monkeypatch.setattr(AboutDialog, "exec_", lambda self: opened.append(self) or 0)
    plugin = sarmae_qgis.classFactory(qgis_iface)
    plugin.initGui()
    try:
        plugin.about_action.trigger()
        assert len(opened) == 1 and "0.1.0" in opened[0].text()
    finally:
        for dialog in opened:
            dialog.close()
        plugin.unload()
        flush_deletes()


@pytest.mark.parametrize("action, module, cls", [
    ("run_action", "sarmae_qgis.gui.run_dialog", "RunDialog"),
    ("label_action", "sarmae_qgis.gui.label_layer_dialog", "LabelLayerDialog"),
    ("finetune_action", "sarmae_qgis.gui.finetune_dialog", "FinetuneDialog"),
    ("models_action", "sarmae_qgis.gui.models_dialog", "ModelsDialog"),
    ("settings_action", "sarmae_qgis.gui.settings_dialog", "SettingsDialog"),
])
def test_each_menu_action_opens_its_dialog(qgis_iface, raster_menu, monkeypatch, tmp_path, action, module, cls) -> None:
    """Every modal dialog opens from its action (exec_ patched: cancelled at once, nothing runs)."""
    import importlib

    from sarmae_qgis.toolbelt import settings

    monkeypatch.setattr(settings, "models_folder", lambda s=None: tmp_path / "models")
    dialog_class = getattr(importlib.import_module(module), cls)
    opened: list = []
    monkeypatch.setattr(dialog_class, "exec_", lambda self: opened.append(self) or 0)
    plugin = sarmae_qgis.classFactory(qgis_iface)
    plugin.initGui()
    try:
        getattr(plugin, action).trigger()
        assert len(opened) == 1 and isinstance(opened[0], dialog_class)
    finally:
        for dialog in opened:
            dialog.close()
        plugin.unload()
        flush_deletes()


def test_similarity_panel_is_released_on_unload(qgis_iface, raster_menu) -> None:
    """The non-modal similarity panel opens once, and unload closes it and its map tool."""
    plugin = sarmae_qgis.classFactory(qgis_iface)
    plugin.initGui()
    plugin.similarity_action.trigger()
    panel = plugin.similarity_dialog
    assert panel is not None and panel.isVisible()
    plugin.similarity_action.trigger()
    assert plugin.similarity_dialog is panel  # the same panel is raised again
    plugin.unload()
    flush_deletes()
    assert plugin.similarity_dialog is None and sip.isdeleted(panel)


def test_log_goes_to_sarmae_tab(qgis_app) -> None:
    """Messages reach QgsMessageLog under the "SARMAE" tag, from both APIs."""
    received: list[tuple[str, str, Qgis.MessageLevel]] = []

    def on_message(message: str, tag: str, level: Qgis.MessageLevel) -> None:
        received.append((message, tag, level))

    message_log = QgsApplication.messageLog()
    message_log.messageReceived.connect(on_message)
    try:
        log.warning("low disk space")
        log.get_logger().error("engine crashed")
    finally:
        message_log.messageReceived.disconnect(on_message)
    assert ("low disk space", "SARMAE", Qgis.Warning) in received
    assert ("engine crashed", "SARMAE", Qgis.Critical) in received


def _wait(condition, seconds: float = 60.0) -> None:

    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        QCoreApplication.processEvents()
        time.sleep(0.02)


def test_unload_is_safe_with_finished_cancelled_and_running_tasks(qgis_iface, raster_menu, tmp_path) -> None:
    """Issue 16, item 3: unload() called task.cancel() on a finished task whose C++ object the task
    manager had deleted ("wrapped C/C++ object of type FinetuneTask has been deleted")."""
    from qgis.core import QgsTask

    from sarmae_qgis.tasks.finetune_task import FinetuneRequest, FinetuneTask

    plugin = sarmae_qgis.classFactory(qgis_iface)
    plugin.initGui()
    manager = QgsApplication.taskManager()

    def failing_finetune(name: str) -> FinetuneTask:
        return FinetuneTask(FinetuneRequest(name=name, task="segment", rasters=(str(tmp_path / "gone.tif"),),
                                            labels=str(tmp_path / "labels.gpkg"), class_field="class",
                                            output=str(tmp_path / "models" / name), run_dir=str(tmp_path / name)))

    finished = failing_finetune("finished")
    manager.addTask(finished)
    _wait(lambda: sip.isdeleted(finished) or finished.is_done)
    flush_deletes()
    cancelled = failing_finetune("cancelled")
    manager.addTask(cancelled)
    cancelled.cancel()

    def wait_for_cancel(task):
        deadline = time.monotonic() + 30  # bounded: a broken unload fails the test instead of hanging it
        while not task.isCanceled() and time.monotonic() < deadline:
            time.sleep(0.02)
        return task.isCanceled()

    running = QgsTask.fromFunction("SARMAE test: waits to be cancelled", wait_for_cancel)
    manager.addTask(running)
    _wait(lambda: running.status() == QgsTask.Running, 10)
    plugin.tasks = [finished, cancelled, running]

    plugin.unload()  # must not raise
    from sarmae_qgis.plugin import cancel_tasks

    queued = failing_finetune("queued")  # not started: its ``status`` attribute is a signal, not QgsTask.status
    assert cancel_tasks([queued]) == 1 and queued.isCanceled()
    _wait(lambda: sip.isdeleted(running) or running.status() in (QgsTask.Terminated, QgsTask.Complete), 10)
    assert sip.isdeleted(running) or running.isCanceled()
    assert plugin.tasks == []
    flush_deletes()
