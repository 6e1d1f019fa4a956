"""The Processing provider ``sarmae``: every SARMAE algorithm, usable from the toolbox, in batch
mode, in the graphical modeler and through ``qgis_process`` (DESIGN.md, "Interfaces")."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from ..toolbelt.metadata import plugin_version
from .base import ICON_PATH
from .inference import (
    ClassifyAlgorithm,
    DetectAlgorithm,
    EmbedAlgorithm,
    ReconstructAlgorithm,
    SegmentAlgorithm,
    TextqueryAlgorithm,
    ZeroshotAlgorithm,
)
from .packages import ExportOnnxAlgorithm
from .similarity import SimilarityAlgorithm
from .training import FinetuneAlgorithm, PretrainAlgorithm

PROVIDER_ID = "sarmae"
ALGORITHMS = (SegmentAlgorithm, DetectAlgorithm, ClassifyAlgorithm, EmbedAlgorithm, ReconstructAlgorithm,
              ZeroshotAlgorithm, TextqueryAlgorithm, SimilarityAlgorithm, FinetuneAlgorithm, PretrainAlgorithm, ExportOnnxAlgorithm)


class SarmaeProvider(QgsProcessingProvider):
    """Provider ``sarmae`` ("SARMAE"); outputs are GeoTIFF rasters and GeoPackage vectors."""

    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return "SARMAE"

    def longName(self) -> str:  # noqa: N802  # QGIS API names
        return f"SARMAE {plugin_version()} (SAR foundation model)"

    def icon(self) -> QIcon:
        return QIcon(str(ICON_PATH))

    def svgIconPath(self) -> str:  # noqa: N802
        return str(ICON_PATH)

    def loadAlgorithms(self) -> None:  # noqa: N802
        for cls in ALGORITHMS:
            self.addAlgorithm(cls())

    # the engine writes GeoTIFF and GeoPackage only
    def supportedOutputRasterLayerExtensions(self) -> list[str]:  # noqa: N802
        return ["tif"]

    def supportedOutputVectorLayerExtensions(self) -> list[str]:  # noqa: N802
        return ["gpkg"]

    def defaultRasterFileExtension(self) -> str:  # noqa: N802
        return "tif"

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:  # noqa: N802, N803
        return "gpkg"
