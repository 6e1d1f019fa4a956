"""``sarmae evaluate`` (training/evaluate.py): classes matched to the model's by name, unknown ones
reported, confusion-matrix PNGs, for class folders, raster + polygons (classify, detect) and
segmentation through the engine."""

from __future__ import annotations

import json

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
    write_db,
    write_labels,
)

from engine.cli import main
from engine.errors import SarmaeError
from training.evaluate import (
    evaluate_chips,
    evaluate_chips_from_rasters,
    evaluate_detections,
    evaluate_raster,
    match_boxes,
)
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


@pytest.fixture
def spy_reference(monkeypatch):
    """The reference raster evaluate_raster builds from polygons (captured from rasterize_polygons)."""
    from training.finetune import labels

    seen: list[np.ndarray] = []

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    real = labels.rasterize_polygons
    monkeypatch.setattr(labels, "rasterize_polygons", spy)
    return seen


def test_segmenter_reads_polygons_exactly_as_fine_tuning(tmp_path, spy_reference):
    """Reprojected from EPSG:4326, a bow-tie repaired, an empty class skipped and counted, an unknown
    class reported: the reference equals the masks fine-tuning makes from the same file."""
    from rasterio.warp import transform_geom
    from shapely.geometry import Polygon, mapping, shape

    from engine.package import read_card
    from training.finetune.labels import IGNORE, build_chips

    pkg = build_task_package(tmp_path / "s.pkg", "segment", ["water", "land"])
    tif, truth = water_land(tmp_path / "wl.tif", size=96)
    x0, y0 = 500000.0 + 20 * 40, 4500000.0 - 20 * 10
    bowtie = Polygon([(x0, y0), (x0 + 200, y0 - 200), (x0 + 200, y0), (x0, y0 - 200)])
    utm = class_polygons(truth, {0: "water", 1: "land"}) + [(bowtie, "land")] + boxes_to_polygons([(5, 70, 20, 90)], "rock")
    feats = [(shape(transform_geom("EPSG:32631", "EPSG:4326", mapping(g))), n) for g, n in utm]
    feats += [(feats[0][0], "")]
    gpkg = write_labels(tmp_path / "wgs84.gpkg", feats, crs="EPSG:4326")
    opts = {"device": "cpu", "bands": ["VV", "VH"]}
    r = evaluate_raster(str(pkg), str(tif), tmp_path / "cm.png", labels=str(gpkg), class_field="class", options=opts)
    ref = spy_reference[-1]
    assert r["unknown_classes"] == ["rock"] and r["skipped_features"] == 1
    assert any("reprojected" in m and "EPSG:4326" in m for m in r["log"])
    assert any("repaired 1 invalid polygon" in m for m in r["log"])
    assert any("skipped 1 feature(s) with an empty class value" in m for m in r["warnings"])
    assert r["labelled_pixels"] == int(np.sum(ref != IGNORE)) > 0.98 * truth.size
    names = np.array(["water", "land"])
    assert np.mean(names[ref[ref != IGNORE]] == np.where(truth == 0, "water", "land")[ref != IGNORE]) > 0.99
    chips = build_chips(str(tif), read_card(pkg).input, 32, "segment", labels=str(gpkg), class_field="class",
                        classes=["water", "land"], evaluation=True)
    assert len(chips.windows) > 3
    for n, (_, row, col) in enumerate(chips.windows):  # the masks fine-tuning trains on, pixel for pixel
        m = chips.masks[n].numpy()[:96 - row, :96 - col]
        np.testing.assert_array_equal(m, ref[row:row + 32, col:col + 32])
    part = evaluate_raster(str(pkg), str(tif), tmp_path / "cm.png", labels=str(gpkg), class_field="class",
                           options={**opts, "extent": (10, 20, 50, 200)})  # clipped to the raster: 50 x 76
    np.testing.assert_array_equal(spy_reference[-1], ref[10:60, 20:96])
    assert part["labelled_pixels"] == int(np.sum(ref[10:60, 20:96] != IGNORE))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_segmenter_on_a_raster_without_georeferencing(tmp_path, spy_reference):
    """Polygons drawn in QGIS over a pixel-space image (y = -row) are placed as fine-tuning places them."""
    import rasterio
    from affine import Affine

    pkg = build_task_package(tmp_path / "s.pkg", "segment", ["water", "land"])
    tif, truth = water_land(tmp_path / "wl.tif", size=96)
    with rasterio.open(tif) as src:
        nogeo = write_db(tmp_path / "nogeo.tif", src.read(), crs=None)
    gpkg = write_labels(tmp_path / "px.gpkg", class_polygons(truth, {0: "water", 1: "land"}, Affine(1, 0, 0, 0, -1, 0)),
                        crs=None)
    r = evaluate_raster(str(pkg), str(nogeo), tmp_path / "cm.png", labels=str(gpkg), class_field="class",
                        options={"device": "cpu", "bands": ["VV", "VH"]})
    assert any("pixel coordinates (y = -row)" in m for m in r["log"])
    assert r["labelled_pixels"] == truth.size
    np.testing.assert_array_equal(spy_reference[-1], np.where(truth == 0, 0, 1))  # water 0, land 1


