"""Model package tools: ONNX export, fp32 or int8 (through the engine's command line, ``sarmae export``)."""

from __future__ import annotations

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputFolder,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
)

from ..errors import SarmaePluginError
from ..model_cards import read_card
from ..tasks.export_task import PRECISIONS, export_args
from ..toolbelt.layers import raster_file
from .base import SarmaeAlgorithm, advanced, is_set
from .training import prepare_output_folder


class ExportOnnxAlgorithm(SarmaeAlgorithm):
    NAME, DISPLAY, GROUP = "export_onnx", "Export model package to ONNX", "packages"
    HELP = """<p>Add an ONNX export (<code>model.onnx</code>) to a model package, so that it runs with ONNX Runtime
(backend <i>onnxruntime</i>), e.g. on a machine without PyTorch. The export is checked against PyTorch on
random input and refused when they disagree.</p>
<p><b>Precision</b>: <i>fp32</i> writes model.onnx; <i>int8</i> also writes <code>model.int8.onnx</code>, the
model with int8 matrix products for CPUs (ONNX Runtime's quantisation), which runs with precision <i>int8</i>
(or <i>auto</i> on a CPU with VNNI / AMX). It is written only if it agrees with the fp32 model on the
<b>calibration raster</b>'s windows (pixel labels, top-1 labels or embeddings: 99 %, or a cosine of 0.99);
the figure is recorded in the package and shown in its card. Give a scene like those the model will process;
without one the check runs on random windows and means little. <b>Write below the gate</b> writes it anyway
(recorded as forced).</p>
<p><b>Output package</b>: write a new package (copy + model.onnx) there; empty: update the given package in
place.</p>"""

    def initAlgorithm(self, config=None):  # noqa: N802
        self.add_package_parameters("MODEL", "Model package")
        self.addParameter(QgsProcessingParameterEnum("PRECISION", "Precision (int8: also model.int8.onnx)",
                                                     list(PRECISIONS), defaultValue="fp32", usesStaticStrings=True))
        self.addParameter(QgsProcessingParameterRasterLayer("CALIBRATION", "Calibration raster (int8: a scene like "
                                                            "those the model will process)", optional=True))
        self.addParameter(advanced(QgsProcessingParameterBoolean("FORCE", "int8: write below the quality gate "
                                                                 "(recorded as forced)", False)))
        self.addParameter(advanced(QgsProcessingParameterNumber("OPSET", "ONNX opset",
                                                                QgsProcessingParameterNumber.Integer, 17,
                                                                minValue=13, maxValue=21)))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", "Output package (empty: update in place)",
                                                                  optional=True, createByDefault=False))
        self.addOutput(QgsProcessingOutputFolder("PACKAGE", "Package with model.onnx"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        ok, message = super().checkParameterValues(parameters, context)
        return (ok, message) if not ok else self.check_package(parameters, context, "MODEL", None, required=True)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        card = self.package_card(parameters, context, "MODEL")
        output = self.parameterAsFileOutput(parameters, "OUTPUT", context) if is_set(parameters, "OUTPUT") else ""
        precision = self.parameterAsEnumString(parameters, "PRECISION", context) or "fp32"
        calibration = None
        if precision == "int8" and is_set(parameters, "CALIBRATION"):
            try:
                calibration = raster_file(self.parameterAsRasterLayer(parameters, "CALIBRATION", context))
            except SarmaePluginError as e:
                raise QgsProcessingException(str(e)) from e
        if output:
            prepare_output_folder(output, "model package")
        self.engine_cli(export_args(card.path, precision, calibration,
                                    self.parameterAsBool(parameters, "FORCE", context), output or None,
                                    self.parameterAsInt(parameters, "OPSET", context)), feedback)
        package = output or card.path
        written = read_card(package)
        if not written.has_onnx or (precision == "int8" and not written.has_int8):
            feedback.reportError(f"{package}: no {'model.int8.onnx' if precision == 'int8' else 'model.onnx'} "
                                 "after the export")
        return {"OUTPUT": output or None, "PACKAGE": package}
