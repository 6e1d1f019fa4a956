"""The learned CPU detector ``detect.cfar_scored`` (CFAR proposals + chip scorer), trained from a
raster + ship polygons: on a scene where bright clutter points outrank the ships in CFAR's own
score, it must beat plain CFAR on a scene it never saw (which it cannot if its scorer is ignored),
through ``sarmae finetune --task detect --method cfar_scored`` and ``evaluate_detections``'s CFAR row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.rasters import DEFAULT_TRANSFORM, write_raster

from engine.cli import main
from engine.errors import SarmaeError
from engine.package import read_card
from training.evaluate import evaluate_detections
from training.finetune.cfar_scored import MAX_PER_TARGET, choose_proposals, covers, pick_setting

pytestmark = pytest.mark.timeout(300)


def clutter_scene(path: Path, seed: int, size: int = 320) -> tuple[Path, np.ndarray]:
    """Single-look sea at -20 dB; 12 ships (3 x 12 px, 4-look, 15 dB above the sea) and 12 compact
    clutter points (4 x 4 px, 40 dB above: CFAR scores them higher than the ships), on a jittered
    grid. Returns (the dB raster, the ship boxes x0, y0, x1, y1 in px)."""
    rng = np.random.default_rng(seed)
    power = rng.exponential(0.01, (size, size))
    cells = [(r, c) for r in range(5) for c in range(5)][:24]
    rng.shuffle(cells)
    ships = []
    step = (size - 40) // 5
    for k, (r, c) in enumerate(cells):
        y, x = 20 + r * step + int(rng.integers(0, step - 14)), 20 + c * step + int(rng.integers(0, step - 14))
        if k < 12:
            bh, bw = (3, 12) if k % 2 else (12, 3)
            power[y:y + bh, x:x + bw] = rng.gamma(4.0, 0.316 / 4, (bh, bw))
            ships.append((x, y, x + bw, y + bh))
        else:
            power[y:y + 4, x:x + 4] = 100.0 * rng.gamma(4.0, 0.25, (4, 4))
    return write_raster(path, (10 * np.log10(power)).astype(np.float32), descriptions=["VV"]), np.asarray(ships, float)


def write_ships(path: Path, boxes: np.ndarray, classes: list[str] | None = None) -> Path:
    """The boxes as polygons in the raster's map coordinates (EPSG:32631), field 'class'."""
    import fiona
    from shapely.geometry import box, mapping

    t = DEFAULT_TRANSFORM
    schema = {"geometry": "Polygon", "properties": {"class": "str"}}
    with fiona.open(path, "w", driver="GPKG", crs="EPSG:32631", schema=schema) as dst:
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            (a, b), (c, d) = t * (x0, y0), t * (x1, y1)
            name = classes[i % len(classes)] if classes else "ship"
            dst.write({"geometry": mapping(box(min(a, c), min(b, d), max(a, c), max(b, d))),
                       "properties": {"class": name}})
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cfar_scored package trained on one clutter scene through the CLI; a second scene to test on."""
    d = tmp_path_factory.mktemp("cfar_scored")
    train, ships = clutter_scene(d / "train.tif", seed=1)
    test, test_ships = clutter_scene(d / "test.tif", seed=2)
    labels, test_labels = write_ships(d / "train.gpkg", ships), write_ships(d / "test.gpkg", test_ships)
    rc = main(["finetune", "--task", "detect", "--method", "cfar_scored", "--raster", str(train), "--labels",
               str(labels), "--class-field", "class", "--input-units", "db", "--epochs", "15", "--batch-size", "64",
               "--output", str(d / "scored.pkg"), "--quiet"])
    assert rc == 0
    return {"pkg": d / "scored.pkg", "test": test, "test_labels": test_labels, "dir": d}


def test_learned_scorer_beats_cfar_on_a_new_scene(trained):
    card = read_card(trained["pkg"])
    assert card.architecture.name == "cfar_scored" and card.onnx.get("fp32")
    cfar = {**card.architecture.extra["cfar"], "score_threshold": 0.0}  # CFAR alone, same proposals
    ev = evaluate_detections(str(trained["pkg"]), [str(trained["test"])], trained["dir"] / "pr.png",
                             labels=str(trained["test_labels"]), class_field="class",
                             options={"input_units": "db"}, cfar=cfar)
    # CFAR ranks the 12 clutter points above the ships; the scorer tells them apart
    assert ev["cfar"]["map_50"] < 0.6, ev["cfar"]
    assert ev["map_50"] >= 0.9 and ev["map_50"] >= ev["cfar"]["map_50"] + 0.3, (ev["map_50"], ev["cfar"]["map_50"])
    assert ev["false_positives"] < ev["cfar"]["false_positives"]


def test_a_proposal_is_positive_only_with_iou_half(tmp_path):
    truth = np.array([[10, 10, 22, 13]], float)
    props = np.array([[10, 10, 22, 13], [14, 10, 18, 13], [100, 100, 110, 110]], float)
    label, hit = covers(props, truth)
    assert label.tolist() == [1, -1, 0] and hit.tolist() == [True]


def test_proposal_rules_fewest_and_richest_within_the_budget():
    n = 10
    tried = [{"pfa": 1e-2, "coverage": 1.0, "proposals": MAX_PER_TARGET * n + 1},  # over the budget
             {"pfa": 1e-3, "coverage": 1.0, "proposals": 300},
             {"pfa": 1e-4, "coverage": 0.9, "proposals": 250},  # best coverage but one ship
             {"pfa": 1e-5, "coverage": 0.98, "proposals": 120},
             {"pfa": 1e-6, "coverage": 0.8, "proposals": 60}]
    assert pick_setting(tried, n, "fewest")["pfa"] == 1e-5  # the fewest within 97 % of the best coverage
    assert pick_setting(tried, n, "richest")["pfa"] == 1e-3  # the most within the budget, at the best coverage
    with pytest.raises(SarmaeError, match="proposal rule 'most'"):
        choose_proposals([], [], ["ship"], None, {}, rule="most")


def test_training_refuses_several_classes(tmp_path, capsys):
    raster, ships = clutter_scene(tmp_path / "s.tif", seed=3, size=160)
    labels = write_ships(tmp_path / "two.gpkg", ships, classes=["ship", "platform"])
    rc = main(["finetune", "--task", "detect", "--method", "cfar_scored", "--raster", str(raster), "--labels",
               str(labels), "--class-field", "class", "--output", str(tmp_path / "p.pkg"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "one class" in err and "two.gpkg" in err and "--classes" in err, err


def test_training_reports_progress_and_keeps_its_budget(tmp_path, capsys):
    raster, ships = clutter_scene(tmp_path / "s.tif", seed=4, size=160)
    labels = write_ships(tmp_path / "s.gpkg", ships)
    rc = main(["finetune", "--task", "detect", "--method", "cfar_scored", "--raster", str(raster), "--labels",
               str(labels), "--class-field", "class", "--input-units", "db", "--epochs", "50", "--max-minutes",
               "0.0001", "--output", str(tmp_path / "p.pkg")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "epoch 1/50: loss" in cap.err and "ETA" in cap.err and "epoch 2/50" not in cap.err
    r = json.loads(cap.out)
    assert r["epochs"] == 1 and r["targets"] == 12 and 0.05 <= r["score_threshold"] <= 0.95


def test_method_is_refused_for_other_tasks(tmp_path, capsys):
    rc = main(["finetune", "--task", "segment", "--method", "cfar_scored", "--raster", "x.tif", "--labels", "y.gpkg",
               "--class-field", "class", "--output", str(tmp_path / "p.pkg")])
    err = capsys.readouterr().err
    assert rc != 0 and "--method cfar_scored" in err and "detect" in err, err


def test_result_record_says_what_scored(trained, tmp_path):
    from engine.inference import InferenceOptions, run_inference

    res = run_inference([str(trained["test"])], tmp_path / "d.gpkg", str(trained["pkg"]),
                        InferenceOptions(input_units="db"))
    s = res.statistics["scorer"]
    assert s["backend"].startswith("onnxruntime") and s["proposals"] >= s["kept"] > 0
    assert json.loads(json.dumps(res.statistics))  # plain data
    with pytest.raises(SarmaeError, match="no model.onnx|backend"):
        run_inference([str(trained["test"])], tmp_path / "e.gpkg", str(trained["pkg"]),
                      InferenceOptions(input_units="db", backend="cuda-magic"))


def test_sarmae_evaluate_prints_the_cfar_row_beside(trained, capsys):
    rc = main(["evaluate", str(trained["pkg"]), "--raster", str(trained["test"]), "--labels",
               str(trained["test_labels"]), "--class-field", "class", "--input-units", "db",
               "--report", str(trained["dir"] / "ev.png")])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and r["cfar"]["config"]["pfa"] == read_card(trained["pkg"]).architecture.extra["cfar"]["pfa"]
    assert r["map_50"] > r["cfar"]["map_50"]  # the same proposals, ranked by the scorer vs by CFAR
    assert main(["evaluate", str(trained["pkg"]), "--raster", str(trained["test"]), "--labels",
                 str(trained["test_labels"]), "--class-field", "class", "--input-units", "db", "--cfar", "none",
                 "--report", str(trained["dir"] / "ev.png")]) == 0
    assert "cfar" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def smeared_scene(path: Path, seed: int, size: int = 320) -> tuple[Path, np.ndarray]:
    """Single-look sea at -20 dB; 16 ships (3 x 12 px, 35 dB above the sea) each with a 1 px sidelobe
    along its axis, 6 px beyond both ends, 5 dB below the ship: CFAR's box takes the sidelobes in
    (IoU 0.5 with the ship's). Returns (the dB raster, the ship boxes)."""
    rng = np.random.default_rng(seed)
    power = rng.exponential(0.01, (size, size))
    ships, step = [], (size - 40) // 4
    for r in range(4):
        for c in range(4):
            y, x = 30 + r * step + int(rng.integers(0, step - 40)), 30 + c * step + int(rng.integers(0, step - 40))
            if (r + c) % 2:
                power[y:y + 3, x:x + 12] = rng.gamma(4.0, 30.0 / 4, (3, 12))
                power[y + 1, x - 6:x] = power[y + 1, x + 12:x + 18] = 10.0
                ships.append((x, y, x + 12, y + 3))
            else:
                power[y:y + 12, x:x + 3] = rng.gamma(4.0, 30.0 / 4, (12, 3))
                power[y - 6:y, x + 1] = power[y + 12:y + 18, x + 1] = 10.0
                ships.append((x, y, x + 3, y + 12))
    return write_raster(path, (10 * np.log10(power)).astype(np.float32), descriptions=["VV"]), np.asarray(ships, float)


def test_the_box_branch_fits_the_ships_better_than_cfar_boxes(tmp_path):
    """CFAR's boxes on a new scene take the sidelobes in; the refined boxes (the box branch alone:
    no extra proposal levels) must overlap the ships better. A wrong refinement (a sign, a turned
    augmentation, deltas not applied) fails."""
    import torch
    from torchvision.ops import box_iou

    from engine.inference import InferenceOptions, run_inference
    from training.cfar_baseline import cfar_boxes
    from training.evaluate import _read_detections
    from training.finetune.cfar_scored import finetune_cfar_scored
    from training.finetune.config import FinetuneConfig

    train, ships = smeared_scene(tmp_path / "train.tif", 1)
    test, truth = smeared_scene(tmp_path / "test.tif", 2)
    cfg = FinetuneConfig(task="detect", epochs=15, batch_size=64, seed=0, input_units="db", device="cpu")
    r = finetune_cfar_scored([str(train)], tmp_path / "p.pkg", cfg, labels=str(write_ships(tmp_path / "s.gpkg", ships)),
                             class_field="class", classes=["ship"], cfar_base={"levels_db": []}, pfas=(1e-3,),
                             regress=True)
    card = read_card(r["package"])
    assert card.architecture.head["regress"] and card.architecture.extra["cfar_scored"]["format"] == 2
    opts = InferenceOptions(input_units="db")
    _, (cfar,), _ = cfar_boxes([str(test)], card.architecture.extra["cfar"], opts, ["ship"])
    res = run_inference([str(test)], tmp_path / "d.gpkg", r["package"], opts)
    boxes, _, _ = _read_detections(res.outputs["detections"])
    fit = lambda b: box_iou(torch.tensor(b), torch.tensor(truth)).numpy().max(0)  # noqa: E731  per ship
    assert fit(cfar[0]).mean() <= 0.6  # the sidelobes are in CFAR's boxes
    assert fit(boxes).mean() >= fit(cfar[0]).mean() + 0.2, (fit(boxes), fit(cfar[0]))
    assert (fit(boxes) >= 0.5).mean() >= 0.9
