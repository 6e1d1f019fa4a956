"""``sarmae evaluate`` (training/evaluate.py): classes matched to the model's by name, unknown ones
reported, confusion-matrix PNGs, for class folders, raster + polygons (classify, detect) and
segmentation through the engine."""

from __future__ import annotations

import numpy as np
import pytest
from ftdata import (
    boxes_to_polygons,
    build_encoder,
    build_task_package,
    chip_folders,
    class_polygons,
    ship_scene,
    water_land,
    write_labels,
)

from engine.errors import SarmaeError
from training.evaluate import evaluate_chips, evaluate_chips_from_rasters, evaluate_raster
from training.finetune.classify import finetune_classifier
from training.finetune.config import FinetuneConfig


def test_class_folders_matched_by_name(tmp_path):
    pkg = build_task_package(tmp_path / "c.pkg", "classify", ["dark", "bright"], in_chans=1)
    root = chip_folders(tmp_path / "test", {"bright": 170, "dark": 40, "rock": 100}, n=3)
    r = evaluate_chips(str(pkg), str(root), tmp_path / "cm.png")
    assert r["unknown_classes"] == ["rock"] and r["skipped_chips"] == 3 and r["n"] == 6
    assert set(r["per_class_accuracy"]) == {"dark", "bright"} and (tmp_path / "cm.png").stat().st_size > 0
    with pytest.raises(SarmaeError, match="none of its classes"):
        evaluate_chips(str(pkg), str(chip_folders(tmp_path / "other", {"sea": 40, "rock": 100}, n=1)), tmp_path / "x.png")
    seg = build_task_package(tmp_path / "s.pkg", "segment", ["water", "land"])
    with pytest.raises(SarmaeError, match="'segment' model; --chips evaluates classification"):
        evaluate_chips(str(seg), str(root), tmp_path / "x.png")


def test_classifier_from_polygons_evaluated_on_another_scene(tmp_path):
    enc = build_encoder(tmp_path / "enc", img_size=32)
    tif, truth = water_land(tmp_path / "train.tif")
    gpkg = write_labels(tmp_path / "train.gpkg", class_polygons(truth, {0: "water", 1: "land"}))
    cfg = FinetuneConfig(encoder=str(enc), epochs=4, batch_size=16, lr=1e-3, warmup_epochs=1, drop_path=0.0,
                         device="cpu")
    finetune_classifier(None, tmp_path / "wl.pkg", cfg, rasters=tif, labels=gpkg, class_field="class")
    test_tif, test_truth = water_land(tmp_path / "test.tif", size=160, seed=3)
    feats = class_polygons(test_truth, {1: "land", 0: "water"}) + boxes_to_polygons([(5, 120, 30, 150)], "rock")
    test_gpkg = write_labels(tmp_path / "test.gpkg", feats)
    r = evaluate_chips_from_rasters(str(tmp_path / "wl.pkg"), [str(test_tif)], tmp_path / "cm.png", labels=test_gpkg,
                                    class_field="class")
    assert r["task"] == "classify" and r["unknown_classes"] == ["rock"] and r["skipped_features"] == 1
    assert r["accuracy"] > 0.85 and r["n"] == r["chips"] > 10, r  # classes matched by name: land/water, not order
    assert (tmp_path / "cm.png").exists()
    with pytest.raises(SarmaeError, match="--background 'sea' is not a class"):
        evaluate_chips_from_rasters(str(tmp_path / "wl.pkg"), [str(test_tif)], tmp_path / "cm.png", labels=test_gpkg,
                                    class_field="class", background="sea")
    with pytest.raises(SarmaeError, match="'classify' model; raster evaluation here covers segmentation"):
        evaluate_raster(str(tmp_path / "wl.pkg"), str(test_tif), tmp_path / "x.png", label_raster="l.tif")


@pytest.mark.filterwarnings("ignore:Encountered more than 100 detections")  # random weights: many boxes
def test_detector_on_labelled_boxes(tmp_path):
    pkg = build_task_package(tmp_path / "d.pkg", "detect", ["ship"])
    tif, boxes = ship_scene(tmp_path / "ships.tif", size=96, step=32)
    gpkg = write_labels(tmp_path / "ships.gpkg", boxes_to_polygons(boxes) + boxes_to_polygons(boxes[:1], "buoy"))
    r = evaluate_chips_from_rasters(str(pkg), [str(tif)], tmp_path / "cm.png", labels=gpkg, class_field="class")
    assert r["task"] == "detect" and r["unknown_classes"] == ["buoy"] and r["boxes"] >= len(boxes) - 1
    assert 0.0 <= r["map"] <= r["map_50"] + 1e-9 <= 1.0 + 1e-9 and set(r["ap_per_class"]) == {"ship"}
    with pytest.raises(SarmaeError, match="detection evaluation needs --labels"):
        evaluate_chips_from_rasters(str(pkg), [str(tif)], tmp_path / "cm.png", label_raster="l.tif")


def test_segmenter_through_the_engine(tmp_path):
    pkg = build_task_package(tmp_path / "s.pkg", "segment", ["water", "land"])
    tif, truth = water_land(tmp_path / "wl.tif", size=96)
    gpkg = write_labels(tmp_path / "wl.gpkg", class_polygons(truth, {0: "water", 1: "rock"}))
    r = evaluate_raster(str(pkg), str(tif), tmp_path / "cm.png", labels=str(gpkg), class_field="class",
                        options={"device": "cpu", "bands": ["VV", "VH"]})
    assert r["task"] == "segment" and r["unknown_classes"] == ["rock"]
    assert r["labelled_pixels"] == int(np.sum(truth == 0)) and set(r["iou"]) == {"water", "land"}
    assert (tmp_path / "cm.png").exists()