def test_segmenter_labels_refused_before_the_model_runs(tmp_path, monkeypatch):
    from shapely.affinity import translate

    from training import evaluate

    monkeypatch.setattr("engine.inference.run_inference", lambda *a, **k: pytest.fail("the model ran"))
    pkg = build_task_package(tmp_path / "s.pkg", "segment", ["water", "land"])
    tif, truth = water_land(tmp_path / "wl.tif", size=64)
    rock = write_labels(tmp_path / "rock.gpkg", class_polygons(truth, {0: "rock", 1: "sand"}))
    with pytest.raises(SarmaeError, match=r"none of classes \['water', 'land'\]; other classes found: 'rock' \(1\), "
                                          r"'sand' \(1\)"):
        evaluate.evaluate_raster(str(pkg), str(tif), tmp_path / "cm.png", labels=str(rock), class_field="class")
    far = write_labels(tmp_path / "far.gpkg", [(translate(g, 300000, 0), n) for g, n in
                                               class_polygons(truth, {0: "water", 1: "land"})])
    with pytest.raises(SarmaeError, match=r"all labels in .*far.gpkg lie outside the raster"):
        evaluate.evaluate_raster(str(pkg), str(tif), tmp_path / "cm.png", labels=str(far), class_field="class")


def test_match_boxes_greedy_by_score():
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    det = np.array([[1, 1, 10, 10],     # IoU 0.81 with truth 0, lower score
                    [0, 0, 10, 11],     # IoU 0.91 with truth 0, best score: takes it
                    [20, 20, 30, 30],   # exact match of truth 1
                    [40, 40, 50, 50],   # on nothing
                    [20, 20, 30, 31]], float)  # truth 1 already taken: a duplicate
    scores = np.array([0.6, 0.9, 0.8, 0.7, 0.5])
    assert match_boxes(det, scores, truth).tolist() == [False, True, True, False, False]
    assert match_boxes(det[:1], scores[:1], truth[:1], iou=0.9).tolist() == [False]  # below the IoU asked
    assert match_boxes(det[:0], scores[:0], truth).tolist() == []
    assert match_boxes(det, scores, truth[:0]).tolist() == [False] * 5


