"""The SARMAE dock panel: Run, Fine-tune, Similarity and Text search as tabs of one non-modal panel.

The convention of Deepness and the GeoAI plugin: the analyst keeps the panel beside the map,
switches between running a model, fine-tuning on the polygons just drawn and searching for
similar places, and the forms keep their choices (a failed fine-tuning leaves its settings and
the reason right there, instead of in a closed dialog). Each tab is the same form as the modal
dialog (``embedded=True``: its button emits the request instead of closing), inside a scroll area
so that a narrow dock stays usable (labels above their fields: the fields take the dock's width).
The panel remembers its tab (QgsSettings ``sarmae/panel/tab``) and QGIS restores its place and
visibility with the window state (its object name is fixed). Text search is the Run form cut to a
CLIP (zeroshot) model and phrases (``RunDialog(text_search=True)``): the same request and task.
The lists follow the project and the models folder: layers added or removed or a project read (a
raster tab with no layer takes the input raster, the Similarity tab's polygon list a new polygon
layer; the Fine-tune tab's raster list is refreshed; a tab's warning goes when its inputs change), and :meth:`SarmaePanel.refresh_models`
after a model is fine-tuned or installed, here or elsewhere (Processing, another QGIS, a copy in a
file manager: a QFileSystemWatcher on the models folder, debounced).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qgis.core import QgsProject
from qgis.gui import QgsDockWidget
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QEvent, QFileSystemWatcher, QObject, Qt, QTimer, QUrl
from qgis.PyQt.QtGui import QDesktopServices
from qgis.PyQt.QtWidgets import (
    QAbstractSpinBox,
    QComboBox,
    QFormLayout,
    QFrame,
    QScrollArea,
    QTabWidget,
    QToolButton,
    QWidget,
)

from ..toolbelt import settings
from ..toolbelt.layers import input_raster, is_input_raster
from ..toolbelt.resources import resource
from .finetune_dialog import FinetuneDialog
from .package_picker import PackagePicker
from .run_dialog import RunDialog
from .similarity_tool import SimilarityDialog

OBJECT_NAME = "SarmaeDockPanel"
TABS = ("Run", "Fine-tune", "Similarity", "Text search")
REFRESH_DELAY_MS = 500


class WheelGuard(QObject):
    """The mouse wheel scrolls the panel, not the combo box or spin box it passes over: in the
    desktop, scrolling down the Fine-tune tab silently switched the encoder to "random
    initialisation". A field takes the wheel once it has the focus (clicked or tabbed into)."""

    def eventFilter(self, watched, event) -> bool:  # noqa: N802  # Qt API
        if event.type() == QEvent.Wheel and isinstance(watched, QWidget) and not watched.hasFocus():
            event.ignore()  # passed on to the scroll area
            return True
        return False


def _narrow(form: QWidget, guard: WheelGuard) -> None:
    """Let a form shrink to a dock's width: combo boxes size to a short text, not their longest item,
    and a form's labels go above their fields, which take the dock's whole width; fields ignore
    the wheel until focused (:class:`WheelGuard`)."""
    for layout in form.findChildren(QFormLayout):
        layout.setRowWrapPolicy(QFormLayout.WrapAllRows)
    for combo in form.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(8)
    for picker in form.findChildren(PackagePicker):  # the combo gets the width: "Browse…" as "…"
        picker.browse_button.setText("…")
        picker.browse_button.setToolTip(picker.browse_button.toolTip() or "Browse… for a package folder")
        picker.browse_button.setMaximumWidth(32)
    for field in form.findChildren(QComboBox) + form.findChildren(QAbstractSpinBox):
        field.setFocusPolicy(Qt.StrongFocus)
        field.installEventFilter(guard)


def _scrolled(widget: QWidget, parent: QWidget) -> QScrollArea:
    area = QScrollArea(parent)
    area.setWidget(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarAsNeeded)
    return area


