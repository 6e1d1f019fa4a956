"""The SARMAE dock panel: Run, Fine-tune and Similarity as tabs of one non-modal panel.

The convention of Deepness and the GeoAI plugin: the analyst keeps the panel beside the map,
switches between running a model, fine-tuning on the polygons just drawn and searching for
similar places, and the forms keep their choices (a failed fine-tuning leaves its settings and
the reason right there, instead of in a closed dialog). Each tab is the same form as the modal
dialog (``embedded=True``: its button emits the request instead of closing), inside a scroll area
so that a narrow dock stays usable. The panel remembers its tab (QgsSettings ``sarmae/panel/tab``)
and QGIS restores its place and visibility with the window state (its object name is fixed).
There is no Text search tab: SARCLIP text search comes with the SARCLIP models.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qgis.gui import QgsDockWidget
from qgis.PyQt.QtCore import Qt, QUrl
from qgis.PyQt.QtGui import QDesktopServices
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFormLayout,
    QFrame,
    QScrollArea,
    QTabWidget,
    QToolButton,
    QWidget,
)

from ..toolbelt import settings
from ..toolbelt.resources import resource
from .finetune_dialog import FinetuneDialog
from .run_dialog import RunDialog
from .similarity_tool import SimilarityDialog

OBJECT_NAME = "SarmaeDockPanel"
TABS = ("Run", "Fine-tune", "Similarity")


def _narrow(form: QWidget) -> None:
    """Let a form shrink to a dock's width: combo boxes size to a short text, not their longest item,
    and a form's labels go above their fields when a row does not fit beside."""
    for layout in form.findChildren(QFormLayout):
        layout.setRowWrapPolicy(QFormLayout.WrapLongRows)
    for combo in form.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(8)


def _scrolled(widget: QWidget, parent: QWidget) -> QScrollArea:
    area = QScrollArea(parent)
    area.setWidget(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarAsNeeded)
    return area


class SarmaePanel(QgsDockWidget):
    """Tabs Run / Fine-tune / Similarity; ``on_run(request)`` and ``on_finetune(request)`` start
    the tasks (the plugin's ``start_run`` / ``start_finetune``)."""

    def __init__(self, parent: QWidget | None = None, canvas=None, message_bar=None,
                 on_run: Callable | None = None, on_finetune: Callable | None = None,
                 models_folder: str | Path | None = None, project=None) -> None:
        super().__init__("SARMAE", parent)
        self.setObjectName(OBJECT_NAME)
        self.setAllowedAreas(Qt.LeftDockWidgetArea | Qt.RightDockWidgetArea)
        self.tabs = QTabWidget(self)
        self.run_form = RunDialog(self, models_folder=models_folder, canvas=canvas, embedded=True)
        self.finetune_form = FinetuneDialog(self, project=project, models_folder=models_folder, embedded=True)
        self.similarity_form = SimilarityDialog(canvas, self, message_bar=message_bar, models_folder=models_folder,
                                                project=project, embedded=True)
        for form, title, tip in (
                (self.run_form, "Run", "Run a model on a raster layer"),
                (self.finetune_form, "Fine-tune", "Fine-tune a model on your labelled polygons"),
                (self.similarity_form, "Similarity", "Click a point or use polygons: map similar places")):
            _narrow(form)
            index = self.tabs.addTab(_scrolled(form, self.tabs), title)
            self.tabs.setTabToolTip(index, tip)
        if on_run is not None:
            self.run_form.requested.connect(on_run)
        if on_finetune is not None:
            self.finetune_form.requested.connect(on_finetune)
        self.help_button = QToolButton(self.tabs)
        self.help_button.setText("?")
        self.help_button.setToolTip("What the tabs do (resources/help/panel.html)")
        self.help_button.clicked.connect(
            lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(resource("help", "panel.html")))))
        self.tabs.setCornerWidget(self.help_button, Qt.TopRightCorner)
        self.setWidget(self.tabs)
        self.setMinimumWidth(360)
        self.tabs.setCurrentIndex(max(0, min(len(TABS) - 1, settings.remembered("panel", "tab", 0))))
        self.tabs.currentChanged.connect(self._on_tab_changed)

    def _on_tab_changed(self, index: int) -> None:
        settings.remember("panel", tab=index)
        if index != TABS.index("Similarity"):
            self.similarity_form.release_tool()  # the map tool belongs to the Similarity tab

    def show_tab(self, name: str, layer=None) -> None:
        """Show the panel on tab ``name`` ("Run", "Fine-tune", "Similarity"), with ``layer`` (a raster
        for Run / Similarity, a polygon layer for Fine-tune) chosen when given."""
        self.tabs.setCurrentIndex(TABS.index(name))
        if layer is not None:
            if name == "Run":
                self.run_form.layer_combo.setLayer(layer)
            elif name == "Fine-tune":
                self.finetune_form.label_combo.setLayer(layer)
            else:
                self.similarity_form.layer_combo.setLayer(layer)
        self.setUserVisible(True)
        self.raise_()

    def show_failure(self, title: str, text: str) -> None:
        """A fine-tuning that failed: the reason in the Fine-tune tab, its settings still there."""
        self.finetune_form.notice.warn(title, text)
        self.show_tab("Fine-tune")

    def release(self) -> None:
        """Before deletion: unset the similarity map tool."""
        self.similarity_form.release_tool()
