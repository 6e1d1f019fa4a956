"""The CFAR row of a detection evaluation (training/evaluate.py + training/cfar_baseline.py): CFAR
over the same rasters as the model, scored the same way, with false alarms per km^2 / Mpx; CFAR
settings chosen on training data."""

from __future__ import annotations

import numpy as np
import pytest
from ftdata import PIXEL_M, boxes_to_polygons, build_task_package, ship_scene, write_labels

from engine.inference import InferenceOptions
from training.cfar_baseline import best_f1_threshold, choose_cfar
from training.evaluate import evaluate_detections, score_detections

CFAR = {"enl": 4.0, "guard": 11, "background": 31, "pfa": 1e-6, "class_name": "ship"}


@pytest.mark.filterwarnings("ignore:Encountered more than 100 detections")
def test_cfar_row_beside_the_model(tmp_path):
    pkg = build_task_package(tmp_path / "d.pkg", "detect", ["ship"])
    tif, boxes = ship_scene(tmp_path / "ships.tif", size=144, step=24)
    gpkg = write_labels(tmp_path / "ships.gpkg", boxes_to_polygons(boxes))
    opts = {"device": "cpu", "bands": ["VV", "VH"], "score_threshold": 0.3}  # CFAR runs on VV, the first
    r = evaluate_detections(str(pkg), [str(tif)], tmp_path / "pr.png", labels=str(gpkg), class_field="class",
                            options=opts, cfar=CFAR)
    km2 = 144 * 144 * PIXEL_M ** 2 / 1e6
    assert r["search_area"] == {"size": pytest.approx(km2), "unit": "km2"}
    assert r["false_alarms_per_km2"] == pytest.approx(r["false_positives"] / km2)
    c = r["cfar"]
    # bright ships on sea: CFAR (dB converted to linear power) finds every one, with its box
    assert c["boxes"] == len(boxes) and c["recall"] == 1.0 and c["map_50"] > 0.9
    assert c["false_alarms_per_km2"] == pytest.approx(c["false_positives"] / km2)
    assert c["score_threshold"] == 0.0 and c["config"]["pfa"] == 1e-6
    assert any("converted to linear power" in line for line in c["log"])


def test_false_alarms_per_megapixel_without_georeferencing():
    truth = [(np.array([[0, 0, 10, 10]], float), np.array([0]))]
    preds = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), np.array([0.9, 0.8]), np.array([0, 0]))]
    s, _ = score_detections(preds, truth, ["ship"], 0.5, (0.25, "Mpx"))
    assert s["false_positives"] == 1 and s["false_alarms_per_mpx"] == 4.0 and s["precision"] == 0.5


def test_cfar_chosen_on_training_data(tmp_path):
    tif, boxes = ship_scene(tmp_path / "train.tif", size=192, step=48, seed=2)  # sparse: rings see sea
    gpkg = write_labels(tmp_path / "train.gpkg", boxes_to_polygons(boxes))
    opts = InferenceOptions(bands=["VV"])
    pfas = (0.2, 1e-6)
    best, tried = choose_cfar([str(tif)], str(gpkg), "class", ["ship"], opts, CFAR, pfas=pfas)
    assert [t["pfa"] for t in tried] == list(pfas)
    # pfa 0.2 floods the sea with false alarms: training mAP (and F1) pick 1e-6
    assert best["pfa"] == 1e-6 and tried[0]["f1"] < tried[1]["f1"] and tried[0]["map_50"] < tried[1]["map_50"]
    assert 0.0 <= best["score_threshold"] < 1.0  # the operating point, also chosen on training
    best2, tried2 = choose_cfar([str(tif)], str(gpkg), "class", ["ship"], opts, CFAR, pfas=pfas,
                                grid={"min_area": (1, 4)})
    assert [(t["min_area"], t["pfa"]) for t in tried2] == [(1, 0.2), (1, 1e-6), (4, 0.2), (4, 1e-6)]
    assert best2["min_area"] in (1, 4) and best2["pfa"] == 1e-6


def test_best_f1_threshold():
    truth = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0, 0]))]
    # scores 0.9 (hit), 0.8 (false), 0.7 (hit), 0.1 (false): F1 2/3, 1/2, 4/5, 2/3 -> keep >= 0.7
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30], [70, 70, 80, 80]], float)
    preds = [(boxes, np.array([0.9, 0.8, 0.7, 0.1]), np.zeros(4, np.int64))]
    assert best_f1_threshold(preds, truth) == 0.7


def test_search_area_is_the_region_the_engine_processes(tmp_path):
    """An extent near the bottom of the raster counts only the rows inside it (false alarms per area)."""
    from helpers.rasters import write_raster

    from training.cfar_baseline import search_area

    tif = write_raster(tmp_path / "r.tif", np.zeros((1000, 500), np.float32), georef="none")
    assert search_area([str(tif)], InferenceOptions())[0] == pytest.approx(0.5)  # Mpx, not georeferenced
    assert search_area([str(tif)], InferenceOptions(extent=(900, 0, 200, 500)))[0] == pytest.approx(0.05)