class SarmaePanel(QgsDockWidget):
    """Tabs Run / Fine-tune / Similarity / Text search; ``on_run(request)`` (Run and Text search) and
    ``on_finetune(request)`` start the tasks (the plugin's ``start_run`` / ``start_finetune``)."""

    def __init__(self, parent: QWidget | None = None, canvas=None, message_bar=None,
                 on_run: Callable | None = None, on_finetune: Callable | None = None,
                 models_folder: str | Path | None = None, project=None) -> None:
        super().__init__("SARMAE", parent)
        self.setObjectName(OBJECT_NAME)
        self.setAllowedAreas(Qt.LeftDockWidgetArea | Qt.RightDockWidgetArea)
        self.tabs = QTabWidget(self)
        self.wheel_guard = WheelGuard(self)
        self.run_form = RunDialog(self, models_folder=models_folder, canvas=canvas, embedded=True)
        self.finetune_form = FinetuneDialog(self, project=project, models_folder=models_folder, embedded=True)
        self.similarity_form = SimilarityDialog(canvas, self, message_bar=message_bar, models_folder=models_folder,
                                                project=project, embedded=True)
        self.text_form = RunDialog(self, models_folder=models_folder, canvas=canvas, embedded=True, text_search=True)
        for form, title, tip in (
                (self.run_form, "Run", "Run a model on a raster layer"),
                (self.finetune_form, "Fine-tune", "Fine-tune a model on your labelled polygons"),
                (self.similarity_form, "Similarity", "Click a point or use polygons: map similar places"),
                (self.text_form, "Text search", "Type a phrase: map where a CLIP model sees it")):
            _narrow(form, self.wheel_guard)
            index = self.tabs.addTab(_scrolled(form, self.tabs), title)
            self.tabs.setTabToolTip(index, tip)
        if on_run is not None:
            self.run_form.requested.connect(on_run)
            self.text_form.requested.connect(on_run)
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
        self._refresh_timer = QTimer(self)  # a package lands as several files: one refresh after them
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(REFRESH_DELAY_MS)
        self._refresh_timer.timeout.connect(self.refresh_models)
        self.models_watcher = QFileSystemWatcher(self)
        folder = Path(models_folder).expanduser() if models_folder else settings.models_folder()
        if folder.is_dir():
            self.models_watcher.addPath(str(folder))
        self.models_watcher.directoryChanged.connect(lambda _path: self._refresh_timer.start())
        self.project = project or QgsProject.instance()
        self._project_signals = ((self.project.layersAdded, self._on_layers_added),
                                 (self.project.layersRemoved, self._on_layers_removed),
                                 (self.project.readProject, self._on_project_read))
        for signal, slot in self._project_signals:
            signal.connect(slot)
        self._choose_inputs()

    # ---- the project's layers -------------------------------------------------------------------
    def _choose_inputs(self, added=()) -> None:
        """Every raster tab follows the project: with no layer chosen it takes the input raster (a
        raster opened from the command line, or with the project, while the panel was already
        built: its Run, Similarity and Text search lists stayed empty). The polygon lists (Fine-tune,
        Similarity) follow new polygon layers by themselves (``layers.follow_new_polygons``)."""
        if sip.isdeleted(self):
            return
        raster = input_raster(None, self.project) or next(  # layers not (yet) in the layer tree
            (lyr for lyr in list(added) + list(self.project.mapLayers().values()) if is_input_raster(lyr)), None)
        for form in (self.run_form, self.text_form, self.similarity_form):
            if raster is not None and form.layer_combo.currentLayer() is None:
                form.layer_combo.setLayer(raster)

    def _on_layers_added(self, layers) -> None:
        self._choose_inputs(layers)

    def _on_layers_removed(self, _ids) -> None:  # the combo boxes drop the layer; an empty one takes another
        self._choose_inputs()

    def _on_project_read(self, *_args) -> None:
        self._choose_inputs(list(self.project.mapLayers().values()))

    def _on_tab_changed(self, index: int) -> None:
        settings.remember("panel", tab=index)
        if index != TABS.index("Similarity"):
            self.similarity_form.release_tool()  # the map tool belongs to the Similarity tab

    def show_tab(self, name: str, layer=None) -> None:
        """Show the panel on tab ``name`` (one of :data:`TABS`), with ``layer`` (a raster for Run,
        Similarity and Text search, a polygon layer for Fine-tune) chosen when given."""
        self.tabs.setCurrentIndex(TABS.index(name))
        if layer is not None:
            if name == "Run":
                self.run_form.layer_combo.setLayer(layer)
            elif name == "Text search":
                self.text_form.layer_combo.setLayer(layer)
            elif name == "Fine-tune":
                self.finetune_form.label_combo.setLayer(layer)
            else:
                self.similarity_form.layer_combo.setLayer(layer)
        self.setUserVisible(True)
        self.raise_()

    def refresh_models(self) -> None:
        """List the models folder again in every tab (after a fine-tuning or an install), keeping
        each tab's choice when it is still there (Run and Text search: a choice made by hand; else
        the best fit to the layer)."""
        self.run_form.refresh_models()  # re-ranked for the layer unless a model was chosen by hand
        self.text_form.refresh_models()
        self.finetune_form.encoder_picker.refresh(keep_choice=True)
        self.similarity_form.model_picker.refresh(keep_choice=True)

    def show_failure(self, title: str, text: str) -> None:
        """A fine-tuning that failed: the reason in the Fine-tune tab, its settings still there."""
        self.finetune_form.notice.warn(title, text)
        self.show_tab("Fine-tune")

    def release(self) -> None:
        """Before deletion: unset the similarity map tool, stop watching the models folder."""
        self._refresh_timer.stop()
        for signal, slot in self._project_signals:
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass
        if self.models_watcher.directories():
            self.models_watcher.removePaths(self.models_watcher.directories())
        self.similarity_form.release_tool()
