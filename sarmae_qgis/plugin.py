"""The plugin object QGIS creates through :func:`sarmae_qgis.classFactory`.

``initProcessing`` registers the Processing provider ``sarmae`` (``qgis_process`` calls only this,
with no ``iface``); ``initGui`` calls it too, then adds a "SARMAE" submenu under *Raster* (Run
model…, Settings…, About) and a "SARMAE" toolbar. ``unload`` removes every action, menu entry,
toolbar and the provider, and stops the engine worker, so that reloading the plugin (Plugin
Reloader, or disable/enable in the Plugin Manager) leaves nothing behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction, QToolBar

from .gui.about_dialog import ICON_PATH, AboutDialog
from .toolbelt import log
from .toolbelt.engine import shutdown_client
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
        self.provider: SarmaeProvider | None = None
        self.tasks: list[RunTask] = []  # running tasks (kept alive until they finish)

    # ---- Processing ---------------------------------------------------------------------------
    def initProcessing(self) -> None:  # noqa: N802  # name required by QGIS
        """Register the Processing provider ``sarmae`` (once)."""
        from .processing.provider import SarmaeProvider

        if self.provider is None:
            self.provider = SarmaeProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    # ---- GUI ----------------------------------------------------------------------------------
    def initGui(self) -> None:  # noqa: N802  # name required by QGIS
        """Create the provider, the actions, the Raster > SARMAE submenu and the SARMAE toolbar."""
        self.initProcessing()
        main_window = self.iface.mainWindow()
        self.toolbar = self.iface.addToolBar(TOOLBAR_NAME)
        self.toolbar.setObjectName(TOOLBAR_OBJECT_NAME)
        self.toolbar.setToolTip("SARMAE SAR foundation model tools")
        icon = QIcon(str(ICON_PATH))

        self.run_action = QAction(icon, "Run model…", main_window)
        self.run_action.setObjectName("SarmaeRunModelAction")
        self.run_action.setStatusTip("Run a SARMAE model package on a raster layer")
        self.run_action.triggered.connect(self.show_run_dialog)
        self._add_action(self.run_action, to_toolbar=True)

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
        self.about_action = self.run_action = self.settings_action = None
        if self.toolbar is not None:
            self.iface.mainWindow().removeToolBar(self.toolbar)
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        for task in self.tasks:
            task.cancel()
        self.tasks.clear()
        shutdown_client()

    # ---- actions ------------------------------------------------------------------------------
    def show_run_dialog(self) -> None:
        """Open the Run model dialog; on Run, start a background task for its request."""
        from .gui.run_dialog import RunDialog

        dialog = RunDialog(self.iface.mainWindow())
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        if dialog.exec_() and dialog.request is not None:
            self.start_run(dialog.request)

    def start_run(self, request) -> RunTask:
        """Queue a :class:`RunTask` in QGIS's task manager (progress and cancel live there)."""
        from .tasks.run_task import RunTask

        task = RunTask(request, message_bar=self.iface.messageBar())
        self.tasks = [t for t in self.tasks if not t.is_done] + [task]
        QgsApplication.taskManager().addTask(task)
        return task

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
