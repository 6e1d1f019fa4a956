"""The Fine-tune form (rasters + label layer + encoder + mode + budget -> FinetuneRequest), as a
dialog or as the dock panel's Fine-tune tab (``embedded=True``: it stays open and emits ``requested``).
Its training-data widgets and checks are in ``training_data.py``, the results in ``finetune_results.py``.
:meth:`FinetuneDialog.build_request` refuses before training what training would (no raster, one not a
file, no label layer or class field, labels refused by ``training_data.check_labels``, an encoder the
rasters cannot feed, a name taken), naming the form's settings, never a command-line flag. Choices are
remembered (QgsSettings ``sarmae/finetune/...``); the labels are snapshotted into the run folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from qgis.core import QgsMapLayerProxyModel, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.gui import QgsCollapsibleGroupBox, QgsFieldComboBox, QgsMapLayerComboBox
from qgis.PyQt import sip
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import RequestError, SarmaePluginError
from ..labelling import snapshot_labels
from ..model_cards import PackageCard
from ..tasks.finetune_task import FINETUNE_TASKS, MODE_LABELS, MODES, FinetuneRequest
from ..tasks.run_task import slug
from ..toolbelt import settings
from ..toolbelt.layers import follow_new_polygons, raster_file
from .about_dialog import ICON_PATH
from .finetune_results import FinetuneResultDialog
from .notice import Notice
from .package_picker import PackagePicker
from .training_data import (
    KEY_NAMES,
    LabelWatch,
    RasterList,
    auto_model_name,
    check_encoder,
    check_labels,
    class_counts,
    classes_html,
    default_class_field,
    rasters_under,
    unique_model_name,
)

__all__ = ["FinetuneDialog", "FinetuneResultDialog", "snapshot_labels", "unique_model_name"]
SECTION = "finetune"  # QgsSettings: sarmae/finetune/<key>

NO_BACKGROUND = "(none)"  # unlabelled pixels are ignored (the combo's tooltip says so)
TASK_HELP = {
    "segment": "one class per pixel (output: class raster + confidence)",
    "detect": "one box per labelled polygon, e.g. ships (output: scored boxes)",
    "classify": "one label per window, from windows inside the polygons (output: a grid)",
}


class FinetuneDialog(QDialog):
    """Choose rasters, labels, an encoder and a budget; ``request`` holds the result after OK.

    ``embedded``: the form is a tab of the dock panel: "Fine-tune" emits ``requested(request)``
    and the form stays open with its choices."""

    requested = pyqtSignal(object)  # a FinetuneRequest (embedded form)

    def __init__(self, parent: QWidget | None = None, project: QgsProject | None = None,
                 models_folder: str | Path | None = None, embedded: bool = False) -> None:
        super().__init__(parent)
        self.embedded = embedded
        if embedded:
            self.setWindowFlags(Qt.Widget)
        self.setWindowTitle("SARMAE: Fine-tune a model on my labels")
        self.setWindowIcon(QIcon(str(ICON_PATH)))
        self.project = project or QgsProject.instance()
        self.request: FinetuneRequest | None = None
        s = settings.load()
        self.models_folder = Path(models_folder) if models_folder else settings.models_folder(s)
        self.output_folder = settings.output_folder(s)

        self.notice = Notice(self)
        self.task_combo = QComboBox(self)
        self.task_combo.addItems(FINETUNE_TASKS)
        self.task_help = QLabel(self)
        self.task_help.setWordWrap(True)
        self.raster_list = RasterList(self.project, self)
        self.label_combo = QgsMapLayerComboBox(self)
        self.label_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.label_combo.setAllowEmptyLayer(True)
        self.field_combo = QgsFieldComboBox(self)
        self.classes_label = QLabel(self)
        self.classes_label.setWordWrap(True)
        self.classes_label.setTextFormat(Qt.RichText)
        self.background_combo = QComboBox(self)
        self.background_combo.setToolTip("Segmentation: the class of the pixels you did not label; (none): "
                                          "unlabelled pixels are ignored in training")
        self.label_watch = LabelWatch(self._update_classes, self)
        self.encoder_picker = PackagePicker(
            self.models_folder, self, tasks=("embed", "reconstruct"),
            item_text=lambda card: f"{card.name} ({card.in_chans} ch)",  # the card below says the rest
            added_text=lambda card, path: f"{card.name} ({Path(path).name})", add_first=True,
            extra_items=[("random initialisation (no pretraining: for tests only)", "")],
            browse_title="Encoder package folder", unreadable_text="{path}: not a readable model package",
            no_package_text="<span style='color:#b00'>No pretrained encoder: expect poor results from a few "
                            "labels. Pretrain one or install an encoder package.</span>")
        self.encoder_combo, self.encoder_label = self.encoder_picker.combo, self.encoder_picker.card_label
        self.minutes_spin = QDoubleSpinBox(self)
        self.minutes_spin.setRange(0.0, 24 * 60)
        self.minutes_spin.setDecimals(1)
        self.minutes_spin.setValue(settings.remembered(SECTION, "max_minutes", 5.0))
        self.minutes_spin.setSuffix(" min")
        self.minutes_spin.setSpecialValueText("no limit")
        self.epochs_spin = QSpinBox(self)
        self.epochs_spin.setRange(1, 10000)
        self.epochs_spin.setValue(settings.remembered(SECTION, "epochs", 50))
        self.mode_combo = QComboBox(self)
        for mode in MODES:
            self.mode_combo.addItem(MODE_LABELS[mode], mode)
        self.mode_combo.setToolTip("Quick: a light head fitted on the frozen encoder, in seconds; the right choice "
                                   "for a handful of polygons.\nFull fine-tune: the encoder learns too; needs many "
                                   "labels and minutes.\nAutomatic: chosen from the number of labels.")
        self.mode_combo.setCurrentIndex(max(0, self.mode_combo.findData(settings.remembered(SECTION, "mode", "auto"))))
        self.seed_spin = QSpinBox(self)
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setValue(settings.remembered(SECTION, "seed", 0))
        self.batch_spin = QSpinBox(self)
        self.batch_spin.setRange(1, 512)
        self.batch_spin.setValue(settings.remembered(SECTION, "batch_size", 16))
        self.batch_spin.setToolTip("Chips per training step; with fewer training chips than this, training uses "
                                   "what there is")
        self.device_combo = QComboBox(self)
        self.device_combo.addItems(settings.DEVICES)
        self.device_combo.setCurrentText(settings.remembered(SECTION, "device", s.device))
        self.name_edit = QLineEdit(self)
        self.name_edit.setPlaceholderText("automatic: <task>_<label layer>")
        self.name_edit.setToolTip("Empty: <task>_<label layer>, with _2, _3… when taken")

        self._layout()
        self.refresh_rasters()
        self.encoder_picker.refresh()
        self._restore_choices()
        self.task_combo.currentTextChanged.connect(self._on_task_changed)
        self.label_combo.layerChanged.connect(self._on_label_layer_changed)
        self.field_combo.fieldChanged.connect(lambda _f: self._update_classes())
        self.notice.clear_on(self.label_combo.layerChanged, self.field_combo.fieldChanged,
                             self.raster_list.itemChanged)
        self.field_combo.model().modelReset.connect(self._on_fields_reset)
        self._on_task_changed(self.task_combo.currentText())
        self._on_label_layer_changed(self.label_combo.currentLayer())
        follow_new_polygons(self.label_combo, self.project)  # a new label layer is chosen

    def _layout(self) -> None:
        data = QGroupBox("Training data", self)
        form = QFormLayout(data)
        form.addRow("Task", self.task_combo)
        form.addRow("", self.task_help)
        form.addRow("Raster layer(s)", self.raster_list)
        form.addRow("Label layer", self.label_combo)
        form.addRow("Class field", self.field_combo)
        form.addRow("", self.classes_label)
        form.addRow("Background class", self.background_combo)
        model = QGroupBox("Model", self)
        mform = QFormLayout(model)
        self.encoder_picker.add_to_form(mform, "Start from encoder")
        mform.addRow("New model name", self.name_edit)
        budget = QGroupBox("Budget", self)
        bform = QFormLayout(budget)
        bform.addRow("Time budget", self.minutes_spin)
        bform.addRow("Epochs (at most)", self.epochs_spin)
        bform.addRow("Mode", self.mode_combo)
        self.advanced = QgsCollapsibleGroupBox("Advanced", self)
        self.advanced.setCollapsed(True)
        aform = QFormLayout(self.advanced)
        aform.addRow("Batch size", self.batch_spin)
        aform.addRow("Seed", self.seed_spin)
        aform.addRow("Device", self.device_combo)
        self.buttons = QDialogButtonBox(self)
        self.run_button = self.buttons.addButton("Fine-tune", QDialogButtonBox.AcceptRole)
        if not self.embedded:
            self.buttons.addButton(QDialogButtonBox.Cancel)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.notice)
        layout.addWidget(data)
        layout.addWidget(model)
        layout.addWidget(budget)
        layout.addWidget(self.advanced)
        layout.addWidget(self.buttons)
        if not self.embedded:  # a dock tab takes the dock's width
            self.setMinimumWidth(560)

    # ---- lists ----------------------------------------------------------------------------------
    def refresh_rasters(self) -> None:
        """One checkable item per raster layer of the project (ticks kept; a single raster ticked)."""
        self.raster_list.refresh()

    def set_rasters_checked(self, layers) -> None:
        self.raster_list.set_checked(layers)

    def checked_rasters(self) -> list[QgsRasterLayer]:
        return self.raster_list.checked()

    def add_encoder(self, path: str | Path) -> int:
        """Add an encoder package from elsewhere (Browse…) first in the list and select it."""
        return self.encoder_picker.add_package(path)

    def encoder_card(self) -> PackageCard | None:
        return self.encoder_picker.current_card()

    # ---- remembered choices ---------------------------------------------------------------------
    def _restore_choices(self) -> None:
        """The task and encoder of the last request (the numbers are restored where they are made)."""
        task = settings.remembered(SECTION, "task", "segment")
        if task in FINETUNE_TASKS:
            self.task_combo.setCurrentText(task)
        encoder = settings.remembered(SECTION, "encoder", "")
        if encoder:
            index = self.encoder_combo.findData(encoder)
            if index >= 0:
                self.encoder_combo.setCurrentIndex(index)
            elif Path(encoder).exists():
                self.add_encoder(encoder)

    def save_choices(self) -> None:
        """Remember the current choices for the next opening (QgsSettings)."""
        settings.remember(SECTION, task=self.task_combo.currentText(), encoder=self.encoder_picker.current_path() or "",
                          max_minutes=float(self.minutes_spin.value()), epochs=self.epochs_spin.value(),
                          mode=self.mode_combo.currentData(), seed=self.seed_spin.value(),
                          batch_size=self.batch_spin.value(), device=self.device_combo.currentText())

    # ---- reactions ------------------------------------------------------------------------------
    def _on_task_changed(self, task: str) -> None:
        self.task_help.setText(f"<i>{TASK_HELP.get(task, '')}</i>")
        self.background_combo.setEnabled(task == "segment")

    def _on_label_layer_changed(self, layer) -> None:
        self.label_watch.watch(layer)  # the counts follow the polygons drawn and their classes
        self.field_combo.setLayer(layer if isinstance(layer, QgsVectorLayer) else None)
        if isinstance(layer, QgsVectorLayer) and not self.checked_rasters():
            card = self.encoder_card() if hasattr(self, "encoder_picker") else None
            self.set_rasters_checked(rasters_under(self.project, layer, card.in_chans if card else None))
        if isinstance(layer, QgsVectorLayer):  # never fid / a primary key (training_data.default_class_field)
            self.field_combo.setField(default_class_field(layer))
        self._update_classes()

    def _on_fields_reset(self) -> None:
        """The layer's fields were listed again (QGIS resets the list to its first field, fid): the
        default class field again, unless a usable one is chosen."""
        layer, field = self.label_combo.currentLayer(), self.field_combo.currentField()
        if isinstance(layer, QgsVectorLayer) and (not field or field.lower() in KEY_NAMES or
                                                  layer.fields().indexOf(field) in layer.primaryKeyAttributes()):
            self.field_combo.setField(default_class_field(layer))
        self._update_classes()

    def class_counts(self) -> tuple[list[tuple[str, str]], dict[str, int]]:
        return class_counts(self.label_combo.currentLayer(), self.field_combo.currentField())

    def _update_classes(self) -> None:
        if sip.isdeleted(self):
            return
        classes, counts = self.class_counts()
        self.classes_label.setText(classes_html(classes, counts))
        current = self.background_combo.currentText()
        self.background_combo.clear()
        self.background_combo.addItem(NO_BACKGROUND)
        self.background_combo.addItems([n for n, _ in classes])
        if current and self.background_combo.findText(current) >= 0:
            self.background_combo.setCurrentText(current)

    # ---- request --------------------------------------------------------------------------------
    def build_request(self, snapshot: bool = True) -> FinetuneRequest:
        """The request for the current choices (and, when ``snapshot``, the label snapshot on disk)."""
        task = self.task_combo.currentText()
        rasters = self.checked_rasters()
        if not rasters:
            raise RequestError("Tick at least one raster layer to train on (the rasters your polygons cover).")
        try:
            paths = tuple(raster_file(layer) for layer in rasters)
        except SarmaePluginError as e:
            raise RequestError(str(e)) from e
        layer = self.label_combo.currentLayer()
        if not isinstance(layer, QgsVectorLayer):
            raise RequestError("Choose the label layer: polygons with a class field (Raster > SARMAE > New label "
                               "layer… makes one).")
        field = self.field_combo.currentField()
        if not field:
            raise RequestError(f"Choose the field of '{layer.name()}' that holds the class names.")
        background = self.background_combo.currentText() if task == "segment" else ""
        background = "" if background == NO_BACKGROUND else background
        class_list = check_labels(layer, field, rasters, task, background, self.project)
        encoder = self.encoder_picker.current_path()
        if encoder:
            check_encoder(encoder, self.encoder_card(), rasters)
        typed = self.name_edit.text().strip()
        name = slug(typed) if typed else unique_model_name(auto_model_name(task, layer.name()), self.models_folder)
        output = self.models_folder / name
        if output.exists():
            raise RequestError(f"A model named '{name}' is already installed ({output}): choose another name, or "
                               "leave the name empty for an automatic one.")
        run_dir = self.output_folder / f"finetune_{slug(name)}_{time.strftime('%Y%m%d-%H%M%S')}"
        labels = str(run_dir / "labels.gpkg")
        if snapshot:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RequestError(f"Cannot create the run folder {run_dir} ({e.strerror}): set another output "
                                   "folder in SARMAE Settings.") from e
            n = snapshot_labels(layer, field, labels, self.project)
            if n == 0:
                raise RequestError(f"No labelled polygon of '{layer.name()}' could be copied.")
        return FinetuneRequest(
            name=slug(name), task=task, rasters=paths, labels=labels, class_field=field, output=str(output),
            run_dir=str(run_dir), classes=tuple(n for n, _ in class_list), colours=tuple(c for _, c in class_list),
            background=background or None, encoder=encoder, max_minutes=round(self.minutes_spin.value(), 2),
            epochs=self.epochs_spin.value(), mode=self.mode_combo.currentData(), seed=self.seed_spin.value(),
            batch_size=self.batch_spin.value(), device=self.device_combo.currentText(), layer_name=rasters[0].name())

    def show_error(self, message: str) -> None:
        self.notice.warn("Cannot fine-tune", message)

    def reject(self) -> None:
        """Cancel / Esc closes the dialog; an embedded form (a dock tab) stays."""
        if not self.embedded:
            super().reject()

    def accept(self) -> None:
        """Validate; a valid request closes the dialog (or, embedded, is emitted as ``requested``)."""
        try:
            self.request = self.build_request()
        except RequestError as e:
            self.request = None
            self.show_error(str(e))
            return
        self.notice.clear()
        self.save_choices()
        if self.embedded:
            self.requested.emit(self.request)
            return
        super().accept()
