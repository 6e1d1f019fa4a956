"""``sarmae:cfar``: the constant false-alarm rate ship detector, with no model and no training.

The analyst sets the CFAR parameters here; the algorithm has the engine write a CFAR package for
them (``sarmae init --task detect --method cfar``: model.json alone, no weights) into the plugin's
cache, keyed by the settings, and runs it like any detection package. The same settings reuse the
same package, so the engine's model cache answers a batch of runs with one load. The engine
converts dB / amplitude / 8-bit to linear power before testing (never CFAR on dB values).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputString,
    QgsProcessingParameterEnum,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)

from ..errors import SarmaePluginError
from ..model_cards import read_card
from ..toolbelt import settings
from ..toolbelt.layers import raster_file
from .base import advanced, is_set
from .inference import UNITS, ModelAlgorithm

STATISTICS = [("ca", "Cell averaging (CA): mean of the background ring"),
              ("os", "Order statistic (OS): a rank of the ring; robust next to other ships")]
WINDOW_UNITS = [("px", "pixels"), ("m", "metres (needs a georeferenced raster or a pixel spacing)")]


def cache_folder() -> Path:
    """Where the CFAR packages made for Processing runs live (in the QGIS profile)."""
    return settings.profile_folder() / "sarmae" / "cache" / "cfar"


class CfarAlgorithm(ModelAlgorithm):
    NAME, DISPLAY, TASK, MAIN_ROLE = "cfar", "Detect ships with CFAR (no model)", "detect", "detections"
    OUTPUTS = {"detections": ("OUTPUT", "vector", "Detections", False)}
    HELP = (
        "<p>Constant false-alarm rate (CFAR) detection of bright objects, ships at sea above all: the classic SAR "
        "detector (as in SNAP's ocean object detection). No model and no training: each pixel is compared with the "
        "clutter in a <b>background</b> ring around it (a <b>guard</b> window in the middle leaves the object "
        "itself out), on linear power (dB, amplitude and 8-bit data are converted first). Connected detections "
        "become boxes with a score (how far above the threshold), area and length (m<sup>2</sup> / m on a "
        "georeferenced raster, pixels otherwise), merged across strips; memory stays flat on whole scenes.</p>"
        "<p><b>Band</b>: the band tested (1 = the first; VV or HH is usual for ships). "
        "<b>Statistic</b>: cell averaging, or order statistic (keeps a ship's neighbour out of its clutter). "
        "<b>False-alarm probability</b>: per pixel on homogeneous clutter, e.g. 1e-6; lower finds fewer, brighter "
        "objects. <b>Guard / background</b>: full sides of the two windows, in the chosen units; the guard should "
        "exceed the largest ship, the background should hold enough sea. <b>Minimum area</b>: smaller objects are "
        "dropped (pixels or m<sup>2</sup>).</p>"
        "<p><b>Water mask</b> (advanced): a raster on the same grid whose water value(s) are given; boxes are kept "
        "on water only, and land does not enter the clutter statistics. <b>Looks</b>: equivalent number of looks "
        "of the clutter (1 for single-look data; multi-looked GRD is higher).</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Input SAR raster layer"))
        self.addParameter(QgsProcessingParameterNumber("BAND", "Band to test", QgsProcessingParameterNumber.Integer,
                                                       1, minValue=1))
        self.addParameter(QgsProcessingParameterEnum("STATISTIC", "Clutter statistic", [t for _, t in STATISTICS],
                                                     defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber("PFA", "False-alarm probability per pixel (0..1)",
                                                       QgsProcessingParameterNumber.Double, 1e-6, minValue=1e-15,
                                                       maxValue=0.5))
        self.addParameter(QgsProcessingParameterEnum("WINDOW_UNITS", "Units of the windows and sizes",
                                                     [t for _, t in WINDOW_UNITS], defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber("GUARD", "Guard window side", QgsProcessingParameterNumber.Double,
                                                       7.0, minValue=1.0))
        self.addParameter(QgsProcessingParameterNumber("BACKGROUND", "Background window side",
                                                       QgsProcessingParameterNumber.Double, 41.0, minValue=3.0))
        self.addParameter(QgsProcessingParameterNumber("MIN_AREA", "Minimum object area (pixels or m2)",
                                                       QgsProcessingParameterNumber.Double, 2.0, minValue=0.0))
        self.addParameter(QgsProcessingParameterString("CLASS_NAME", "Class name written with each box", "ship"))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "MAX_AREA", "Maximum object area (pixels or m2; empty: no limit)", QgsProcessingParameterNumber.Double,
            optional=True, minValue=0.0)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "MAX_LENGTH", "Maximum object length (pixels or m; empty: no limit)", QgsProcessingParameterNumber.Double,
            optional=True, minValue=0.0)))
        self.addParameter(advanced(QgsProcessingParameterNumber("LOOKS", "Equivalent number of looks",
                                                                QgsProcessingParameterNumber.Double, 1.0,
                                                                minValue=0.1)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "PIXEL_SPACING", "Pixel spacing in metres (rasters without georeferencing, metre units)",
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0)))
        self.addParameter(advanced(QgsProcessingParameterRasterLayer("WATER_MASK", "Water mask (same grid)",
                                                                     optional=True)))
        self.addParameter(advanced(QgsProcessingParameterString("WATER_VALUES", "Water value(s) of the mask",
                                                                "1", optional=True)))
        self.addParameter(advanced(QgsProcessingParameterEnum("INPUT_UNITS", "Input units (override detection)",
                                                              UNITS, defaultValue=0)))
        self.addParameter(QgsProcessingParameterVectorDestination("OUTPUT", "Detections", QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputString("STATISTICS", "Statistics (JSON)"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        ok, message = super(ModelAlgorithm, self).checkParameterValues(parameters, context)
        if not ok:
            return ok, message
        guard = self.parameterAsDouble(parameters, "GUARD", context)
        background = self.parameterAsDouble(parameters, "BACKGROUND", context)
        if background <= guard:
            return False, (f"the background window ({background:g}) must be larger than the guard window ({guard:g}): "
                           "the clutter statistics come from the ring between them")
        return True, ""

    def init_args(self, parameters: dict, context: QgsProcessingContext) -> list[str]:
        """``sarmae init`` arguments of the CFAR package for these settings (no --output)."""
        def num(name: str) -> str:
            return repr(self.parameterAsDouble(parameters, name, context))

        class_name = self.parameterAsString(parameters, "CLASS_NAME", context).strip() or "ship"
        if "," in class_name:
            raise QgsProcessingException(f"class name '{class_name}': one class, without commas")
        args = ["init", "--task", "detect", "--method", "cfar",
                "--statistic", STATISTICS[self.parameterAsEnum(parameters, "STATISTIC", context)][0],
                "--pfa", num("PFA"), "--units", WINDOW_UNITS[self.parameterAsEnum(parameters, "WINDOW_UNITS", context)][0],
                "--guard", num("GUARD"), "--background", num("BACKGROUND"), "--min-area", num("MIN_AREA"),
                "--looks", num("LOOKS"), "--classes", class_name]
        for name, flag in (("MAX_AREA", "--max-area"), ("MAX_LENGTH", "--max-length"),
                           ("PIXEL_SPACING", "--pixel-spacing")):
            if is_set(parameters, name):
                args += [flag, num(name)]
        return args

    def cfar_package(self, args: list[str], feedback) -> str:
        """The cached CFAR package for ``args``, written by the engine the first time."""
        key = hashlib.sha1(json.dumps(args).encode()).hexdigest()[:16]
        pkg = cache_folder() / f"cfar-{key}"
        if not (pkg / "model.json").is_file():
            pkg.parent.mkdir(parents=True, exist_ok=True)
            self.engine_cli([*args, "--name", f"CFAR {key[:6]}", "--output", str(pkg), "--overwrite"], feedback)
        try:
            read_card(pkg)
        except SarmaePluginError as e:
            raise QgsProcessingException(f"the CFAR package {pkg} does not read ({e}); delete that folder and "
                                         "run again") from e
        return str(pkg)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        band = self.parameterAsInt(parameters, "BAND", context)
        try:
            path = raster_file(layer)
        except SarmaePluginError as e:
            raise QgsProcessingException(str(e)) from e
        if band > layer.bandCount():
            raise QgsProcessingException(f"band {band} is not in layer '{layer.name()}': it has "
                                         f"{layer.bandCount()} band(s), numbered from 1")
        pkg = self.cfar_package(self.init_args(parameters, context), feedback)
        opts = {"bands": [band], "overwrite": True}
        units = self.parameterAsEnum(parameters, "INPUT_UNITS", context)
        if units:
            opts["input_units"] = UNITS[units]
        mask = self.parameterAsRasterLayer(parameters, "WATER_MASK", context) if is_set(parameters, "WATER_MASK") else None
        if mask is not None:
            try:
                opts["water_mask"] = raster_file(mask)
            except SarmaePluginError as e:
                raise QgsProcessingException(str(e)) from e
            values = self.parameterAsString(parameters, "WATER_VALUES", context).strip()
            if values:
                opts["water_class"] = values
        feedback.pushInfo(f"CFAR on band {band} of {path}")
        return self.run_model(parameters, context, feedback, path, pkg, opts)
