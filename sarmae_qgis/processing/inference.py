"""Run a model package over a raster layer: one algorithm per task (segment, detect, classify,
embed, reconstruct), each refusing a package of another task.

The engine writes a run's outputs beside its main output (``OUT.tif``, ``OUT_confidence.tif``,
``OUT.gpkg``), while Processing gives one destination per output. So the engine writes into a
hidden staging folder beside OUTPUT (same file system: moving is a rename) and each file is then
moved to its destination; the staging folder is always removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputString,
    QgsProcessingParameterEnum,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)

from ..errors import SarmaePluginError
from ..model_cards import check_channels, parse_bands
from ..styling import as_pairs, style_output
from ..toolbelt import log, settings
from ..toolbelt.layers import band_names, raster_file
from .base import SarmaeAlgorithm, advanced, is_set, to_json

DEVICES = list(settings.DEVICES)
BACKENDS = list(settings.BACKENDS)
PRECISIONS = list(settings.PRECISIONS)
UNITS = ["auto-detect", "db", "linear_power", "amplitude", "uint8"]

COMMON_HELP = """
<p><b>Input raster layer</b>: a SAR raster stored in a file (GeoTIFF, VRT, ...). Layers from a database, a web service or memory must be saved to a file first.</p>
<p><b>Model package</b>: a SARMAE package folder (with model.json) or its .zip, made by <i>sarmae init/convert</i> or by fine-tuning. Its task must match this algorithm.</p>
<p><b>Bands</b>: the bands feeding the model, in the model's channel order, by number or name, e.g. <code>VV,VH</code> or <code>2,1</code>. Empty: all bands in file order (their count must match the model's channels).</p>
<p><b>Window / overlap / batch size</b>: window size in pixels (empty: the model's input size), overlap between neighbouring windows (0..0.9, empty: 0.25; classify: 0) and windows per forward pass.</p>
<p><b>Device / backend</b>: where the model runs (auto picks a GPU when one is usable) and with which runtime (auto: torch, or ONNX Runtime when the package has model.json + model.onnx and torch is missing).</p>
<p><b>Precision</b>: <i>auto</i> (default) runs the package's int8 model (<code>model.int8.onnx</code>) on a CPU with int8 dot-product instructions (VNNI / AMX), else the fp32 model; <i>int8</i> always runs the int8 model, on the CPU through ONNX Runtime (a package without one is refused: make it with Models… &gt; Make int8 model, the <i>Export model package to ONNX</i> algorithm with precision int8, or <code>sarmae export PACKAGE --precision int8 --calibration RASTER</code>); <i>fp32</i> never does. The log says which precision ran and why. From <code>qgis_process</code> or a script: <code>PRECISION=int8</code>.</p>
<p>The model runs in the SARMAE engine process (Settings: its Python interpreter); it never blocks QGIS, and cancelling stops it within one batch, leaving no partial file.</p>
"""

_post_processors: dict[str, QgsProcessingLayerPostProcessorInterface] = {}  # alive until QGIS calls them


class StyleOnLoad(QgsProcessingLayerPostProcessorInterface):
    """Apply the model's class colours when Processing loads an output into the project."""

    def __init__(self, role: str, classes):
        super().__init__()
        self.role, self.classes = role, as_pairs(classes)

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802  # QGIS API name
        try:
            if layer is not None:
                style_output(layer, self.role, self.classes)
        except Exception as e:  # styling is a nicety: never fail (or crash) the load for it
            log.warning(f"could not style {layer.name() if layer else 'an output'}: {e}")


def style_when_loaded(context: QgsProcessingContext, path: str, role: str, classes) -> None:
    if path and context.willLoadLayerOnCompletion(path):
        pp = StyleOnLoad(role, classes)
        _post_processors[path] = pp
        while len(_post_processors) > 100:  # QGIS has long used the oldest ones
            del _post_processors[next(iter(_post_processors))]
        context.layerToLoadOnCompletionDetails(path).setPostProcessor(pp)


def move_output(src: str, dst: str) -> None:
    """Move one staged output onto its destination (replacing it)."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(dst):
        os.remove(dst)
    shutil.move(src, dst)


class ModelAlgorithm(SarmaeAlgorithm):
    """Base of the inference algorithms; subclasses set TASK and OUTPUTS and add outputs."""

    TASK = ""
    PACKAGE_TASK = ""  # the packages it runs, when not the task's own (textquery: zeroshot packages)
    GROUP = "inference"
    # engine output role -> (parameter name, kind "raster"|"vector", description, optional)
    OUTPUTS: dict[str, tuple[str, str, str, bool]] = {}
    MAIN_ROLE = ""

    def initAlgorithm(self, config=None):  # noqa: N802
        s = settings.load()
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Input raster layer"))
        self.add_package_parameters("MODEL", f"Model ({self.package_task})", (self.package_task,))
        self.addParameter(QgsProcessingParameterString("BANDS", "Bands in model order (e.g. VV,VH or 1,2; "
                                                       "empty: all bands)", optional=True))
        self.addParameter(QgsProcessingParameterNumber("WINDOW", "Window size in pixels (empty: the model's "
                                                       "input size)", QgsProcessingParameterNumber.Integer,
                                                       optional=True, minValue=32))  # engine.options.MIN_WINDOW
        self.addParameter(QgsProcessingParameterNumber("OVERLAP", "Overlap between windows (0..0.9; empty: "
                                                       "0.25, classify 0)", QgsProcessingParameterNumber.Double,
                                                       optional=True, minValue=0.0, maxValue=0.9))
        self.addParameter(QgsProcessingParameterNumber("BATCH_SIZE", "Batch size (windows per forward pass)",
                                                       QgsProcessingParameterNumber.Integer, s.batch_size,
                                                       minValue=1, maxValue=1024))
        self.addParameter(QgsProcessingParameterEnum("DEVICE", "Device", DEVICES, defaultValue=DEVICES.index(s.device)))
        self.addParameter(QgsProcessingParameterEnum("BACKEND", "Backend", BACKENDS,
                                                     defaultValue=BACKENDS.index(s.backend)))
        self.addParameter(QgsProcessingParameterEnum("PRECISION", "Precision (int8: the package's int8 model)",
                                                     PRECISIONS, defaultValue=s.precision, usesStaticStrings=True))
        self.addParameter(advanced(QgsProcessingParameterEnum("INPUT_UNITS", "Input units (override detection)",
                                                              UNITS, defaultValue=0)))
        self.addParameter(advanced(QgsProcessingParameterNumber("THREADS", "CPU threads (empty: all cores)",
                                                                QgsProcessingParameterNumber.Integer,
                                                                optional=True, minValue=1)))
        self.add_task_parameters()
        for _role, (name, kind, description, optional) in self.OUTPUTS.items():
            if kind == "raster":
                param = QgsProcessingParameterRasterDestination(name, description, optional=optional,
                                                                createByDefault=not optional)
            else:
                param = QgsProcessingParameterVectorDestination(name, description, QgsProcessing.TypeVectorPolygon,
                                                                optional=optional, createByDefault=not optional)
            self.addParameter(param)
        self.addOutput(QgsProcessingOutputString("STATISTICS", "Statistics (JSON)"))

    @property
    def package_task(self) -> str:
        return self.PACKAGE_TASK or self.TASK

    def add_task_parameters(self) -> None:
        """Task-specific options (subclasses)."""

    def task_options(self, parameters: dict, context: QgsProcessingContext) -> dict:
        """Task-specific engine options (subclasses)."""
        return {}

    def checkParameterValues(self, parameters, context):  # noqa: N802
        ok, message = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, message
        return self.check_package(parameters, context, "MODEL", (self.package_task,), required=True)

    def options(self, parameters: dict, context: QgsProcessingContext, bands: list[str] | None) -> dict:
        opts = {"batch_size": self.parameterAsInt(parameters, "BATCH_SIZE", context),
                "device": DEVICES[self.parameterAsEnum(parameters, "DEVICE", context)],
                "backend": BACKENDS[self.parameterAsEnum(parameters, "BACKEND", context)],
                "precision": self.parameterAsEnumString(parameters, "PRECISION", context) or "auto",
                "overwrite": True}
        if is_set(parameters, "WINDOW"):
            opts["window"] = self.parameterAsInt(parameters, "WINDOW", context)
        if is_set(parameters, "OVERLAP"):
            opts["overlap"] = self.parameterAsDouble(parameters, "OVERLAP", context)
        if is_set(parameters, "THREADS"):
            opts["threads"] = self.parameterAsInt(parameters, "THREADS", context)
        units = self.parameterAsEnum(parameters, "INPUT_UNITS", context)
        if units:
            opts["input_units"] = UNITS[units]
        if bands:
            opts["bands"] = [int(b) if b.isdigit() else b for b in bands]
        opts.update(self.task_options(parameters, context))
        return opts

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        card = self.package_card(parameters, context, "MODEL", (self.package_task,))
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        bands = parse_bands(self.parameterAsString(parameters, "BANDS", context))
        try:
            path = raster_file(layer)
            check_channels(card, band_names(layer), bands, layer.name())
        except SarmaePluginError as e:
            raise QgsProcessingException(str(e)) from e
        opts = self.options(parameters, context, bands)
        feedback.pushInfo(f"model '{card.name}' ({card.task}) on {path}")
        return self.run_model(parameters, context, feedback, path, card.path, opts)

    def run_model(self, parameters: dict, context: QgsProcessingContext, feedback, path: str, model: str,
                  opts: dict) -> dict:
        """Run ``model`` over ``path`` in the engine, staged beside the main output, move each output
        onto its destination, style what Processing loads; the algorithm's outputs."""
        dests = {role: self.parameterAsOutputLayer(parameters, name, context)
                 for role, (name, _k, _d, _o) in self.OUTPUTS.items()}
        dests = {role: d for role, d in dests.items() if d}
        main = dests[self.MAIN_ROLE]
        if self.TASK == "segment":
            opts["vector"] = "vectors" in dests
        Path(main).parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".sarmae-", dir=str(Path(main).parent))
        try:
            stem = Path(dests.get("vectors", main)).stem
            suffix = ".gpkg" if self.TASK in ("detect", "classify") else ".tif"
            staged = str(Path(staging) / (stem + suffix))
            result = self.engine_request(feedback, lambda client, bridge: client.run_inference(
                [path], staged, model, opts, on_progress=bridge.progress, is_cancelled=bridge.is_cancelled))
            outputs = result.get("outputs") or {}
            for role, dest in dests.items():
                if role not in outputs:
                    raise QgsProcessingException(f"the engine wrote no '{role}' output; outputs: {sorted(outputs)}")
                move_output(outputs[role], dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for role, dest in dests.items():
            style_when_loaded(context, dest, role, result.get("classes"))
        stats = result.get("statistics") or {}
        feedback.pushInfo(f"statistics: {to_json(stats)}")
        out = {name: dests.get(role) for role, (name, _k, _d, _o) in self.OUTPUTS.items()}
        out["STATISTICS"] = to_json(stats)
        return out


class SegmentAlgorithm(ModelAlgorithm):
    NAME, DISPLAY, TASK, MAIN_ROLE = "segment", "Segment SAR raster", "segment", "class"
    OUTPUTS = {"class": ("OUTPUT", "raster", "Class raster", False),
               "confidence": ("CONFIDENCE", "raster", "Confidence raster", False),
               "vectors": ("VECTORS", "vector", "Class polygons", True)}
    HELP = ("<p>Semantic segmentation: one class per pixel. Writes the <b>class raster</b> (byte, class index, "
            "255 = nodata, colour table from the model), a <b>confidence raster</b> (0..1, the winning class's "
            "probability) and, if asked, <b>class polygons</b> (GeoPackage with class_name and area).</p>"
            + COMMON_HELP + "<p><b>Minimum polygon area</b>: drop polygons smaller than this many pixels.</p>")

    def add_task_parameters(self) -> None:
        self.addParameter(advanced(QgsProcessingParameterNumber("MIN_AREA", "Minimum polygon area (pixels)",
                                                                QgsProcessingParameterNumber.Integer, 0, minValue=0)))

    def task_options(self, parameters, context) -> dict:
        return {"min_area_px": self.parameterAsInt(parameters, "MIN_AREA", context)}


class DetectAlgorithm(ModelAlgorithm):
    NAME, DISPLAY, TASK, MAIN_ROLE = "detect", "Detect objects in SAR raster", "detect", "detections"
    OUTPUTS = {"detections": ("OUTPUT", "vector", "Detections", False)}
    HELP = ("<p>Object detection (e.g. ships): boxes with class_name and score, merged across windows by "
            "non-maximum suppression, written to a GeoPackage.</p>" + COMMON_HELP +
            "<p><b>Score threshold</b>: keep boxes scoring at least this (empty: the threshold stored in the package, "
            "e.g. the one a learned detector chose on its training labels; else 0.3). <b>NMS IoU</b>: overlapping boxes of "
            "one class above this intersection-over-union are merged.</p>")

    def add_task_parameters(self) -> None:
        self.addParameter(QgsProcessingParameterNumber("SCORE_THRESHOLD", "Score threshold (empty: the package's, "
                                                       "else 0.3)", QgsProcessingParameterNumber.Double,
                                                       optional=True, minValue=0.0, maxValue=1.0))
        self.addParameter(advanced(QgsProcessingParameterNumber("NMS_IOU", "NMS IoU",
                                                                QgsProcessingParameterNumber.Double, 0.5,
                                                                minValue=0.0, maxValue=1.0)))

    def task_options(self, parameters, context) -> dict:
        opts = {"nms_iou": self.parameterAsDouble(parameters, "NMS_IOU", context)}
        if is_set(parameters, "SCORE_THRESHOLD"):  # else the package's own (a learned detector's F1-best)
            opts["score_threshold"] = self.parameterAsDouble(parameters, "SCORE_THRESHOLD", context)
        return opts


class ClassifyAlgorithm(ModelAlgorithm):
    NAME, DISPLAY, TASK, MAIN_ROLE = "classify", "Classify SAR raster windows", "classify", "grid"
    OUTPUTS = {"grid": ("OUTPUT", "vector", "Classified windows", False)}
    HELP = ("<p>Scene classification: one label per window. Writes a grid of polygons (GeoPackage) with "
            "class_name, score and one probability field per class.</p>" + COMMON_HELP)


class EmbedAlgorithm(ModelAlgorithm):
    NAME, DISPLAY, TASK, MAIN_ROLE = "embed", "Embed SAR raster (features)", "embed", "embedding"
    OUTPUTS = {"embedding": ("OUTPUT", "raster", "Embedding raster", False),
               "pca": ("PCA", "raster", "PCA preview (3 bands)", False)}
    HELP = ("<p>Feature embedding with an encoder package: one feature vector per 16 x 16 pixel patch, "
            "written as a many-band raster (stride 16), plus a 3-band <b>PCA preview</b>. Use the embedding "
            "with <i>Similarity search</i> or for clustering.</p>" + COMMON_HELP)


class ReconstructAlgorithm(ModelAlgorithm):
    NAME, DISPLAY, TASK, MAIN_ROLE = "reconstruct", "Reconstruct SAR raster (MAE check)", "reconstruct", "reconstruction"
    OUTPUTS = {"reconstruction": ("OUTPUT", "raster", "Reconstruction", False)}
    HELP = ("<p>Masked-autoencoder reconstruction with a <i>reconstruct</i> package: hides a share of each "
            "window's patches and predicts them, in the model's units. A sanity view of a pretrained "
            "model.</p>" + COMMON_HELP + "<p><b>Mask ratio</b>: fraction of patches hidden.</p>")

    def add_task_parameters(self) -> None:
        self.addParameter(QgsProcessingParameterNumber("MASK_RATIO", "Mask ratio",
                                                       QgsProcessingParameterNumber.Double, 0.75, minValue=0.0,
                                                       maxValue=0.95))

    def task_options(self, parameters, context) -> dict:
        return {"mask_ratio": self.parameterAsDouble(parameters, "MASK_RATIO", context)}



def _phrases(text: str) -> list[str]:
    """'ships at sea; a harbour' -> ['ships at sea', 'a harbour'] (empty parts dropped)."""
    return [p.strip() for p in (text or "").replace("\n", ";").split(";") if p.strip()]


CLIP_HELP = ("<p>The model is a CLIP package (task <i>zeroshot</i>: SARCLIP, SARVLM, or one trained with "
             "<i>sarmae finetune --task clip</i>). The scene is embedded once on a grid of cells (one window of "
             "the model's input size per cell; <b>Overlap</b> 0.5 for cells half as wide) and the embeddings "
             "are cached per raster, model and bands, so another class list or phrase runs only the text "
             "model.</p>")


class ZeroshotAlgorithm(ModelAlgorithm):
    NAME, DISPLAY, TASK, MAIN_ROLE = "zeroshot", "Zero-shot classify SAR raster (CLIP)", "zeroshot", "class"
    OUTPUTS = {"class": ("OUTPUT", "raster", "Class raster (one cell per window)", False),
               "confidence": ("CONFIDENCE", "raster", "Confidence raster", False),
               "grid": ("GRID", "vector", "Classified cells", True)}
    HELP = ("<p>Zero-shot classification with class names typed here, no training: each cell's image "
            "embedding against the text embeddings of the classes (prompt ensemble over the templates; "
            "probabilities = softmax of 100 x cosine). Writes the <b>class raster</b> (255 = no data), the "
            "<b>confidence</b> (the winning class's probability) and, if asked, the cells as polygons.</p>"
            + CLIP_HELP + "<p><b>Classes</b>: comma-separated names, e.g. <code>water,urban,forest</code>. "
            "<b>Prompt templates</b>: separated by <code>;</code>, each with one <code>{}</code> for the class "
            "name (empty: the package's own).</p>" + COMMON_HELP)

    def add_task_parameters(self) -> None:
        self.addParameter(QgsProcessingParameterString("CLASSES", "Classes (comma-separated, e.g. water,urban,forest)"))
        self.addParameter(advanced(QgsProcessingParameterString(
            "TEMPLATES", "Prompt templates (separated by ;, each with {}; empty: the package's)", optional=True)))

    def task_options(self, parameters, context) -> dict:
        classes = [c.strip() for c in self.parameterAsString(parameters, "CLASSES", context).split(",") if c.strip()]
        if not classes:
            raise QgsProcessingException("type at least one class name in Classes, e.g. water,urban,forest")
        opts = {"classes": classes}
        templates = _phrases(self.parameterAsString(parameters, "TEMPLATES", context))
        if templates:
            opts["templates"] = templates
        return opts


class TextqueryAlgorithm(ModelAlgorithm):
    NAME, DISPLAY, TASK, MAIN_ROLE = "textquery", "Find by text in SAR raster (CLIP)", "textquery", "similarity"
    PACKAGE_TASK = "zeroshot"
    OUTPUTS = {"similarity": ("OUTPUT", "raster", "Similarity raster (one band per phrase)", False)}
    HELP = ("<p>Text search over a scene: the cosine similarity of each cell's image embedding with each "
            "phrase (e.g. <code>ships at sea</code>), one band per phrase, -1..1, higher = closer.</p>"
            + CLIP_HELP + "<p><b>Phrases</b>: one or more, separated by <code>;</code>. A phrase longer than "
            "the model's 77 tokens is truncated (the log says so).</p>" + COMMON_HELP)

    def add_task_parameters(self) -> None:
        self.addParameter(QgsProcessingParameterString("QUERY", "Phrases (separated by ;), e.g. ships at sea"))

    def task_options(self, parameters, context) -> dict:
        phrases = _phrases(self.parameterAsString(parameters, "QUERY", context))
        if not phrases:
            raise QgsProcessingException("type a phrase in Phrases, e.g. ships at sea")
        return {"query": phrases}
