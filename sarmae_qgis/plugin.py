"""The plugin object QGIS creates through :func:`sarmae_qgis.classFactory`.

``initProcessing`` registers the Processing provider ``sarmae`` (``qgis_process`` calls only this,
with no ``iface``); ``initGui`` calls it too, then adds a "SARMAE" submenu under *Raster* (SARMAE
panel, Run model…, New label layer…, Fine-tune…, Similarity search…, Models…, Settings…, About)
and a "SARMAE" toolbar. The panel (``gui/dock_panel.py``: Run, Fine-tune and Similarity tabs) is
made on first use and reopened at start-up when it was open; the modal dialogs are shortcuts.
``unload`` removes every action, menu entry, toolbar, the panel and the provider, cancels the
tasks still running and stops the engine worker, so that reloading the plugin (Plugin Reloader,
or disable/enable in the Plugin Manager) leaves nothing behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qgis.core import Qgis, QgsApplication, QgsProject, QgsTask
from qgis.PyQt import sip
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction, QToolBar

from .gui.about_dialog import ICON_PATH, AboutDialog
from .toolbelt import log, messages, settings
from .toolbelt.engine import shutdown_client
from .toolbelt.layers import input_raster
from .toolbelt.metadata import plugin_version

if TYPE_CHECKING:
    from qgis.gui import QgisInterface

    from .processing.provider import SarmaeProvider
    from .tasks.run_task import RunTask

MENU_NAME = "&SARMAE"
"""Submenu title under *Raster* (the ampersand gives the Alt+S shortcut)."""

TOOLBAR_NAME = "SARMAE"
TOOLBAR_OBJECT_NAME = "SarmaeToolbar"


class SarmaePlugin:
    """Menu, toolbar, dialogs and Processing provider of the SARMAE plugin."""

    def __init__(self, iface: QgisInterface | None) -> None:
        """Keep a reference to the QGIS interface (None under ``qgis_process``); nothing is built yet."""
        self.iface = iface
        self.actions: list[QAction] = []
        self.toolbar: QToolBar | None = None
        self.about_action: QAction | None = None
        self.run_action: QAction | None = None
        self.settings_action: QAction | None = None
        self.label_action: QAction | None = None
        self.finetune_action: QAction | None = None
        self.similarity_action: QAction | None = None
        self.models_action: QAction | None = None
        self.similarity_dialog = None  # non-modal: kept while the plugin is loaded
        self.panel_action: QAction | None = None
        self.panel = None  # the dock panel (gui/dock_panel.py), made on first use
        self.provider: SarmaeProvider | None = None
        self.tasks: list[RunTask] = []  # running tasks (kept alive until they finish)

    # ---- Processing ---------------------------------------------------------------------------
    def initProcessing(self) -> None:  # noqa: N802  # name required by QGIS
        """Register the Processing provider ``sarmae`` (once)."""
        from .processing.provider import SarmaeProvider

        if self.provider is None:
            provider = SarmaeProvider()
            # False when a provider with the id is registered already (another copy of the plugin, a
            # reload that lost track of it); the registry then deletes ours: never keep a dead one
            if QgsApplication.processingRegistry().addProvider(provider):
                self.provider = provider
            else:
                log.warning("a Processing provider 'sarmae' is registered already: keeping that one")

    # ---- GUI ----------------------------------------------------------------------------------
    def initGui(self) -> None:  # noqa: N802  # name required by QGIS
        """Create the provider, the actions, the Raster > SARMAE submenu and the SARMAE toolbar."""
        self.initProcessing()
        main_window = self.iface.mainWindow()
        self.toolbar = self.iface.addToolBar(TOOLBAR_NAME)
        self.toolbar.setObjectName(TOOLBAR_OBJECT_NAME)
        self.toolbar.setToolTip("SARMAE SAR foundation model tools")
        icon = QIcon(str(ICON_PATH))

        self.panel_action = QAction(icon, "SARMAE panel", main_window)
        self.panel_action.setObjectName("SarmaePanelAction")
        self.panel_action.setStatusTip("Show the SARMAE panel: Run, Fine-tune and Similarity tabs beside the map")
        self.panel_action.triggered.connect(lambda _checked=False: self.show_panel())
        self._add_action(self.panel_action, to_toolbar=True)

        self.run_action = QAction(icon, "Run model…", main_window)
        self.run_action.setObjectName("SarmaeRunModelAction")
        self.run_action.setStatusTip("Run a SARMAE model package on a raster layer")
        self.run_action.triggered.connect(lambda _checked=False: self.show_run_dialog())
        self._add_action(self.run_action, to_toolbar=True)

        self.label_action = QAction(QgsApplication.getThemeIcon("/mActionNewGeoPackageLayer.svg"),
                                    "New label layer…", main_window)
        self.label_action.setObjectName("SarmaeNewLabelLayerAction")
        self.label_action.setStatusTip("Create a GeoPackage polygon layer with a class field to label examples")
        self.label_action.triggered.connect(self.show_label_layer_dialog)
        self._add_action(self.label_action, to_toolbar=True)

        self.finetune_action = QAction(QgsApplication.getThemeIcon("/mActionOptions.svg"), "Fine-tune…",
                                       main_window)
        self.finetune_action.setObjectName("SarmaeFinetuneAction")
        self.finetune_action.setStatusTip("Fine-tune a SARMAE encoder on your labelled polygons")
        self.finetune_action.triggered.connect(self.show_finetune_dialog)
        self._add_action(self.finetune_action, to_toolbar=True)

        self.similarity_action = QAction(QgsApplication.getThemeIcon("/mActionIdentify.svg"), "Similarity search…",
                                         main_window)
        self.similarity_action.setObjectName("SarmaeSimilarityAction")
        self.similarity_action.setStatusTip("Click a point (or select a polygon) to map similar places in a raster")
        self.similarity_action.triggered.connect(self.show_similarity)
        self._add_action(self.similarity_action, to_toolbar=True)

        self.models_action = QAction(QgsApplication.getThemeIcon("/mActionShowPluginManager.svg"), "Models…",
                                     main_window)
        self.models_action.setObjectName("SarmaeModelsAction")
        self.models_action.setStatusTip("Installed SARMAE model packages: import, export, delete, model cards")
        self.models_action.triggered.connect(self.show_models)
        self._add_action(self.models_action, to_toolbar=False)

        self.settings_action = QAction("Settings…", main_window)
        self.settings_action.setObjectName("SarmaeSettingsAction")
        self.settings_action.setStatusTip("Engine interpreter, models folder and run defaults of SARMAE")
        self.settings_action.triggered.connect(self.show_settings)
        self._add_action(self.settings_action, to_toolbar=False)

        self.about_action = QAction(icon, "About SARMAE…", main_window)
        self.about_action.setObjectName("SarmaeAboutAction")
        self.about_action.setStatusTip("Version and links of the SARMAE plugin")
        self.about_action.triggered.connect(self.show_about)
        self._add_action(self.about_action, to_toolbar=False)
        log.info(f"SARMAE plugin {plugin_version()} loaded")
        if settings.remembered("panel", "visible", False):
            self.show_panel()

    def _add_action(self, action: QAction, to_toolbar: bool) -> None:
        """Register ``action`` in the Raster > SARMAE menu (and the toolbar if asked)."""
        self.iface.addPluginToRasterMenu(MENU_NAME, action)
        if to_toolbar and self.toolbar is not None:
            self.toolbar.addAction(action)
        self.actions.append(action)

    def unload(self) -> None:
        """Remove everything :meth:`initGui` / :meth:`initProcessing` added, stop the engine."""
        for action in self.actions:
            # QGIS deletes the SARMAE submenu itself when its last action is removed.
            self.iface.removePluginRasterMenu(MENU_NAME, action)
            action.deleteLater()
        self.actions.clear()
        self.about_action = self.run_action = self.settings_action = self.panel_action = None
        if self.panel is not None:
            settings.remember("panel", visible=not self.panel.isHidden())  # reopened at the next start
            self.panel.release()
            self.iface.removeDockWidget(self.panel)
            self.panel.deleteLater()
            self.panel = None
        self.label_action = self.finetune_action = self.similarity_action = self.models_action = None
        if self.similarity_dialog is not None:
            self.similarity_dialog.release_tool()
            self.similarity_dialog.close()
            self.similarity_dialog.deleteLater()
            self.similarity_dialog = None
        from .tasks.similarity_task import STATS

        cancel_tasks(STATS.running)  # searches from the dialog AND from the panel's Similarity tab
        STATS.running = []
        if self.toolbar is not None:
            self.iface.mainWindow().removeToolBar(self.toolbar)
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.provider is not None and not sip.isdeleted(self.provider):
            QgsApplication.processingRegistry().removeProvider(self.provider)
        self.provider = None
        cancel_tasks(self.tasks)
        self.tasks.clear()
        shutdown_client()

    # ---- actions ------------------------------------------------------------------------------
    def show_panel(self, tab: str = "", layer=None):
        """Show the dock panel (made on first use), on ``tab`` when given; returns it."""
        if self.panel is None:
            from .gui.dock_panel import SarmaePanel

            self.panel = SarmaePanel(self.iface.mainWindow(), canvas=self.iface.mapCanvas(),
                                     message_bar=self.iface.messageBar(), on_run=self.start_run,
                                     on_finetune=self.start_finetune)
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.panel)
            first = input_raster(self.iface.activeLayer())
            if first is not None:
                self.panel.run_form.layer_combo.setLayer(first)
                self.panel.similarity_form.layer_combo.setLayer(first)
        if tab:
            self.panel.show_tab(tab, layer)
        else:
            self.panel.setUserVisible(True)
            self.panel.raise_()
        return self.panel

    def show_run_dialog(self, layer=None, model: str | None = None) -> None:
        """Open the Run model dialog on ``layer`` (default: the selected raster layer), optionally
        with a model chosen; on Run, start a background task for its request."""
        from .gui.run_dialog import RunDialog

        if layer is None:
            layer = input_raster(self.iface.activeLayer())
        dialog = RunDialog(self.iface.mainWindow(), canvas=self.iface.mapCanvas(), layer=layer)
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        if model:
            dialog.add_model(model)
        if dialog.exec_() and dialog.request is not None:
            self.start_run(dialog.request)

    def start_run(self, request) -> RunTask:
        """Queue a :class:`RunTask` in QGIS's task manager (progress and cancel live there)."""
        from .tasks.run_task import RunTask

        task = RunTask(request, message_bar=self.iface.messageBar())
        self.tasks = [t for t in self.tasks if not t.is_done] + [task]
        QgsApplication.taskManager().addTask(task)
        return task

    def show_label_layer_dialog(self) -> None:
        """New label layer: a GeoPackage with a class value map, added in edit mode and made active."""
        from .gui.label_layer_dialog import LabelLayerDialog

        dialog = LabelLayerDialog(self.iface.mainWindow())
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        first = input_raster(self.iface.activeLayer())
        if first is not None:
            dialog.raster_combo.setLayer(first)
        if dialog.exec_() and dialog.layer is not None:
            self.iface.setActiveLayer(dialog.layer)
            self.iface.actionAddFeature().trigger()  # the "add polygon" tool, ready to draw
            messages.push(self.iface.messageBar(), "SARMAE", "draw polygons, a class for each (right-click ends one), "
                          "then Fine-tune in the SARMAE panel", Qgis.Info, 15)

    def show_finetune_dialog(self) -> None:
        """Fine-tune dialog -> a background FinetuneTask with a live progress line."""
        from .gui.finetune_dialog import FinetuneDialog

        dialog = FinetuneDialog(self.iface.mainWindow())
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        active = self.iface.activeLayer()
        if active is not None and active.type() == active.VectorLayer:
            dialog.label_combo.setLayer(active)
        if dialog.exec_() and dialog.request is not None:
            self.start_finetune(dialog.request)

    def start_finetune(self, request):
        """Queue a FinetuneTask; its epochs show in a message-bar line; the results dialog follows."""
        from .tasks.finetune_task import FinetuneTask

        bar = self.iface.messageBar()
        item = bar.createMessage("SARMAE", f"fine-tuning '{request.name}' (Task Manager: progress and cancel)…")
        bar.pushWidget(item, Qgis.Info)
        task = FinetuneTask(request, message_bar=bar, on_done=self._finetune_done)
        task.progress_line = (bar, item)  # closed when it ends, before the results dialog opens

        # one line, whatever the epoch's text: a wrapped second line was cut in half by the bar
        task.status.connect(messages.line_updater(bar, item, "SARMAE", f"fine-tuning '{request.name}': "))
        self.tasks = [t for t in self.tasks if not t.is_done] + [task]
        QgsApplication.taskManager().addTask(task)
        return task

    def _finetune_done(self, task) -> None:
        line = getattr(task, "progress_line", None)
        if line is not None:  # the "fine-tuning…" line must not outlive the training (issue 16, item 4)
            _close(*line)
        if task.result is None:
            from .engine_client import EngineError
            from .tasks.finetune_task import gui_text

            cancelled = (isinstance(task.error, EngineError) and task.error.cancelled) or task.error is None
            if not cancelled:  # the reason beside the form, with the settings as they were
                self.show_panel().show_failure(f"Fine-tuning '{task.request.name}' failed", gui_text(str(task.error)))
            return
        if self.panel is not None:  # the new model in the Run tab's list (and the encoders')
            self.panel.refresh_models()
        # after QGIS's task manager has let the task go: shown from the task's ``finished``, the
        # modal dialog held the status bar's progress at 100 % while it was open
        QTimer.singleShot(0, lambda: self._show_finetune_results(task))

    def _show_finetune_results(self, task) -> None:
        from .gui.finetune_results import FinetuneResultDialog

        layers = QgsProject.instance().mapLayersByName(task.request.layer_name)
        dialog = FinetuneResultDialog(task, self.iface.mainWindow(), can_run=bool(layers))
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        if dialog.exec_() and layers:
            self.show_run_dialog(layers[0], task.request.output)

    def show_similarity(self) -> None:
        """The similarity search panel (non-modal): pick a point or use selected polygons."""
        from .gui.similarity_tool import SimilarityDialog

        if self.similarity_dialog is None:
            self.similarity_dialog = SimilarityDialog(self.iface.mapCanvas(), self.iface.mainWindow(),
                                                      message_bar=self.iface.messageBar())
        first = input_raster(self.iface.activeLayer())
        if first is not None:
            self.similarity_dialog.layer_combo.setLayer(first)
        self.similarity_dialog.show()
        self.similarity_dialog.raise_()

    def show_models(self) -> None:
        """The Models dialog (modal): list, import folder/zip, export, delete, model cards."""
        from .gui.models_dialog import ModelsDialog

        dialog = ModelsDialog(self.iface.mainWindow())
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        dialog.exec_()
        if self.panel is not None:  # imported or deleted packages
            self.panel.refresh_models()

    def show_settings(self) -> None:
        """Open the settings dialog (modal)."""
        from .gui.settings_dialog import SettingsDialog

        dialog = SettingsDialog(self.iface.mainWindow())
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        dialog.exec_()

    def show_about(self) -> None:
        """Open the About box (modal); it is deleted when closed."""
        dialog = AboutDialog(self.iface.mainWindow())
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        dialog.exec_()


def cancel_tasks(tasks) -> int:
    """Cancel the tasks still running; finished ones (whose C++ object QGIS may have deleted
    already) are skipped. Returns how many were cancelled. Never raises: unload must not fail."""
    n = 0
    for task in tasks:
        try:
            if sip.isdeleted(task) or getattr(task, "is_done", False):
                continue
            # QgsTask.status(task): FinetuneTask's ``status`` attribute is its progress-text signal
            if QgsTask.status(task) in (QgsTask.Complete, QgsTask.Terminated):
                continue
            task.cancel()
            n += 1
        except (RuntimeError, TypeError) as e:  # deleted between the check and the call
            log.info(f"unload: task not cancelled ({e})")
            continue
    return n


def _close(bar, item) -> None:
    try:
        bar.popWidget(item)
    except RuntimeError:  # already closed by the user
        pass
