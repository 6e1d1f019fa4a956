"""The "New label layer" dialog: file, CRS (from the raster to label), class field and classes.

:meth:`LabelLayerDialog.build_request` validates the choices into a :class:`LabelLayerRequest`
(or raises :class:`RequestError`); :meth:`accept` writes the GeoPackage with
:func:`sarmae_qgis.labelling.create_label_layer`, adds it to the project in edit mode and makes it
the active layer, so the analyst can start drawing polygons right away.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.gui import (
    QgsColorButton,
    QgsFileWidget,
    QgsMapLayerComboBox,
    QgsProjectionSelectionWidget,
)
from qgis.PyQt.QtGui import QColor, QIcon
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..errors import RequestError, SarmaePluginError
from ..labelling import DEFAULT_FIELD, check_classes, create_label_layer, default_colour
from ..model_cards import list_packages
from ..toolbelt import settings
from .about_dialog import ICON_PATH
from .notice import Notice

DEFAULT_CLASSES = (("water", ""), ("land", ""))  # colours: default_colour (water blue, land brown)


@dataclass(frozen=True)
class LabelLayerRequest:
    path: str  # the .gpkg to create
    crs: str  # WKT of the layer's CRS
    classes: tuple[tuple[str, str], ...]
    field: str = DEFAULT_FIELD
    overwrite: bool = False


class LabelLayerDialog(QDialog):
    """Create a label layer; ``layer`` holds the new layer after OK."""

    def __init__(self, parent: QWidget | None = None, project: QgsProject | None = None,
                 models_folder: str | Path | None = None, ask: bool = True) -> None:
        super().__init__(parent)
        self.setWindowTitle("SARMAE: New label layer")
        self.setWindowIcon(QIcon(str(ICON_PATH)))
        self.project = project or QgsProject.instance()
        self.ask = ask  # False in tests: never open a question box
        self.layer: QgsVectorLayer | None = None
        self.request: LabelLayerRequest | None = None
        self.models_folder = Path(models_folder) if models_folder else settings.models_folder()

        self.notice = Notice(self)
        self.raster_combo = QgsMapLayerComboBox(self)
        self.raster_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.raster_combo.setAllowEmptyLayer(True)
        self.crs_widget = QgsProjectionSelectionWidget(self)
        self.file_widget = QgsFileWidget(self)
        self.file_widget.setStorageMode(QgsFileWidget.SaveFile)
        self.file_widget.setFilter("GeoPackage (*.gpkg)")
        self.field_edit = QLineEdit(DEFAULT_FIELD, self)
        self.table = QTableWidget(0, 2, self)
        self.table.setHorizontalHeaderLabels(["Class", "Colour"])
        self.table.itemChanged.connect(self._on_name_changed)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeToContents)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(150)
        self.add_button = QPushButton("Add class", self)
        self.remove_button = QPushButton("Remove class", self)
        self.from_model_combo = QComboBox(self)
        self.from_model_combo.addItem("(classes from a model…)", None)
        for card in list_packages(self.models_folder):
            if card.classes:
                self.from_model_combo.addItem(f"{card.name} ({', '.join(card.class_names)})", card.classes)
        hint = QLabel("Draw polygons around examples of each class; pixels you leave unlabelled are ignored "
                      "in training unless you name a background class when fine-tuning.", self)
        hint.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Raster to label", self.raster_combo)
        form.addRow("CRS", self.crs_widget)
        form.addRow("File", self.file_widget)
        form.addRow("Class field", self.field_edit)
        buttons_row = QHBoxLayout()
        buttons_row.addWidget(self.add_button)
        buttons_row.addWidget(self.remove_button)
        buttons_row.addStretch(1)
        buttons_row.addWidget(self.from_model_combo)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel, self)
        self.buttons.button(QDialogButtonBox.Ok).setText("Create layer")
        layout = QVBoxLayout(self)
        layout.addWidget(self.notice)
        layout.addLayout(form)
        layout.addWidget(QLabel("Classes", self))
        layout.addWidget(self.table)
        layout.addLayout(buttons_row)
        layout.addWidget(hint)
        layout.addWidget(self.buttons)
        self.setMinimumWidth(520)

        self.set_classes(DEFAULT_CLASSES)
        self.add_button.clicked.connect(lambda: self.add_class())
        self.remove_button.clicked.connect(self.remove_selected)
        self.from_model_combo.activated.connect(self._on_model_classes)
        self.raster_combo.layerChanged.connect(self._on_raster_changed)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        self._on_raster_changed(self.raster_combo.currentLayer())

    # ---- classes --------------------------------------------------------------------------------
    def add_class(self, name: str = "", colour: str | None = None) -> int:
        row = self.table.rowCount()
        self.table.insertRow(row)
        self.table.setItem(row, 0, QTableWidgetItem(name))
        button = QgsColorButton(self.table)
        button.setColor(QColor(colour or default_colour(row, name)))
        button.setProperty("auto_colour", "" if colour else button.color().name())  # not chosen by the user
        button.setAllowOpacity(False)
        self.table.setCellWidget(row, 1, button)
        if not name:
            self.table.setCurrentCell(row, 0)
            self.table.editItem(self.table.item(row, 0))
        return row

    def _on_name_changed(self, item) -> None:
        """A class named without a chosen colour takes its name's conventional colour (water blue, ...)."""
        if item is None or item.column() != 0:
            return
        button = self.table.cellWidget(item.row(), 1)
        if button is None or button.color().name() != button.property("auto_colour"):
            return  # the user picked this colour: keep it
        button.setColor(QColor(default_colour(item.row(), item.text())))
        button.setProperty("auto_colour", button.color().name())

    def remove_selected(self) -> None:
        rows = sorted({i.row() for i in self.table.selectedIndexes()} or {self.table.currentRow()}, reverse=True)
        for row in rows:
            if row >= 0:
                self.table.removeRow(row)

    def set_classes(self, classes) -> None:
        self.table.setRowCount(0)
        for name, colour in classes:
            self.add_class(name, colour)

    def classes(self) -> list[tuple[str, str]]:
        out = []
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            button = self.table.cellWidget(row, 1)
            out.append(((item.text() if item else "").strip(), button.color().name() if button else default_colour(row)))
        return out

    def _on_model_classes(self, index: int) -> None:
        classes = self.from_model_combo.itemData(index)
        if classes:
            self.set_classes(classes)
        self.from_model_combo.setCurrentIndex(0)

    # ---- raster -> CRS and default file ------------------------------------------------------------
    def _on_raster_changed(self, layer) -> None:
        if isinstance(layer, QgsRasterLayer) and layer.crs().isValid():
            self.crs_widget.setCrs(layer.crs())
        elif not self.crs_widget.crs().isValid():
            self.crs_widget.setCrs(self.project.crs())
        if not self.file_widget.filePath().strip() or getattr(self, "_auto_path", None) == self.file_widget.filePath():
            self._auto_path = str(self._default_path(layer))
            self.file_widget.setFilePath(self._auto_path)

    def _default_path(self, layer) -> Path:
        """<project folder or output folder>/<raster>_labels.gpkg, numbered if it exists."""
        home = self.project.homePath()
        folder = Path(home) if home else settings.output_folder()
        stem = f"{layer.name()}_labels" if isinstance(layer, QgsRasterLayer) else "labels"
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)
        path = folder / f"{stem}.gpkg"
        n = 2
        while path.exists():
            path = folder / f"{stem}_{n}.gpkg"
            n += 1
        return path

    # ---- request --------------------------------------------------------------------------------
    def build_request(self, overwrite: bool = False) -> LabelLayerRequest:
        try:
            classes = check_classes(self.classes())
        except SarmaePluginError as e:
            raise RequestError(str(e)) from e
        crs: QgsCoordinateReferenceSystem = self.crs_widget.crs()
        if not crs.isValid():
            raise RequestError("Choose the CRS of the label layer (the raster's CRS is best).")
        if crs.isGeographic():
            pass  # allowed: labels are reprojected to each raster's CRS when fine-tuning
        text = self.file_widget.filePath().strip()
        if not text:
            raise RequestError("Choose the GeoPackage file to create.")
        path = Path(text).expanduser()
        if path.suffix.lower() != ".gpkg":
            path = path.with_suffix(".gpkg")
        if not path.parent.is_dir() and str(path) == str(Path(getattr(self, "_auto_path", "") or "_").expanduser()):
            try:  # the dialog's own choice (the output folder, not made yet): make it
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RequestError(f"Cannot make the folder {path.parent} ({e.strerror}): choose another file.") from e
        if not path.parent.is_dir():
            raise RequestError(f"The folder {path.parent} does not exist: choose an existing folder.")
        if path.exists() and not overwrite:
            raise RequestError(f"{path} already exists: choose another file name.")
        field = self.field_edit.text().strip() or DEFAULT_FIELD
        return LabelLayerRequest(str(path), crs.toWkt(), tuple(classes), field, overwrite)

    def show_error(self, message: str) -> None:
        self.notice.warn("Cannot create the layer", message)

    def accept(self) -> None:
        overwrite = False
        text = self.file_widget.filePath().strip()
        if self.ask and text and Path(text).with_suffix(".gpkg").exists():
            answer = QMessageBox.question(self, "Replace file?", f"{Path(text).with_suffix('.gpkg')} exists. Replace it?")
            overwrite = answer == QMessageBox.Yes
        try:
            self.request = self.build_request(overwrite=overwrite)
            r = self.request
            self.layer = create_label_layer(r.path, QgsCoordinateReferenceSystem.fromWkt(r.crs), r.classes, r.field,
                                            project=self.project, overwrite=r.overwrite)
        except SarmaePluginError as e:
            self.show_error(str(e))
            return
        super().accept()
