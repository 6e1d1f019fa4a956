"""Similarity search on the map: click a point (or use selected polygons) -> similarity raster.

- :class:`SimilarityMapTool`: a map tool bound to a canvas, a raster layer and an ``embed`` model
  package. A left click is reprojected from the canvas CRS to the layer's CRS, refused with a
  message when it falls outside the layer, and starts a
  :class:`~sarmae_qgis.tasks.similarity_task.SimilarityTask` (embedding computed once per layer
  file + model and cached, then cosine similarity; the result is added on top of the group
  "SARMAE similarity"). :meth:`SimilarityMapTool.query_polygon` does the same for a polygon (WKT
  in the layer's CRS): the query is the mean embedding of the cells it covers.
- :class:`SimilarityDialog`: a small non-modal dialog to choose the raster layer, the embed model
  (packages of the models folder whose task is ``embed``: the engine embeds with encoder packages
  only) and the output folder (where embeddings are cached), then "Pick a point on the map"
  (activates the tool) or "Use selected polygon(s)" of a polygon layer.

Nothing here waits for the engine: every engine call runs in a QgsTask. Errors are shown in a
message bar (and the log), never raised into Qt.
"""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsGeometry,
    QgsMapLayerProxyModel,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.gui import (
    QgsFileWidget,
    QgsMapCanvas,
    QgsMapLayerComboBox,
    QgsMapToolEmitPoint,
    QgsMessageBar,
)
from qgis.PyQt import sip
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..errors import RequestError
from ..tasks.similarity_task import (
    EMBED_TASKS,
    EmbeddingSource,
    SimilarityRequest,
    SimilarityTask,
    embedding_source,
    start_task,
)
from ..toolbelt import log, messages, settings
from ..toolbelt.layers import follow_new_polygons
from .about_dialog import ICON_PATH
from .notice import Notice
from .package_picker import PackagePicker


def format_xy(x: float, y: float, crs: QgsCoordinateReferenceSystem) -> str:
    """"500800.0, 4499520.0" (projected) or "3.12345, 40.12345" (degrees)."""
    digits = 5 if crs.isValid() and crs.isGeographic() else 1
    return f"{x:.{digits}f}, {y:.{digits}f}"


def selected_polygons_wkt(layer: QgsVectorLayer | None, crs: QgsCoordinateReferenceSystem,
                          project: QgsProject | None = None) -> str:
    """The union of the selected features of a polygon layer, in ``crs``, as WKT;
    :class:`RequestError` when there is no polygon layer or nothing is selected."""
    if layer is None or sip.isdeleted(layer):
        raise RequestError("Choose a polygon layer and select the polygon(s) to search with.")
    if not isinstance(layer, QgsVectorLayer) or layer.geometryType() != QgsWkbTypes.PolygonGeometry:
        raise RequestError(f"Layer '{layer.name()}' is not a polygon layer; choose one with polygons.")
    if layer.selectedFeatureCount() == 0:
        raise RequestError(f"No feature of '{layer.name()}' is selected: select the polygon(s) to search with "
                           "(Select Features tool), then try again.")
    project = project or QgsProject.instance()
    transform = None
    if layer.crs().isValid() and crs.isValid() and layer.crs() != crs:
        transform = QgsCoordinateTransform(layer.crs(), crs, project.transformContext())
    geoms = []
    for feature in layer.selectedFeatures():
        g = QgsGeometry(feature.geometry())
        if g.isNull() or g.isEmpty():
            continue
        if transform is not None:
            try:
                g.transform(transform)
            except QgsCsException as e:
                raise RequestError(f"a selected polygon of '{layer.name()}' cannot be reprojected to "
                                   f"{crs.authid()} ({e})") from e
        if not g.isGeosValid():
            g = g.makeValid()
        geoms.append(g)
    if not geoms:
        raise RequestError(f"The selected feature(s) of '{layer.name()}' have no geometry.")
    return (geoms[0] if len(geoms) == 1 else QgsGeometry.unaryUnion(geoms)).asWkt()


