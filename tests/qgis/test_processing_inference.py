"""``processing.run("sarmae:...")`` end to end with the real engine worker and tiny random models:
outputs on the input's grid, the task check, layers that are not files, band choice, a model in
the graphical modeler, batch-style repeated runs, similarity with a reprojected query point."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from osgeo import gdal
from qgis import processing
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingModelAlgorithm,
    QgsProcessingModelChildAlgorithm,
    QgsProcessingModelChildParameterSource,
    QgsProcessingModelOutput,
    QgsProcessingModelParameter,
    QgsProcessingParameterRasterLayer,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("provider")]


class Recorder(QgsProcessingFeedback):
    """Feedback that keeps what the algorithm reported."""

    def __init__(self) -> None:
        super().__init__()
        self.infos: list[str] = []
        self.progress_values: list[float] = []
        self.progressChanged.connect(self.progress_values.append)

    def pushInfo(self, info: str) -> None:  # noqa: N802
        self.infos.append(info)
        super().pushInfo(info)


def same_grid(a: str, b: str) -> None:
    ra, rb = QgsRasterLayer(a, "a", "gdal"), QgsRasterLayer(b, "b", "gdal")
    assert ra.isValid() and rb.isValid()
    assert ra.crs() == rb.crs()
    assert ra.extent() == rb.extent()
    assert (ra.width(), ra.height()) == (rb.width(), rb.height())


def test_segment_end_to_end(assets, tmp_path):
    feedback = Recorder()
    out = processing.run("sarmae:segment", {
        "INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "segment.pkg"), "BATCH_SIZE": 8,
        "DEVICE": 1, "OUTPUT": str(tmp_path / "classes.tif"), "CONFIDENCE": str(tmp_path / "conf.tif"),
        "VECTORS": str(tmp_path / "polygons.gpkg")}, feedback=feedback)
    assert out["OUTPUT"] == str(tmp_path / "classes.tif") and Path(out["OUTPUT"]).is_file()
    same_grid(out["OUTPUT"], str(assets / "scene.tif"))
    same_grid(out["CONFIDENCE"], str(assets / "scene.tif"))
    polygons = QgsVectorLayer(out["VECTORS"], "p", "ogr")
    assert polygons.isValid() and polygons.featureCount() > 0 and "class_name" in polygons.fields().names()
    stats = json.loads(out["STATISTICS"])
    assert set(stats["per_class"]) == {"water", "land"} and stats["pixels"] == 64 * 64
    assert feedback.progress_values and max(feedback.progress_values) == pytest.approx(100.0)
    assert any("model" in line for line in feedback.infos)  # engine log lines reach pushInfo
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".aux.xml"))
    assert left == ["classes.tif", "conf.tif", "polygons.gpkg"]  # the staging folder is gone


def test_segment_temporary_outputs_without_vectors(assets):
    out = processing.run("sarmae:segment", {"INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "segment.pkg"),
                                            "OUTPUT": "TEMPORARY_OUTPUT", "CONFIDENCE": "TEMPORARY_OUTPUT"})
    assert Path(out["OUTPUT"]).is_file() and Path(out["CONFIDENCE"]).is_file()
    assert out["VECTORS"] is None


def test_detect_and_classify(assets, tmp_path):
    det = processing.run("sarmae:detect", {"INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "detect.pkg"),
                                           "SCORE_THRESHOLD": 0.0, "OUTPUT": str(tmp_path / "ships.gpkg")})
    layer = QgsVectorLayer(det["OUTPUT"], "d", "ogr")
    assert layer.isValid() and {"class_name", "score"} <= set(layer.fields().names())
    assert json.loads(det["STATISTICS"])["detections"] == layer.featureCount()
    zipped = shutil.make_archive(str(tmp_path / "classify"), "zip", assets, "classify.pkg")  # a zipped package
    cls = processing.run("sarmae:classify", {"INPUT": str(assets / "scene.tif"), "MODEL": zipped,
                                             "OUTPUT": str(tmp_path / "grid.gpkg")})
    grid = QgsVectorLayer(cls["OUTPUT"], "g", "ogr")
    assert grid.isValid() and grid.featureCount() == 4  # 64 px / 32 px windows, no overlap
    assert grid.crs().authid() == "EPSG:32631"


def test_embed_then_similarity_with_reprojected_point(assets, tmp_path):
    emb = processing.run("sarmae:embed", {"INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "embed.pkg"),
                                          "OUTPUT": str(tmp_path / "emb.tif"), "PCA": str(tmp_path / "pca.tif")})
    layer = QgsRasterLayer(emb["OUTPUT"], "e", "gdal")
    assert layer.isValid() and layer.bandCount() == 192 and (layer.width(), layer.height()) == (4, 4)
    assert QgsRasterLayer(emb["PCA"], "p", "gdal").bandCount() == 3
    # query: the centre of the scene, given in WGS 84 (the raster is in UTM 31N)
    centre = layer.extent().center()
    to_wgs84 = QgsCoordinateTransform(layer.crs(), QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    p = to_wgs84.transform(centre)
    sim = processing.run("sarmae:similarity", {"EMBEDDING": emb["OUTPUT"], "QUERY": f"{p.x()},{p.y()} [EPSG:4326]",
                                               "OUTPUT": str(tmp_path / "sim.tif")})
    same_grid(sim["OUTPUT"], emb["OUTPUT"])
    sim_layer = QgsRasterLayer(sim["OUTPUT"], "s", "gdal")
    stats = sim_layer.dataProvider().bandStatistics(1)
    assert stats.maximumValue == pytest.approx(1.0, abs=1e-3)  # the query cell is most similar to itself
    with pytest.raises(QgsProcessingException, match="outside the embedding raster"):
        processing.run("sarmae:similarity", {"EMBEDDING": emb["OUTPUT"], "QUERY": "0,0 [EPSG:4326]",
                                             "OUTPUT": str(tmp_path / "sim2.tif")})


def test_reconstruct(assets, tmp_path):
    out = processing.run("sarmae:reconstruct", {"INPUT": str(assets / "scene.tif"),
                                                "MODEL": str(assets / "reconstruct.pkg"),
                                                "OUTPUT": str(tmp_path / "rec.tif")})
    same_grid(out["OUTPUT"], str(assets / "scene.tif"))


def test_wrong_task_is_refused_with_a_clear_message(assets, tmp_path):
    with pytest.raises(QgsProcessingException, match="is a detect model, not a segment model"):
        processing.run("sarmae:segment", {"INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "detect.pkg"),
                                          "OUTPUT": str(tmp_path / "x.tif"), "CONFIDENCE": str(tmp_path / "c.tif")})
    segment = QgsApplication.processingRegistry().algorithmById("sarmae:segment")
    ok, message = segment.checkParameterValues({"INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "embed.pkg"),
                                                "OUTPUT": "x.tif", "CONFIDENCE": "c.tif"}, QgsProcessingContext())
    assert not ok and "embed model" in message
    with pytest.raises(QgsProcessingException, match="model package not found"):
        processing.run("sarmae:detect", {"INPUT": str(assets / "scene.tif"), "MODEL": str(tmp_path / "nothing.pkg"),
                                         "OUTPUT": str(tmp_path / "d.gpkg")})
    assert not list(tmp_path.iterdir())


def test_engine_refusals_name_the_parameters_not_command_line_flags(assets, tmp_path):
    with pytest.raises(QgsProcessingException) as info:
        processing.run("sarmae:segment", {"INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "segment.pkg"),
                                          "WINDOW": 100000, "OUTPUT": str(tmp_path / "x.tif"),
                                          "CONFIDENCE": str(tmp_path / "c.tif")})
    message = str(info.value)
    assert "WINDOW 100000 with BATCH_SIZE" in message and "GiB of memory" in message, message
    assert "--window" not in message and "--batch-size" not in message, message
    assert not list(tmp_path.iterdir())


def test_layer_that_is_not_a_file_is_refused(assets, tmp_path):
    gdal.Translate("/vsimem/sarmae_scene.tif", str(assets / "scene.tif"))
    try:
        layer = QgsRasterLayer("/vsimem/sarmae_scene.tif", "in memory", "gdal")
        assert layer.isValid()
        QgsProject.instance().addMapLayer(layer)
        with pytest.raises(QgsProcessingException, match="not a file on disk"):
            processing.run("sarmae:segment", {"INPUT": layer.id(), "MODEL": str(assets / "segment.pkg"),
                                              "OUTPUT": str(tmp_path / "x.tif"), "CONFIDENCE": str(tmp_path / "c.tif")})
    finally:
        QgsProject.instance().removeAllMapLayers()
        gdal.Unlink("/vsimem/sarmae_scene.tif")


def test_bands_must_match_the_model(assets, tmp_path):
    params = {"INPUT": str(assets / "scene3.tif"), "MODEL": str(assets / "segment.pkg"),
              "OUTPUT": str(tmp_path / "x.tif"), "CONFIDENCE": str(tmp_path / "c.tif")}
    with pytest.raises(QgsProcessingException, match=r"takes 2 channel\(s\).*has 3 band\(s\).*e\.g\. VV,VH"):
        processing.run("sarmae:segment", params)
    with pytest.raises(QgsProcessingException, match="band 'HH' is not in layer"):
        processing.run("sarmae:segment", {**params, "BANDS": "VV,HH"})
    out = processing.run("sarmae:segment", {**params, "BANDS": "VV,VH"})  # by name
    same_grid(out["OUTPUT"], str(assets / "scene3.tif"))
    out = processing.run("sarmae:segment", {**params, "BANDS": "1,2"})  # by number, replacing outputs
    assert Path(out["OUTPUT"]).is_file()


def test_in_a_model_of_the_graphical_modeler(assets, tmp_path):
    """A model with a SARMAE child algorithm (what the graphical modeler builds) runs."""
    model = QgsProcessingModelAlgorithm("sarmae flood model", "tests")
    model.addModelParameter(QgsProcessingParameterRasterLayer("scene", "SAR scene"), QgsProcessingModelParameter("scene"))
    child = QgsProcessingModelChildAlgorithm("sarmae:segment")
    child.setChildId("segment")
    child.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("scene")])
    child.addParameterSources("MODEL", [QgsProcessingModelChildParameterSource.fromStaticValue(str(assets / "segment.pkg"))])
    child.addParameterSources("BATCH_SIZE", [QgsProcessingModelChildParameterSource.fromStaticValue(4)])
    for name in ("OUTPUT", "CONFIDENCE"):
        output = QgsProcessingModelOutput(name.lower())
        output.setChildOutputName(name)
        output.setChildId("segment")
        child.setModelOutputs({**child.modelOutputs(), name.lower(): output})
    model.addChildAlgorithm(child)
    model.updateDestinationParameters()
    out = processing.run(model, {"scene": str(assets / "scene.tif"), "segment:output": str(tmp_path / "m.tif"),
                                 "segment:confidence": str(tmp_path / "mc.tif")})
    assert Path(out["segment:output"]).is_file()
    same_grid(out["segment:output"], str(assets / "scene.tif"))


def test_batch_style_runs_reuse_the_engine(assets, tmp_path):
    """Batch mode = the same algorithm run once per row; the worker (and its model cache) is shared."""
    from sarmae_qgis.toolbelt.engine import get_client

    for k in range(3):
        processing.run("sarmae:classify", {"INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "classify.pkg"),
                                           "OUTPUT": str(tmp_path / f"grid{k}.gpkg")})
    info = get_client().info()
    assert any(m["name"] == "tiny-classify" for m in info["loaded_models"])
    assert len(list(tmp_path.glob("grid*.gpkg"))) == 3


def test_engine_that_cannot_start_says_where_to_fix_it(assets, tmp_path):
    from sarmae_qgis.toolbelt import settings

    (tmp_path / "python3").write_text("#!/bin/sh\nexit 3\n")
    (tmp_path / "python3").chmod(0o755)
    settings.set_value("engine_python", str(tmp_path / "python3"))
    try:
        with pytest.raises(QgsProcessingException, match="SARMAE > Settings"):
            processing.run("sarmae:classify", {"INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "classify.pkg"),
                                               "OUTPUT": str(tmp_path / "g.gpkg")})
    finally:
        settings.set_value("engine_python", sys.executable)


def test_outputs_loaded_by_processing_get_the_class_colours(assets, tmp_path, project):
    """What the toolbox does: outputs loaded on completion are styled from the model's classes."""
    from qgis.core import QgsPalettedRasterRenderer, QgsSingleBandPseudoColorRenderer

    processing.runAndLoadResults("sarmae:segment", {
        "INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "segment.pkg"),
        "OUTPUT": str(tmp_path / "classes.tif"), "CONFIDENCE": str(tmp_path / "confidence.tif")})
    layers = {Path(layer.source()).name: layer for layer in project.mapLayers().values()}
    renderer = layers["classes.tif"].renderer()
    assert isinstance(renderer, QgsPalettedRasterRenderer)
    assert [(c.color.name(), c.label) for c in renderer.classes()] == [("#1f77b4", "water"), ("#d62728", "land")]
    assert isinstance(layers["confidence.tif"].renderer(), QgsSingleBandPseudoColorRenderer)
    # translucent like the Run dialog's results, and marked as outputs (not offered first as a model input)
    assert layers["classes.tif"].opacity() < 1 and layers["confidence.tif"].opacity() < 1
    assert layers["classes.tif"].customProperty("sarmae/role") == "class"
