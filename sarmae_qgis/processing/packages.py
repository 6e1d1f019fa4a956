"""Model package tools: ONNX export (through the engine's command line, ``sarmae export``)."""

from __future__ import annotations

from qgis.core import (
    QgsProcessingOutputFolder,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
)

from ..model_cards import read_card
from .base import SarmaeAlgorithm, advanced, is_set
from .training import prepare_output_folder


class ExportOnnxAlgorithm(SarmaeAlgorithm):
    NAME, DISPLAY, GROUP = "export_onnx", "Export model package to ONNX", "packages"
    HELP = """<p>Add an ONNX export (<code>model.onnx</code>) to a model package, so that it runs with ONNX Runtime
(backend <i>onnxruntime</i>), e.g. on a machine without PyTorch. The export is checked against PyTorch on
random input and refused when they disagree.</p>
<p><b>Output package</b>: write a new package (copy + model.onnx) there; empty: update the given package in
place.</p>"""

    def initAlgorithm(self, config=None):  # noqa: N802
        self.add_package_parameters("MODEL", "Model package")
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
        args = ["export", card.path, "--opset", str(self.parameterAsInt(parameters, "OPSET", context))]
        if output:
            prepare_output_folder(output, "model package")
            args += ["--output", output]
        self.engine_cli(args, feedback)
        package = output or card.path
        if not read_card(package).has_onnx:
            feedback.reportError(f"{package}: no model.onnx after the export")
        return {"OUTPUT": output or None, "PACKAGE": package}