class SimilarityMapTool(QgsMapToolEmitPoint):
    """Click on the map -> similarity raster of ``layer`` to the embedding under the click.

    Args:
        canvas: the map canvas (clicks arrive in its CRS).
        layer: the raster layer to search in (a file on disk).
        model_path: an ``embed`` package (folder or .zip); ignored when ``source`` is given.
        message_bar: where messages go (``iface.messageBar()``); None: the log only.
        output_folder: embeddings are cached and results written under ``<folder>/similarity``
            (default: the output folder of the settings).
        bands: model-order bands (default: all, or the model's band names when the layer has them).
        source: an already validated :class:`EmbeddingSource` (the dialog passes one).

    Raises :class:`RequestError` (at construction) for an invalid layer/model; never raises later.
    """

    def __init__(self, canvas: QgsMapCanvas, layer: QgsRasterLayer, model_path: str | None = None,
                 message_bar=None, output_folder: str | Path | None = None, bands=None,
                 project: QgsProject | None = None, source: EmbeddingSource | None = None) -> None:
        super().__init__(canvas)
        self.layer = layer
        self.source = source or embedding_source(layer, model_path, output_folder, bands)
        self.message_bar = message_bar
        self.project = project
        self.tasks: list[SimilarityTask] = []
        self.last_message = ""
        self.setCursor(Qt.CrossCursor)

    # ---- events ---------------------------------------------------------------------------------
    def canvasReleaseEvent(self, event) -> None:  # noqa: N802  # Qt API
        if event.button() != Qt.LeftButton:
            return
        try:
            self.query_point(event.mapPoint())
        except Exception as e:  # never raise into Qt
            self._say(f"similarity search failed: {e}", Qgis.Critical)

    # ---- queries --------------------------------------------------------------------------------
    def _layer_ok(self) -> bool:
        if self.layer is None or sip.isdeleted(self.layer) or not self.layer.isValid():
            self._say(f"layer '{self.source.layer_name}' was removed: open SARMAE similarity search again", Qgis.Warning)
            return False
        return True

    def query_point(self, point: QgsPointXY, crs: QgsCoordinateReferenceSystem | None = None) -> SimilarityTask | None:
        """Start a search for ``point`` (in ``crs``, default: the canvas CRS); None when refused."""
        if not self._layer_ok():
            return None
        project = self.project or QgsProject.instance()
        crs = crs if crs is not None else self.canvas().mapSettings().destinationCrs()
        layer_crs = self.layer.crs()
        p = QgsPointXY(point)
        if crs.isValid() and layer_crs.isValid() and crs != layer_crs:
            try:
                p = QgsCoordinateTransform(crs, layer_crs, project.transformContext()).transform(p)
            except QgsCsException:
                self._say(f"click inside layer '{self.layer.name()}': this point cannot be expressed in its CRS "
                          f"{layer_crs.authid()}", Qgis.Warning)
                return None
        if not self.layer.extent().contains(p):
            self._say(f"click inside layer '{self.layer.name()}': the point ({format_xy(p.x(), p.y(), layer_crs)} "
                      f"in {layer_crs.authid() or 'its CRS'}) is outside it", Qgis.Warning)
            return None
        label = f"similarity @ {format_xy(p.x(), p.y(), layer_crs)}"
        return self._start(SimilarityRequest(self.source, (p.x(), p.y()), label))

    def query_polygon(self, wkt: str) -> SimilarityTask | None:
        """Start a search for a polygon given as WKT in the raster layer's CRS; None when refused."""
        if not self._layer_ok():
            return None
        geom = QgsGeometry.fromWkt(wkt or "")
        if geom.isNull() or geom.type() != QgsWkbTypes.PolygonGeometry:
            self._say("the similarity query must be a polygon (WKT in the raster layer's CRS)", Qgis.Warning)
            return None
        if not geom.intersects(QgsGeometry.fromRect(self.layer.extent())):
            self._say(f"the polygon is outside layer '{self.layer.name()}': select polygon(s) over it", Qgis.Warning)
            return None
        c = geom.centroid().asPoint()
        label = f"similarity to polygon @ {format_xy(c.x(), c.y(), self.layer.crs())}"
        return self._start(SimilarityRequest(self.source, geom.asWkt(), label))

    def query_selected_polygons(self, vector_layer: QgsVectorLayer) -> SimilarityTask | None:
        """"Similarity to selected polygon": the union of ``vector_layer``'s selected features."""
        if not self._layer_ok():
            return None
        try:
            wkt = selected_polygons_wkt(vector_layer, self.layer.crs(), self.project)
        except RequestError as e:
            self._say(str(e), Qgis.Warning)
            return None
        return self.query_polygon(wkt)

    def _start(self, request: SimilarityRequest) -> SimilarityTask:
        task = SimilarityTask(request, project=self.project, message_bar=self.message_bar)
        self.tasks = [t for t in self.tasks if not t.is_done] + [task]
        start_task(task)
        self._say(f"{request.label}: searching {request.source.layer_name} (running in the background)", Qgis.Info)
        return task

    def _say(self, text: str, level) -> None:
        self.last_message = text
        log.log(text, level)
        if self.message_bar is not None and \
                messages.push(self.message_bar, "SARMAE similarity", text, level, 5 if level == Qgis.Info else 8) is None:
            self.message_bar = None  # the bar was deleted (its dialog closed)


