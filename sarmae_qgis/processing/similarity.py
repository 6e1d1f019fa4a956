"""Similarity search on an embedding raster: cosine similarity of every cell to a query point."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterPoint,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
)

from ..errors import SarmaePluginError
from ..tasks.similarity_task import request_similarity
from ..toolbelt.layers import raster_file
from .base import SarmaeAlgorithm
from .inference import style_when_loaded


class SimilarityAlgorithm(SarmaeAlgorithm):
    NAME, DISPLAY, GROUP = "similarity", "Similarity search (embedding)", "inference"
    HELP = ("<p>Cosine similarity (-1..1) of every cell of an <b>embedding raster</b> (made by <i>Embed SAR "
            "raster</i>) to the embedding at the <b>query point</b>: bright where the image looks like the "
            "place you clicked (ships like this ship, fields like this field).</p>"
            "<p>The point may be in any CRS (e.g. picked on the map canvas); it is reprojected to the "
            "embedding raster's CRS and must fall inside the raster.</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("EMBEDDING", "Embedding raster"))
        self.addParameter(QgsProcessingParameterPoint("QUERY", "Query point"))
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT", "Similarity raster"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        layer = self.parameterAsRasterLayer(parameters, "EMBEDDING", context)
        try:
            path = raster_file(layer)
        except SarmaePluginError as e:
            raise QgsProcessingException(str(e)) from e
        point = self.parameterAsPoint(parameters, "QUERY", context, layer.crs())
        if not layer.extent().contains(point):
            raise QgsProcessingException(f"the query point ({point.x():.2f}, {point.y():.2f} in "
                                         f"{layer.crs().authid() or 'the raster CRS'}) is outside the embedding "
                                         f"raster '{layer.name()}'; pick a point on the raster")
        output = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        feedback.pushInfo(f"query point {point.x():.3f}, {point.y():.3f} ({layer.crs().authid()})")
        result = self.engine_request(feedback, lambda client, bridge: request_similarity(
            client, path, output, [point.x(), point.y()], bridge.on_event, bridge.is_cancelled))
        feedback.pushInfo(f"similarity to {result.get('query_cells')} embedding cell(s): {result.get('output')}")
        style_when_loaded(context, output, "similarity", [])
        return {"OUTPUT": output}
