"""Fine-tuning and pretraining in the engine worker (the ``finetune`` / ``pretrain`` run tasks that
``training`` registers), as Processing algorithms."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from ..errors import SarmaePluginError
from ..model_cards import CARD, parse_bands
from ..tasks.finetune_task import MODE_LABELS, MODES
from ..toolbelt import settings
from ..toolbelt.layers import raster_file
from .base import SarmaeAlgorithm, advanced, is_set, to_json

FINETUNE_TASKS = ["segment", "detect", "classify"]


def minutes_parameter(name: str, description: str, default: float) -> QgsProcessingParameterNumber:
    """A time budget in minutes, shown with one decimal ("5.0", not "5.000000")."""
    param = QgsProcessingParameterNumber(name, description, QgsProcessingParameterNumber.Double, default,
                                         minValue=0.0)
    param.setMetadata({"widget_wrapper": {"decimals": 1}})
    return param
PRESETS = ["cpu_vit_tiny", "sarmae_vitb_reference"]
DEVICES = list(settings.DEVICES)


def prepare_output_folder(path: str, what: str) -> bool:
    """Make ``path`` ready for a new package; True when an existing package will be replaced.

    An empty folder (Processing may create the destination) is removed, an existing package is
    replaced, anything else is refused: never delete a folder of the user's files.
    """
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        return False
    if p.is_dir() and not any(p.iterdir()):
        p.rmdir()
        return False
    if p.is_dir() and (p / CARD).is_file():
        return True
    raise QgsProcessingException(f"{p} already exists and is not a SARMAE {what}: choose a new folder name for "
                                 "the output (it is created)")


def layer_files(layers) -> list[str]:
    try:
        return [raster_file(layer) for layer in layers]
    except SarmaePluginError as e:
        raise QgsProcessingException(str(e)) from e


class FinetuneAlgorithm(SarmaeAlgorithm):
    NAME, DISPLAY, GROUP = "finetune", "Fine-tune a model on my labels", "training"
    HELP = """<p>Fine-tune a SARMAE encoder on your own labels and write a new <b>model package</b> for the
