"""The Run model dialog: a raster layer, a model package, options, an output folder -> RunRequest.

The dialog only reads widgets and validates: :meth:`RunDialog.build_request` returns a frozen
:class:`~sarmae_qgis.tasks.run_task.RunRequest` or raises :class:`RequestError` with a message
(no layer, a layer that is not a file, no or unreadable model, channel count mismatch, ...),
which :meth:`RunDialog.accept` shows in the dialog's message bar instead of closing.
"""

from __future__ import annotations

import time
from pathlib import Path

from qgis.core import (
    Qgis,
    QgsCoordinateTransform,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QCompleter,
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
from ..model_cards import (
    PackageCard,
    check_channels,
    check_precision,
    fit_rank,
    parse_bands,
    read_card,
)
from ..tasks.run_task import RunRequest, slug
from ..toolbelt import settings
from ..toolbelt.layers import band_names, pixel_window, raster_file
from ..toolbelt.resources import text_search_phrases
from .about_dialog import ICON_PATH
from .notice import Notice
from .package_picker import PackagePicker

SECTION = "run"  # what the form remembers: sarmae/run/<key>
OVERLAP_DEFAULT = -0.05  # the overlap spin box's "engine default" position
EXTENTS = ("Whole layer", "Map canvas extent", "Selected polygons of a layer")
NO_CLIP_TEXT = ("No CLIP (zeroshot) model in {folder}: import a SARCLIP package (Models… > Import), or Browse… "
                "for one.")


class RunDialog(QDialog):
    """Choose a raster layer, a model and options; ``request`` holds the result after Run.

    ``layer``: the layer to start on (the plugin passes the selected one). Models are listed by
    fit to the layer (:func:`~sarmae_qgis.model_cards.fit_rank`) until the user picks one.
    ``embedded``: the form is the dock panel's Run tab: Run emits ``requested`` and stays open.
    ``text_search``: the panel's Text search tab: the same form and request, cut to a CLIP
    (zeroshot) model, a layer and the phrases to find (a similarity layer per phrase; the engine
    caches the layer's image embeddings, so the next phrase takes seconds)."""

    requested = pyqtSignal(object)  # a RunRequest (embedded form)

    def __init__(self, parent: QWidget | None = None, models_folder: str | Path | None = None,
                 canvas=None, layer: QgsRasterLayer | None = None, embedded: bool = False,
                 text_search: bool = False) -> None:
        super().__init__(parent)
        self.embedded = embedded
        self.text_search = text_search
        if embedded:
            self.setWindowFlags(Qt.Widget)
        self._model_chosen = False  # True once the user picks a model: no re-ranking after that
        self._suggested = ""  # the bands text the dialog filled in (replaced when the choice changes)
        self.setWindowTitle("SARMAE: Text search" if text_search else "SARMAE: Run model")
        self.canvas = canvas  # the map canvas (for "Map canvas extent"); None: that choice is disabled
        self.setWindowIcon(QIcon(str(ICON_PATH)))
        self.request: RunRequest | None = None
        s = settings.load()
        self.models_folder = Path(models_folder) if models_folder else settings.models_folder(s)
        if not models_folder:
            try:  # so that users find where to put packages
                self.models_folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass

        self.notice = Notice(self)

        # input
        self.layer_combo = QgsMapLayerComboBox(self)
        self.layer_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.layer_combo.setAllowEmptyLayer(True)
        self.bands_label = QLabel(self)
        self.bands_label.setWordWrap(True)
        self.bands_edit = QLineEdit(self)
        self.bands_edit.setPlaceholderText("all bands in file order; or e.g. VV,VH or 1,2")

        # model
        self.model_picker = PackagePicker(
            self.models_folder, self, browse_tip="Choose a model package folder", card_min_height=60,
            **({"tasks": ("zeroshot",), "empty_text": NO_CLIP_TEXT} if text_search else {}))
        self.model_combo, self.card_label = self.model_picker.combo, self.model_picker.card_label

        # options
        self.window_spin = QSpinBox(self)
        self.window_spin.setRange(0, 4096)
        self.window_spin.setSingleStep(16)
        self.window_spin.setSpecialValueText("auto")
        self.window_spin.setToolTip("Window size in pixels; auto: the model's input size")
        self.overlap_spin = QDoubleSpinBox(self)
        self.overlap_spin.setRange(OVERLAP_DEFAULT, 0.9)
        self.overlap_spin.setSingleStep(0.05)
        self.overlap_spin.setSpecialValueText("auto")
        self.overlap_spin.setToolTip("Overlap between neighbouring windows; auto: 0.25 (classification: 0)")
        self.overlap_spin.setValue(OVERLAP_DEFAULT)
        self.batch_spin = QSpinBox(self)
        self.batch_spin.setRange(1, 1024)
        self.batch_spin.setValue(s.batch_size)
        self.device_combo = QComboBox(self)
        self.device_combo.addItems(settings.DEVICES)
        self.device_combo.setCurrentText(s.device)
        self.backend_combo = QComboBox(self)
        self.backend_combo.addItems(settings.BACKENDS)
        self.backend_combo.setCurrentText(s.backend)
        self.precision_combo = QComboBox(self)
        self.precision_combo.addItems(settings.PRECISIONS)
        self.precision_combo.setToolTip(settings.PRECISION_HELP)
        # the last choice of this form (text search: the settings' default, its options are hidden)
        self.precision_combo.setCurrentText(s.precision if text_search else
                                            settings.remembered(SECTION, "precision", s.precision))
        self.vectors_check = QCheckBox("Also write polygons", self)
        self.vectors_check.setToolTip("Segmentation: also write the classes as polygons (GeoPackage)")
        # a CLIP (zeroshot) package: class names for a class map, or phrases for a similarity layer
        self.classes_edit = QLineEdit(self)
        self.classes_edit.setPlaceholderText("CLIP: e.g. water,urban,forest")
        self.classes_edit.setToolTip("CLIP (zeroshot) models: class names separated by commas -> a class map")
        self.query_edit = QLineEdit(self)
        self.query_edit.setPlaceholderText("e.g. ships at sea; a harbour" if text_search else "CLIP: e.g. ships at sea")
        self.query_edit.setToolTip("CLIP (zeroshot) models: what to find; several phrases separated by ; -> one "
                                   "similarity band each")
        # example phrases (resources/prompts/text_search.json): completion while typing, and a list to pick from
        phrases = list(text_search_phrases())
        completer = QCompleter(phrases, self.query_edit)
        completer.setCaseSensitivity(Qt.CaseInsensitive)
        completer.setFilterMode(Qt.MatchContains)
        self.query_edit.setCompleter(completer)
        self.examples_combo = QComboBox(self)
        self.examples_combo.addItem("Examples…")
        self.examples_combo.addItems(phrases)
        self.examples_combo.setToolTip("Phrases to try: the one picked is added to Find (a phrase works when the "
                                       "model's training captions named it)")
        self.examples_combo.activated.connect(self._add_example)

        # extent
        self.extent_combo = QComboBox(self)
        self.extent_combo.addItems(EXTENTS)
        if canvas is None:
            self.extent_combo.model().item(1).setEnabled(False)
        self.polygon_combo = QgsMapLayerComboBox(self)
        self.polygon_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.polygon_combo.setEnabled(False)
        self.extent_combo.currentIndexChanged.connect(lambda i: self.polygon_combo.setEnabled(i == 2))

        # output
        self.output_widget = QgsFileWidget(self)
        self.output_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.output_widget.setFilePath(str(settings.output_folder(s)))
        self.name_edit = QLineEdit(self)
        self.name_edit.setPlaceholderText("automatic: the phrase" if text_search else "automatic: <model>")

        self._layout()
        if isinstance(layer, QgsRasterLayer):
            self.layer_combo.setLayer(layer)
        self.layer_combo.layerChanged.connect(self._on_layer_changed)
        self.model_picker.changed.connect(self._on_model_changed)
        self.notice.clear_on(self.layer_combo.layerChanged, self.model_picker.changed, self.bands_edit.textEdited,
                             self.query_edit.textEdited)
        self.model_combo.activated.connect(self._on_model_picked)
        self._on_layer_changed(self.layer_combo.currentLayer())

    def _layout(self) -> None:
        inp = QFormLayout()
        inp.addRow("Raster layer", self.layer_combo)
        inp.addRow("", self.bands_label)
        inp.addRow("Bands", self.bands_edit)
        self.model_picker.add_to_form(inp, "CLIP model" if self.text_search else "Model")
        if self.text_search:  # the whole layer (its embeddings are cached per layer), no class map
            inp.addRow("Find", self.query_edit)
            inp.addRow("", self.examples_combo)
        else:
            inp.addRow("Extent", self.extent_combo)
            inp.addRow("Polygons", self.polygon_combo)
        opts = QGroupBox("Options", self)
        form = QFormLayout(opts)
        form.addRow("Window (px)", self.window_spin)
        form.addRow("Overlap", self.overlap_spin)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Backend", self.backend_combo)
        form.addRow("Precision", self.precision_combo)
        if not self.text_search:
            form.addRow("", self.vectors_check)
            form.addRow("Classes", self.classes_edit)
            form.addRow("Find by text", self.query_edit)
        out = QFormLayout()
        out.addRow("Output folder", self.output_widget)
        out.addRow("Run name", self.name_edit)
        self.buttons = QDialogButtonBox(self)
        self.run_button = self.buttons.addButton("Search" if self.text_search else "Run", QDialogButtonBox.AcceptRole)
        if not self.embedded:
            self.buttons.addButton(QDialogButtonBox.Cancel)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.notice)
        layout.addLayout(inp)
        layout.addWidget(opts)
        opts.setVisible(not self.text_search)  # text search: the settings' defaults
        layout.addLayout(out)
        if self.embedded:  # a dock tab: the spare height below the form, not between its rows
            layout.addStretch(1)
        layout.addWidget(self.buttons)
        if self.text_search:  # the Run form's other fields are not in this layout: hidden, not drawn at 0, 0
            for widget in (self.extent_combo, self.polygon_combo, self.vectors_check, self.classes_edit):
                widget.hide()
        else:
            self.examples_combo.hide()
        if not self.embedded:  # a dock tab takes the dock's width
            self.setMinimumWidth(520)

    def _add_example(self, index: int) -> None:
        """An example phrase picked: added to Find (after a ;), then the list shows "Examples…" again."""
        phrase = self.examples_combo.itemText(index) if index > 0 else ""
        self.examples_combo.setCurrentIndex(0)
        have = [q.strip() for q in self.query_edit.text().split(";") if q.strip()]
        if phrase and phrase not in have:
            self.query_edit.setText("; ".join(have + [phrase]))

    # ---- models ---------------------------------------------------------------------------------
    def add_model(self, path: str | Path) -> int:
        """Add a package outside the models folder (Browse…) and select it; returns its index."""
        self._model_chosen = True
        return self.model_picker.add_package(path)

    def refresh_models(self) -> None:
        """List the models folder again: the model chosen by hand is kept; otherwise the list is
        ranked again for the layer and the best fit selected (the panel stayed on the only package
        there when it opened, a CLIP model, once better-fitting ones were installed)."""
        self.model_picker.refresh(keep_choice=self._model_chosen)

    def _on_model_picked(self, _index: int) -> None:
        self._model_chosen = True

    def current_card(self) -> PackageCard | None:
        return self.model_picker.current_card()

    def _on_model_changed(self, _path: str) -> None:
        card = self.current_card()
        if card is None:
            return
        self.vectors_check.setEnabled(card.task == "segment")
        self.precision_combo.setEnabled(not card.method)  # a method without a network (CFAR) has no precision
        for edit in (self.classes_edit, self.query_edit):
            edit.setEnabled(card.task == "zeroshot")
        self._suggest_bands()

    # ---- layer ----------------------------------------------------------------------------------
    def _on_layer_changed(self, layer) -> None:
        if isinstance(layer, QgsRasterLayer):
            names = band_names(layer)
            self.bands_label.setText("Layer bands: " + ", ".join(f"{i + 1}: {n}" for i, n in enumerate(names)))
            if not self._model_chosen:  # the models that fit this layer first, the best one selected
                byte = layer.dataProvider() is not None and layer.dataProvider().dataType(1) == Qgis.Byte
                self.model_picker.sort_key = lambda card: fit_rank(card, names, byte)
        else:
            self.bands_label.setText("")
        if not self._model_chosen:
            self.model_picker.refresh()
        self._suggest_bands()

    def _suggest_bands(self) -> None:
        """Pre-fill the bands with the model's band names when the layer has them (VV,VH), so the
        analyst sees which bands feed the model; a text the user typed is kept."""
        layer, card = self.layer_combo.currentLayer(), self.current_card()
        current = self.bands_edit.text().strip()
        if current and current != self._suggested:
            return
        text = ""
        if isinstance(layer, QgsRasterLayer) and card is not None:
            names = [n.upper() for n in band_names(layer)]
            if card.bands and all(b.upper() in names for b in card.bands):
                text = ",".join(card.bands)
        self._suggested = text
        self.bands_edit.setText(text)

    # ---- request --------------------------------------------------------------------------------
    def build_request(self) -> RunRequest:
        """The request for the current choices; :class:`RequestError` says what is missing or wrong."""
        layer = self.layer_combo.currentLayer()
        if layer is None:
            raise RequestError("Choose an input raster layer (add a SAR raster to the project first).")
        try:
            path = raster_file(layer)
        except SarmaePluginError as e:
            raise RequestError(str(e)) from e
        model = self.model_combo.currentData()
        if not model:
            raise RequestError(f"Choose a model package: install packages into {self.models_folder} or use Browse….")
        try:
            card = read_card(model)
        except SarmaePluginError as e:
            raise RequestError(str(e)) from e
        bands = parse_bands(self.bands_edit.text())
        precision = self.precision_combo.currentText()
        try:
            check_channels(card, band_names(layer), bands, layer.name())
            check_precision(card, precision)
        except SarmaePluginError as e:
            raise RequestError(str(e)) from e
        window = self.window_spin.value() or None
        patch = int(card.raw.get("architecture", {}).get("encoder", {}).get("patch_size", 16))
        if window is not None and window % patch:
            raise RequestError(f"The window ({window} px) must be a multiple of the model's patch size ({patch} px).")
        folder = self.output_widget.filePath().strip()
        if not folder:
            raise RequestError("Choose an output folder.")
        if Path(folder).exists() and not Path(folder).is_dir():
            raise RequestError(f"The output folder {folder} is a file; choose a folder.")
        classes, query = self.clip_text(card.task)
        extent = self.pixel_extent(layer)
        name = self.name_edit.text().strip() or (query[0][:40] if self.text_search and query else card.name)
        run_dir = Path(folder).expanduser() / f"{slug(name)}_{time.strftime('%Y%m%d-%H%M%S')}"
        overlap = self.overlap_spin.value()
        return RunRequest(
            run_name=name, layer_name=layer.name(), raster_path=path, model_path=card.path, model_name=card.name,
            task=card.task, output_dir=str(run_dir), bands=tuple(bands) if bands else None, window=window,
            overlap=None if overlap <= OVERLAP_DEFAULT + 1e-9 else round(overlap, 4),
            batch_size=self.batch_spin.value(), device=self.device_combo.currentText(),
            backend=self.backend_combo.currentText(), precision=precision,
            vectors=card.task == "segment" and self.vectors_check.isChecked(), extent=extent, layer_id=layer.id(),
            classes=classes, query=query)

    def clip_text(self, task: str) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
        """(classes, phrases) of a CLIP (zeroshot) run: exactly one of the two fields filled in."""
        if task != "zeroshot":
            if self.text_search:
                raise RequestError(f"Text search needs a CLIP (zeroshot) model; this is a {task} model.")
            return None, None
        classes = tuple(c.strip() for c in self.classes_edit.text().split(",") if c.strip())
        query = tuple(q.strip() for q in self.query_edit.text().split(";") if q.strip())
        if self.text_search:
            if not query:
                raise RequestError("Type what to find, e.g. ships at sea (several phrases: separate them with ;).")
            return None, query
        if bool(classes) == bool(query):
            raise RequestError("A CLIP model needs either class names (Classes, e.g. water,urban,forest) for a class "
                               "map, or phrases (Find by text, e.g. ships at sea) for a similarity layer: fill in one.")
        if len({c.lower() for c in classes}) != len(classes):
            raise RequestError(f"Class names must differ: {', '.join(classes)}.")
        if self.extent_combo.currentIndex() != 0:
            raise RequestError("A CLIP model runs over the whole layer (its embeddings are cached per layer): "
                               "choose Extent: whole layer.")
        return classes or None, query or None

    def pixel_extent(self, layer: QgsRasterLayer) -> tuple[int, int, int, int] | None:
        """The chosen extent as the layer's pixel window (None: the whole layer)."""
        choice = self.extent_combo.currentIndex()
        if choice == 0:
            return None
        if not layer.crs().isValid():
            raise RequestError(f"Layer '{layer.name()}' has no CRS: only the whole layer can be run.")
        project = QgsProject.instance()
        if choice == 1:
            if self.canvas is None:
                raise RequestError("No map canvas here: choose the whole layer or selected polygons.")
            rect = self.canvas.extent()
            source_crs = self.canvas.mapSettings().destinationCrs()
            what = "the map canvas extent"
        else:
            polygons = self.polygon_combo.currentLayer()
            if not isinstance(polygons, QgsVectorLayer):
                raise RequestError("Choose the polygon layer whose selected polygons give the extent.")
            if polygons.selectedFeatureCount() == 0:
                raise RequestError(f"No polygon is selected in '{polygons.name()}': select the polygons to run "
                                   "on (Select Features tool), or choose another extent.")
            rect = QgsRectangle(polygons.boundingBoxOfSelected())
            source_crs = polygons.crs()
            what = f"the selected polygons of '{polygons.name()}'"
        if source_crs.isValid() and source_crs != layer.crs():
            transform = QgsCoordinateTransform(source_crs, layer.crs(), project)
            rect = transform.transformBoundingBox(rect)
        try:
            return pixel_window(layer, rect)
        except SarmaePluginError as e:
            raise RequestError(f"{what}: {e}") from e

    def show_error(self, message: str) -> None:
        self.notice.warn("Cannot run", message)

    def reject(self) -> None:
        """Cancel / Esc closes the dialog; an embedded form (a dock tab) stays."""
        if not self.embedded:
            super().reject()

    def accept(self) -> None:
        """Run: close only with a valid request (embedded: emit it and stay); otherwise say what to fix."""
        try:
            self.request = self.build_request()
        except RequestError as e:
            self.request = None
            self.show_error(str(e))
            return
        self.notice.clear()
        if not self.text_search:
            settings.remember(SECTION, precision=self.request.precision)
        if self.embedded:
            self.requested.emit(self.request)
            return
        super().accept()
