"""The plugin object QGIS creates through :func:`sarmae_qgis.classFactory`.

``initGui`` adds a "SARMAE" submenu under *Raster* and a "SARMAE" toolbar; ``unload`` removes
every action, menu entry and toolbar that ``initGui`` added, so that reloading the plugin
(Plugin Reloader, or disable/enable in the Plugin Manager) leaves nothing behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction, QToolBar

from .gui.about_dialog import ICON_PATH, AboutDialog
from .toolbelt import log
from .toolbelt.metadata import plugin_version

if TYPE_CHECKING:
    from qgis.gui import QgisInterface

MENU_NAME = "&SARMAE"
"""Submenu title under *Raster* (the ampersand gives the Alt+S shortcut)."""

TOOLBAR_NAME = "SARMAE"
TOOLBAR_OBJECT_NAME = "SarmaeToolbar"


class SarmaePlugin:
    """Menu, toolbar and dialogs of the SARMAE plugin."""

    def __init__(self, iface: QgisInterface) -> None:
        """Keep a reference to the QGIS interface; nothing is built before :meth:`initGui`."""
        self.iface = iface
        self.actions: list[QAction] = []
        self.toolbar: QToolBar | None = None
        self.about_action: QAction | None = None

    def initGui(self) -> None:  # noqa: N802  # name required by QGIS
        """Create the actions, the Raster > SARMAE submenu and the SARMAE toolbar."""
        main_window = self.iface.mainWindow()
        self.toolbar = self.iface.addToolBar(TOOLBAR_NAME)
        self.toolbar.setObjectName(TOOLBAR_OBJECT_NAME)
        self.toolbar.setToolTip("SARMAE SAR foundation model tools")

        self.about_action = QAction(QIcon(str(ICON_PATH)), "About SARMAE…", main_window)
        self.about_action.setObjectName("SarmaeAboutAction")
        self.about_action.setStatusTip("Version and links of the SARMAE plugin")
        self.about_action.triggered.connect(self.show_about)
        self._add_action(self.about_action, to_toolbar=True)
        log.info(f"SARMAE plugin {plugin_version()} loaded")

    def _add_action(self, action: QAction, to_toolbar: bool) -> None:
        """Register ``action`` in the Raster > SARMAE menu (and the toolbar if asked)."""
        self.iface.addPluginToRasterMenu(MENU_NAME, action)
        if to_toolbar and self.toolbar is not None:
            self.toolbar.addAction(action)
        self.actions.append(action)

    def unload(self) -> None:
        """Remove everything :meth:`initGui` added to the QGIS interface."""
        for action in self.actions:
            # QGIS deletes the SARMAE submenu itself when its last action is removed.
            self.iface.removePluginRasterMenu(MENU_NAME, action)
            action.deleteLater()
        self.actions.clear()
        self.about_action = None
        if self.toolbar is not None:
            self.iface.mainWindow().removeToolBar(self.toolbar)
            self.toolbar.deleteLater()
            self.toolbar = None

    def show_about(self) -> None:
        """Open the About box (modal); it is deleted when closed."""
        dialog = AboutDialog(self.iface.mainWindow())
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        dialog.exec_()
