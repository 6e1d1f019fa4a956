"""Fine-tuning, pretraining and ONNX export through Processing, with tiny data and budgets.

The packages they write are checked from the plugin's side (model.json read with json) and, for
the fine-tuned segmenter, by running it with ``sarmae:segment`` again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qgis import processing
from qgis.core import (
    QgsApplication,
    QgsFeatureRequest,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProject,
    QgsVectorLayer,
)

from sarmae_qgis.model_cards import read_card

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("provider")]
TINY = {"EPOCHS": 2, "MAX_MINUTES": 0.1, "BATCH_SIZE": 8, "DEVICE": 1}


def test_finetune_segment_from_polygons_then_run_it(assets, tmp_path):
    """Labels from a layer that is not a plain file (a memory layer; a GeoPackage layer goes the same
    way) are exported to a temporary GeoPackage for the engine; the new package then runs."""
    labels = QgsVectorLayer(str(assets / "labels.gpkg"), "labels", "ogr")
    memory = labels.materialize(QgsFeatureRequest())
    assert memory.providerType() == "memory"
    QgsProject.instance().addMapLayer(memory)
    try:
        out = processing.run("sarmae:finetune", {
            "TASK": 0, "RASTERS": [str(assets / "train.tif")], "LABELS": memory.id(), "CLASS_FIELD": "class",
            "ENCODER": str(assets / "encoder.pkg"), "CLASSES": "water,land", "OUTPUT": str(tmp_path / "water.pkg"),
            **TINY})
    finally:
        QgsProject.instance().removeMapLayer(memory.id())
    card = read_card(out["OUTPUT"])
    assert card.task == "segment" and card.class_names == ["water", "land"] and card.bands == ("VV", "VH")
    assert "val_mean_iou" in json.loads(out["METRICS"])
    seg = processing.run("sarmae:segment", {"INPUT": str(assets / "scene.tif"), "MODEL": out["OUTPUT"],
                                            "OUTPUT": str(tmp_path / "c.tif"), "CONFIDENCE": str(tmp_path / "f.tif")})
    assert Path(seg["OUTPUT"]).is_file()


def test_finetune_classify_from_chip_folders(assets, tmp_path):
    out = processing.run("sarmae:finetune", {"TASK": 2, "CHIPS": str(assets / "chips"),
                                             "ENCODER": str(assets / "encoder.pkg"), "LINEAR_PROBE": True,
                                             "OUTPUT": str(tmp_path / "cls.pkg"), **TINY})
    card = read_card(out["OUTPUT"])
    assert card.task == "classify" and sorted(card.class_names) == ["land", "water"]


def test_finetune_classify_from_rasters_and_polygons(assets, tmp_path):
    out = processing.run("sarmae:finetune", {"TASK": 2, "RASTERS": [str(assets / "train.tif")],
                                             "LABELS": str(assets / "labels.gpkg"), "CLASS_FIELD": "class",
                                             "ENCODER": str(assets / "encoder.pkg"), "LINEAR_PROBE": True,
                                             "OUTPUT": str(tmp_path / "cls_poly.pkg"), **TINY})
    card = read_card(out["OUTPUT"])
    assert card.task == "classify" and sorted(card.class_names) == ["land", "water"]
    assert "val_accuracy" in json.loads(out["METRICS"])


def test_finetune_checks_its_inputs_and_output(assets, tmp_path):
    alg = QgsApplication.processingRegistry().algorithmById("sarmae:finetune")
    context = QgsProcessingContext()
    ok, message = alg.checkParameterValues({"TASK": 2, "OUTPUT": str(tmp_path / "x")}, context)
    assert not ok and "chip folder" in message
    ok, message = alg.checkParameterValues({"TASK": 0, "RASTERS": [str(assets / "scene.tif")],
                                            "OUTPUT": str(tmp_path / "x")}, context)
    assert not ok and "polygons or a label raster" in message
    ok, message = alg.checkParameterValues({"TASK": 0, "RASTERS": [str(assets / "scene.tif")],
                                            "LABELS": str(assets / "labels.gpkg"), "OUTPUT": str(tmp_path / "x")},
                                           context)
    assert not ok and "class field" in message
    keep = tmp_path / "my_files"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(QgsProcessingException, match="not a SARMAE model package"):
        processing.run("sarmae:finetune", {"TASK": 2, "CHIPS": str(assets / "chips"), "OUTPUT": str(keep), **TINY})
    assert (keep / "notes.txt").read_text() == "precious"


def test_pretrain_and_encoder_package(assets, tmp_path):
    out = processing.run("sarmae:pretrain", {
        "DATA": str(assets / "chips"), "CONFIG": 0, "IN_CHANS": 2, "IMG_SIZE": 32, "EPOCHS": 1, "BATCH_SIZE": 4,
        "MAX_MINUTES": 0.2, "OVERRIDES": "model.decoder_dim=32 model.decoder_depth=1 run.max_steps=2 "
                                         "run.log_every_steps=1 model.depth=2",
        "OUTPUT": str(tmp_path / "run"), "ENCODER": str(tmp_path / "encoder.pkg")})
    run = Path(out["OUTPUT"])
    assert (run / "last.pt").is_file() and (run / "config.yaml").is_file()
    assert json.loads(out["SUMMARY"])["step"] == 2
    card = read_card(out["ENCODER"])
    assert card.task == "embed" and card.in_chans == 2 and card.img_size == 32
    with pytest.raises(QgsProcessingException, match="already holds a run"):
        processing.run("sarmae:pretrain", {"DATA": str(assets / "chips"), "IN_CHANS": 2, "IMG_SIZE": 32,
                                           "OVERRIDES": "run.max_steps=1", "OUTPUT": str(run)})


def test_export_onnx_to_a_new_package_then_run_with_onnxruntime(assets, tmp_path):
    out = processing.run("sarmae:export_onnx", {"MODEL": str(assets / "classify.pkg"),
                                                "OUTPUT": str(tmp_path / "cls_onnx.pkg")})
    assert out["PACKAGE"] == str(tmp_path / "cls_onnx.pkg")
    assert read_card(out["PACKAGE"]).has_onnx and not read_card(assets / "classify.pkg").has_onnx
    res = processing.run("sarmae:classify", {"INPUT": str(assets / "scene.tif"), "MODEL": out["PACKAGE"], "BACKEND": 2,
                                             "OUTPUT": str(tmp_path / "grid.gpkg")})
    assert QgsVectorLayer(res["OUTPUT"], "g", "ogr").featureCount() == 4