Segment / Detect / Classify algorithms and the Run model dialog.</p>
<p><b>Task</b>: <i>segment</i> (one class per pixel) and <i>detect</i> (boxes) learn from <b>training rasters</b>
plus <b>labelled polygons</b> (a polygon layer and its <b>class field</b>; any CRS, reprojected to each raster);
<i>segment</i> can instead use a <b>label raster</b> (class index per pixel, on the training raster's grid).
<i>classify</i> learns from a <b>chip folder</b> (one sub-folder per class holding image chips, PNG/TIFF), or
learns from the training rasters + labelled polygons (windows inside each polygon take its class).</p>
<p><b>Encoder</b>: the pretrained encoder package to start from (empty: random initialisation, for tests only).
<b>Classes</b>: class names in the order you want (empty: the sorted values found). <b>Background</b>: the class
given to unlabelled pixels around your polygons (empty: they are ignored).</p>
<p><b>Epochs / time budget</b>: training stops at whichever comes first (and earlier when validation stops
improving); the best model found is kept. <b>Shots</b>: classification only, N training chips per class.
<b>Linear probe</b>: freeze the encoder, train the head only (fast, few labels).</p>
<p>Validation uses spatially separate blocks (or held-out chips); metrics and curves are saved in the package.</p>"""

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterEnum("TASK", "Task", FINETUNE_TASKS, defaultValue=0))
        self.addParameter(QgsProcessingParameterMultipleLayers("RASTERS", "Training rasters (segment, detect, classify)",
                                                               QgsProcessing.TypeRaster, optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELS", "Labelled polygons (segment, detect, classify)",
                                                              [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterField("CLASS_FIELD", "Class field", parentLayerParameterName="LABELS",
                                                      optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer("LABEL_RASTER", "Label raster (segment, instead of "
                                                            "polygons)", optional=True))
        self.addParameter(QgsProcessingParameterFile("CHIPS", "Chip folder, one sub-folder per class (classify)",
                                                     behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.add_package_parameters("ENCODER", "Encoder to start from", ("embed", "reconstruct"), optional=False)
        self.addParameter(QgsProcessingParameterString("CLASSES", "Classes in order (comma-separated; empty: found "
                                                       "in the labels)", optional=True))
        self.addParameter(QgsProcessingParameterString("BACKGROUND", "Background class for unlabelled pixels "
                                                       "(segment)", optional=True))
        self.addParameter(QgsProcessingParameterNumber("EPOCHS", "Maximum epochs", QgsProcessingParameterNumber.Integer,
                                                       50, minValue=1))
        self.addParameter(minutes_parameter("MAX_MINUTES", "Time budget in minutes (0: none)", 5.0))
        self.addParameter(QgsProcessingParameterEnum("MODE", "Mode", [MODE_LABELS[m] for m in MODES], defaultValue=0))
        self.addParameter(advanced(QgsProcessingParameterBoolean("LINEAR_PROBE", "Linear probe (freeze the encoder and "
                                                                 "train the task head by gradient steps, as a full "
                                                                 "fine-tune; the Quick mode fits a light head instead)",
                                                                 False)))
        self.addParameter(advanced(QgsProcessingParameterNumber("SHOTS", "Shots per class (classify; empty: all)",
                                                                QgsProcessingParameterNumber.Integer, optional=True,
                                                                minValue=1)))
        self.addParameter(advanced(QgsProcessingParameterNumber("BATCH_SIZE", "Batch size",
                                                                QgsProcessingParameterNumber.Integer, 16, minValue=1)))
        self.addParameter(advanced(QgsProcessingParameterNumber("SEED", "Random seed",
                                                                QgsProcessingParameterNumber.Integer, 0, minValue=0)))
        self.addParameter(advanced(QgsProcessingParameterEnum("DEVICE", "Device", DEVICES, defaultValue=0)))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", "Fine-tuned model package"))
        self.addOutput(QgsProcessingOutputString("METRICS", "Validation metrics (JSON)"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        ok, message = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, message
        task = FINETUNE_TASKS[self.parameterAsEnum(parameters, "TASK", context)]
        has = {k: is_set(parameters, k) for k in ("RASTERS", "LABELS", "CLASS_FIELD", "LABEL_RASTER", "CHIPS")}
        if task == "classify" and not has["CHIPS"] and not (has["RASTERS"] and has["LABELS"]):
            return False, ("classification fine-tuning needs a chip folder (one sub-folder of chips per class), or "
                           "training rasters with labelled polygons and their class field")
        if task == "classify" and has["LABELS"] and not has["CLASS_FIELD"]:
            return False, "choose the class field of the labelled polygons"
        if task != "classify":
            if not has["RASTERS"]:
                return False, f"{task} fine-tuning needs at least one training raster"
            if has["LABELS"] and not has["CLASS_FIELD"]:
                return False, "choose the class field of the labelled polygons"
            if task == "detect" and not has["LABELS"]:
                return False, "detection fine-tuning needs labelled polygons (one box per object) and a class field"
            if task == "segment" and has["LABELS"] == has["LABEL_RASTER"]:
                return False, "segmentation fine-tuning needs labelled polygons or a label raster (one of them)"
        return self.check_package(parameters, context, "ENCODER", None)  # none: random initialisation

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        task = FINETUNE_TASKS[self.parameterAsEnum(parameters, "TASK", context)]
        ok, message = self.checkParameterValues(parameters, context)
        if not ok:
            raise QgsProcessingException(message)
        output = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        overwrite = prepare_output_folder(output, "model package")
        config = {"epochs": self.parameterAsInt(parameters, "EPOCHS", context),
                  "linear_probe": self.parameterAsBool(parameters, "LINEAR_PROBE", context),
                  "batch_size": self.parameterAsInt(parameters, "BATCH_SIZE", context),
                  "seed": self.parameterAsInt(parameters, "SEED", context),
                  "device": DEVICES[self.parameterAsEnum(parameters, "DEVICE", context)]}
        minutes = self.parameterAsDouble(parameters, "MAX_MINUTES", context)
        if minutes > 0:
            config["max_minutes"] = minutes
        mode = MODES[self.parameterAsEnum(parameters, "MODE", context)]
        if mode != "auto":  # the training side's default: sent only when chosen otherwise (as the dialog does)
            config["mode"] = mode
        if is_set(parameters, "SHOTS"):
            config["shots"] = self.parameterAsInt(parameters, "SHOTS", context)
        request = {"task": "finetune", "kind": task, "output": output, "overwrite": overwrite, "config": config}
        if self.package_path(parameters, context, "ENCODER"):  # the installed one chosen, or a path
            request["encoder"] = self.package_card(parameters, context, "ENCODER").path
        classes = parse_bands(self.parameterAsString(parameters, "CLASSES", context))
        if classes:
            request["classes"] = classes
        background = self.parameterAsString(parameters, "BACKGROUND", context).strip()
        if background:
            request["background"] = background
        if task == "classify" and is_set(parameters, "CHIPS"):
            request["chips"] = self.parameterAsFile(parameters, "CHIPS", context)
        else:
            request["rasters"] = layer_files(self.parameterAsLayerList(parameters, "RASTERS", context))
            if is_set(parameters, "LABELS"):
                # a file GDAL/fiona opens as-is, or a temporary GeoPackage (memory layers, selections,
                # filters, one layer of a multi-layer GeoPackage)
                request["labels"] = self.parameterAsCompatibleSourceLayerPath(
                    parameters, "LABELS", context, ["shp"], "gpkg", feedback)
                request["class_field"] = self.parameterAsString(parameters, "CLASS_FIELD", context)
            else:
                request["label_raster"] = layer_files([self.parameterAsRasterLayer(parameters, "LABEL_RASTER",
                                                                                   context)])[0]
        feedback.pushInfo(f"fine-tuning a {task} model into {output}")
        result = self.engine_request(feedback, lambda client, bridge: client.request(
            "run", bridge.on_event, bridge.is_cancelled, **request), log_progress=True)
        metrics = {k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str, list, dict))}
        feedback.pushInfo(f"result: {to_json(metrics)}")
        return {"OUTPUT": output, "METRICS": to_json(metrics)}


class PretrainAlgorithm(SarmaeAlgorithm):
    NAME, DISPLAY, GROUP = "pretrain", "Pretrain an encoder (SARMAE)", "training"
    HELP = """<p>Pretrain a SARMAE encoder (masked autoencoder + SAR speckle noise) on your own unlabelled SAR
data, within a time budget. Writes a <b>run folder</b> (checkpoints, config.yaml, metrics.csv, loss curves,
reconstruction previews) and, if asked, an <b>encoder package</b> to fine-tune from.</p>
<p><b>Chip folder</b>: SAR chips (PNG/TIFF, searched recursively); <b>rasters</b>: large SAR rasters to sample
windows from. Give one or both.</p>
<p><b>Preset</b>: <i>cpu_vit_tiny</i> (ViT-Tiny, 128 px, 1 channel: minutes on a laptop CPU) or
<i>sarmae_vitb_reference</i> (the paper's ViT-B/16; a GPU job). A YAML <b>config file</b> replaces the preset.
<b>Channels / image size / epochs / batch size</b> override the preset when set. <b>Overrides</b>: more
settings as <code>section.key=value</code>, separated by spaces (e.g. <code>optim.lr=5e-4 run.max_steps=100</code>).</p>
<p><b>Resume</b>: continue the run in the output folder from its last checkpoint (same settings). Multi-GPU
pretraining runs from the command line (<code>torchrun ... sarmae pretrain</code>).</p>"""

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile("DATA", "Chip folder", behavior=QgsProcessingParameterFile.Folder,
                                                     optional=True))
        self.addParameter(QgsProcessingParameterMultipleLayers("RASTERS", "Rasters to sample windows from",
                                                               QgsProcessing.TypeRaster, optional=True))
        self.addParameter(QgsProcessingParameterEnum("CONFIG", "Preset", PRESETS, defaultValue=0))
        self.addParameter(advanced(QgsProcessingParameterFile("CONFIG_FILE", "Config file (YAML, replaces the preset)",
                                                              extension="yaml", optional=True)))
        self.addParameter(QgsProcessingParameterNumber("IN_CHANS", "Channels (empty: the preset's)",
                                                       QgsProcessingParameterNumber.Integer, optional=True, minValue=1))
        self.addParameter(QgsProcessingParameterNumber("IMG_SIZE", "Image size in pixels (empty: the preset's)",
                                                       QgsProcessingParameterNumber.Integer, optional=True, minValue=16))
        self.addParameter(QgsProcessingParameterNumber("EPOCHS", "Epochs (empty: the preset's)",
                                                       QgsProcessingParameterNumber.Integer, optional=True, minValue=1))
        self.addParameter(QgsProcessingParameterNumber("BATCH_SIZE", "Batch size (empty: the preset's)",
                                                       QgsProcessingParameterNumber.Integer, optional=True, minValue=1))
        self.addParameter(minutes_parameter("MAX_MINUTES", "Time budget in minutes (0: none)", 30.0))
        self.addParameter(advanced(QgsProcessingParameterString("OVERRIDES", "Overrides (section.key=value ...)",
                                                                optional=True)))
        self.addParameter(QgsProcessingParameterBoolean("RESUME", "Resume the run in the output folder", False))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", "Run folder"))
        self.addParameter(QgsProcessingParameterFolderDestination("ENCODER", "Encoder package", optional=True,
                                                                  createByDefault=False))
        self.addOutput(QgsProcessingOutputString("SUMMARY", "Summary (JSON)"))

    def overrides(self, parameters, context) -> list[str]:
        out = []
        data = []
        if is_set(parameters, "DATA"):
            data.append(self.parameterAsFile(parameters, "DATA", context))
        data += layer_files(self.parameterAsLayerList(parameters, "RASTERS", context))
        if not data:
            raise QgsProcessingException("give the pretraining data: a chip folder and/or rasters")
        out.append("data.paths=" + to_json(data))
        for name, key in (("IN_CHANS", "model.in_chans"), ("IMG_SIZE", "model.img_size"),
                          ("EPOCHS", "optim.epochs"), ("BATCH_SIZE", "optim.batch_size")):
            if is_set(parameters, name):
                out.append(f"{key}={self.parameterAsInt(parameters, name, context)}")
        minutes = self.parameterAsDouble(parameters, "MAX_MINUTES", context)
        if minutes > 0:
            out.append(f"run.max_minutes={minutes}")
        out += self.parameterAsString(parameters, "OVERRIDES", context).split()
        return out

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        output = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        resume = self.parameterAsBool(parameters, "RESUME", context)
        config = self.parameterAsFile(parameters, "CONFIG_FILE", context) or \
            PRESETS[self.parameterAsEnum(parameters, "CONFIG", context)]
        overrides = [*self.overrides(parameters, context), f"run.output={to_json(output)}"]
        feedback.pushInfo(f"pretraining with {config}: {' '.join(overrides)}")
        summary = self.engine_request(feedback, lambda client, bridge: client.request(
            "run", bridge.on_event, bridge.is_cancelled, task="pretrain", config=config, overrides=overrides,
            resume=resume), log_progress=True) or {}
        feedback.pushInfo(f"pretraining summary: {to_json(summary)}")
        encoder = self.parameterAsFileOutput(parameters, "ENCODER", context) if is_set(parameters, "ENCODER") else ""
        if encoder:
            checkpoint = Path(output) / "last.pt"
            if not checkpoint.is_file():
                raise QgsProcessingException(f"{output} holds no last.pt checkpoint to make an encoder package from")
            overwrite = prepare_output_folder(encoder, "encoder package")
            self.engine_cli(["convert", str(checkpoint), "--task", "embed", "--output", encoder,
                             *(["--overwrite"] if overwrite else [])], feedback)
        return {"OUTPUT": output, "ENCODER": encoder or None, "SUMMARY": to_json(summary)}