class SimilarityDialog(QDialog):
    """Raster layer + embed model (+ output folder) -> pick a point, or use selected polygons.

    Non-modal: keep a reference while it is open; closing it unsets its map tool. ``message_bar``
    (``iface.messageBar()``) receives the map tool's and the tasks' messages; validation messages
    go to the dialog's own bar.
    """

    def __init__(self, canvas: QgsMapCanvas, parent: QWidget | None = None, message_bar=None,
                 models_folder: str | Path | None = None, project: QgsProject | None = None,
                 embedded: bool = False) -> None:
        super().__init__(parent)
        self.embedded = embedded  # a tab of the dock panel: no Close button, Esc does not hide it
        if embedded:
            self.setWindowFlags(Qt.Widget)
        self.setWindowTitle("SARMAE: Similarity search")
        self.setWindowIcon(QIcon(str(ICON_PATH)))
        self.canvas = canvas
        self.project = project
        self.tool: SimilarityMapTool | None = None
        s = settings.load()
        self.models_folder = Path(models_folder) if models_folder else settings.models_folder(s)

        self.message_bar = QgsMessageBar(self)
        self.message_bar.setSizePolicy(QSizePolicy.Minimum, QSizePolicy.Fixed)
        self.map_message_bar = message_bar if message_bar is not None else self.message_bar
        self.notice = Notice(self)  # the form's own errors, shown whole

        self.layer_combo = QgsMapLayerComboBox(self)
        self.layer_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.layer_combo.setAllowEmptyLayer(True)
        self.model_picker = PackagePicker(
            self.models_folder, self, tasks=EMBED_TASKS, browse_title="Embed model package folder",
            browse_tip="Choose an embed (encoder) model package folder",
            empty_text="No embed (encoder) package in {folder}: copy one there (Settings: models folder) "
                       "or Browse… for one.")
        self.model_combo, self.card_label = self.model_picker.combo, self.model_picker.card_label
        self.output_widget = QgsFileWidget(self)
        self.output_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.output_widget.setFilePath(str(settings.output_folder(s)))
        self.output_widget.setToolTip("Embeddings are computed once per layer and model, and cached here "
                                      "(in 'similarity'), with the similarity rasters")

        self.pick_button = QPushButton("Pick a point on the map", self)
        self.pick_button.setToolTip("Then click on the raster: bright = looks like the place you clicked")
        self.polygon_combo = QgsMapLayerComboBox(self)
        self.polygon_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.polygon_combo.setAllowEmptyLayer(True)
        self.polygon_button = QPushButton("Use selected polygon(s)", self)
        self.polygon_button.setToolTip("The query is the mean embedding of the cells under the selected polygons")
        self.status_label = QLabel(self)
        self.status_label.setWordWrap(True)

        self._layout()
        # bound methods, not lambdas: PyQt drops a bound slot when this widget's C++ object is deleted,
        # while a lambda keeps calling into it (a segfault when the project's layers are removed later)
        self.model_picker.changed.connect(self._inputs_changed)
        self.pick_button.clicked.connect(self.pick_point)
        self.polygon_button.clicked.connect(self.use_selected_polygons)
        self.layer_combo.layerChanged.connect(self._inputs_changed)
        self.notice.clear_on(self.layer_combo.layerChanged, self.model_picker.changed, self.polygon_combo.layerChanged)
        follow_new_polygons(self.polygon_combo, project or QgsProject.instance())
        self.model_picker.refresh()

    def _layout(self) -> None:
        form = QFormLayout()
        form.addRow("Raster layer", self.layer_combo)
        self.model_picker.add_to_form(form, "Embed model")
        form.addRow("Output folder", self.output_widget)
        query = QGroupBox("Query", self)
        qform = QFormLayout(query)
        qform.addRow(self.pick_button)
        qform.addRow("Polygon layer", self.polygon_combo)
        qform.addRow(self.polygon_button)
        qform.addRow(self.status_label)
        layout = QVBoxLayout(self)
        layout.addWidget(self.message_bar)
        layout.addWidget(self.notice)
        layout.addLayout(form)
        layout.addWidget(query)
        if not self.embedded:
            buttons = QDialogButtonBox(QDialogButtonBox.Close, self)
            buttons.rejected.connect(self.reject)
            layout.addWidget(buttons)
            self.setMinimumWidth(480)
        else:
            layout.addStretch(1)

    # ---- models ---------------------------------------------------------------------------------
    def add_model(self, path: str | Path) -> int:
        """Add a package from elsewhere (Browse…) and select it; a non-embed one is refused on use."""
        return self.model_picker.add_package(path)

    # ---- request --------------------------------------------------------------------------------
    def build_source(self) -> EmbeddingSource:
        """The validated (layer, model, folder) choice; :class:`RequestError` says what to fix."""
        folder = self.output_widget.filePath().strip()
        if not folder:
            raise RequestError("Choose an output folder (embeddings are cached there).")
        if Path(folder).exists() and not Path(folder).is_dir():
            raise RequestError(f"The output folder {folder} is a file; choose a folder.")
        return embedding_source(self.layer_combo.currentLayer(), self.model_picker.current_path(), folder)

    def make_tool(self) -> SimilarityMapTool | None:
        """The map tool for the current choices (reused while they do not change); None + a message
        in the dialog when they are invalid."""
        self.message_bar.clearWidgets()
        self.notice.clear()
        try:
            source = self.build_source()
        except RequestError as e:
            self.show_error(str(e))
            return None
        if self.tool is not None and not sip.isdeleted(self.tool) and self.tool.source == source:
            return self.tool
        self.release_tool()
        self.tool = SimilarityMapTool(self.canvas, self.layer_combo.currentLayer(), message_bar=self.map_message_bar,
                                      project=self.project, source=source)
        self.tool.deactivated.connect(self._on_tool_deactivated)
        return self.tool

    def pick_point(self) -> SimilarityMapTool | None:
        """Activate the map tool: each click on the layer starts a search."""
        tool = self.make_tool()
        if tool is None:
            return None
        self.canvas.setMapTool(tool)
        self.status_label.setText(f"Click on '{tool.source.layer_name}' in the map: each click adds a similarity "
                                  "layer (the first one computes the embedding, the next ones reuse it).")
        return tool

    def use_selected_polygons(self) -> SimilarityTask | None:
        """Search with the union of the selected polygons of the chosen polygon layer."""
        tool = self.make_tool()
        if tool is None:
            return None
        try:
            wkt = selected_polygons_wkt(self.polygon_combo.currentLayer(), tool.layer.crs(), self.project)
        except RequestError as e:
            self.show_error(str(e))
            return None
        task = tool.query_polygon(wkt)
        if task is None:
            self.show_error(tool.last_message)
        else:
            self.status_label.setText(f"{task.request.label}: running in the background.")
        return task

    def show_error(self, message: str) -> None:
        self.notice.warn("Cannot search", message)

    # ---- map tool lifetime ----------------------------------------------------------------------
    def _on_tool_deactivated(self) -> None:
        if not sip.isdeleted(self):
            self.status_label.setText("")

    def _inputs_changed(self, *_args) -> None:
        """The raster or the model changed: the picking tool no longer matches them."""
        if not sip.isdeleted(self):
            self.release_tool()

    def release_tool(self) -> None:
        """Unset the map tool from the canvas (its running searches go on)."""
        tool, self.tool = self.tool, None
        if tool is None or sip.isdeleted(tool):
            return
        try:
            tool.deactivated.disconnect(self._on_tool_deactivated)
        except (TypeError, RuntimeError):
            pass
        if self.canvas is not None and not sip.isdeleted(self.canvas) and self.canvas.mapTool() is tool:
            self.canvas.unsetMapTool(tool)
        self.status_label.setText("")

    def done(self, result: int) -> None:  # close, Esc, the Close button
        self.release_tool()
        if not self.embedded:  # a tab stays where it is
            super().done(result)

    def closeEvent(self, event) -> None:  # noqa: N802  # Qt API (the window's close button)
        self.release_tool()
        super().closeEvent(event)