@pytest.mark.filterwarnings("ignore:Encountered more than 100 detections")
def test_detector_over_whole_rasters(tmp_path, capsys):
    """The engine's boxes over each whole raster against every labelled box: the counts add up, the
    operating point follows the threshold, unknown classes are reported, bad input is refused."""
    pkg = build_task_package(tmp_path / "d.pkg", "detect", ["ship"])
    tif, boxes = ship_scene(tmp_path / "ships.tif", size=96, step=32)
    tif2, boxes2 = ship_scene(tmp_path / "ships2.tif", size=96, step=48, seed=1)
    gpkg = write_labels(tmp_path / "ships.gpkg", boxes_to_polygons(boxes) + boxes_to_polygons(boxes2)
                        + boxes_to_polygons(boxes[:1], "buoy"))
    opts = {"device": "cpu", "bands": ["VV", "VH"], "score_threshold": 0.0}
    r = evaluate_detections(str(pkg), [str(tif), str(tif2)], tmp_path / "pr.png", labels=str(gpkg),
                            class_field="class", options=opts)
    n = len(boxes) + len(boxes2)  # both scenes share the transform: each raster sees its own boxes only
    assert r["task"] == "detect" and r["rasters"] == 2 and r["unknown_classes"] == ["buoy"]
    assert r["boxes"] >= n and r["true_positives"] + r["missed"] == r["boxes"]
    assert r["true_positives"] + r["false_positives"] == r["detections"]
    assert 0.0 <= r["map"] <= r["map_50"] + 1e-9 <= 1.0 + 1e-9 and set(r["per_class"]) == {"ship"}
    assert (tmp_path / "pr.png").stat().st_size > 0
    # the same through `sarmae evaluate` (a whole-raster run for detect packages)
    assert main(["evaluate", str(pkg), "--raster", str(tif), "--labels", str(gpkg), "--class-field", "class",
                 "--bands", "VV,VH", "--score-threshold", "1.01", "--report", str(tmp_path / "pr2.png")]) == 0
    strict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert strict["detections"] == strict["true_positives"] == 0 and strict["recall"] == 0.0
    with pytest.raises(SarmaeError, match="needs --labels"):
        evaluate_detections(str(pkg), [str(tif)], tmp_path / "x.png", options=opts)
    seg = build_task_package(tmp_path / "s.pkg", "segment", ["water", "land"])
    with pytest.raises(SarmaeError, match="needs a 'detect' package"):
        evaluate_detections(str(seg), [str(tif)], tmp_path / "x.png", labels=str(gpkg), class_field="class")


def test_segmenter_with_a_label_raster_in_pixel_space(tmp_path):
    """A raster and a label raster without georeferencing (PNG-style chips and masks), on the same
    grid: read as fine-tuning reads them (was a 'Missing dst_crs' crash); an unalignable pair is
    refused with a message that names both."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    pkg = build_task_package(tmp_path / "s.pkg", "segment", ["water", "land"])
    tif, truth = water_land(tmp_path / "wl.tif", size=96)
    with rasterio.open(tif) as src:
        nogeo = write_db(tmp_path / "nogeo.tif", src.read(), crs=None)
    lab = np.where(np.arange(96)[:, None] < 48, truth, -1).astype(np.int16)  # top half labelled
    with pytest.warns(NotGeoreferencedWarning):
        with rasterio.open(tmp_path / "lab.tif", "w", driver="GTiff", width=96, height=96, count=1, dtype="int16",
                           nodata=-1) as dst:
            dst.write(lab, 1)
    opts = {"device": "cpu", "bands": ["VV", "VH"]}
    r = evaluate_raster(str(pkg), str(nogeo), tmp_path / "cm.png", label_raster=str(tmp_path / "lab.tif"), options=opts)
    assert r["labelled_pixels"] == int((lab >= 0).sum()) and r["unknown_classes"] == []
    part = evaluate_raster(str(pkg), str(nogeo), tmp_path / "cm2.png", label_raster=str(tmp_path / "lab.tif"),
                           options={**opts, "extent": (32, 0, 32, 96)})  # rows 32..63: 16 labelled rows
    assert part["labelled_pixels"] == int((lab[32:64] >= 0).sum())
    with pytest.raises(SarmaeError, match="cannot be aligned"):
        evaluate_raster(str(pkg), str(tif), tmp_path / "x.png", label_raster=str(tmp_path / "lab.tif"), options=opts)
