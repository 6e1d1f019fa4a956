"""``detect.cfar_scored``: CFAR proposals scored by a small CNN. The engine side: chips read as the
scorer sees them, a package (here with a seeded, untrained scorer: training is tested in
tests/training/finetune/test_ft_cfar_scored.py) run by ``run_inference`` through onnxruntime and
torch with the same boxes and scores, described by ``sarmae info``, and bad input refused with
a message naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.rasters import write_raster

from engine.cfar.chips import chip_sides, read_chips, sample_chips, to_db
from engine.cli import main
from engine.errors import PackageError, RasterInputError, SarmaeError
from engine.inference import InferenceOptions, run_inference
from engine.models.chip_scorer import ChipScorer, ChipScorerConfig, export_chip_scorer
from engine.package import load_package, save_package
from engine.reader import SarRaster
from engine.tasks.cfar_scored import cfar_scored_card

pytestmark = pytest.mark.timeout(180)
CFAR = {"method": "ca", "guard": 9, "background": 41, "pfa": 1e-4, "min_area": 4}


def scene(path: Path, seed: int = 0, size: int = 200) -> Path:
    """Single-look sea at -20 dB with 9 bright 3 x 10 px ships (dB, one band, 20 m grid)."""
    rng = np.random.default_rng(seed)
    power = rng.exponential(0.01, (size, size))
    for k in range(9):
        y, x = 20 + (k // 3) * 60 + int(rng.integers(0, 10)), 20 + (k % 3) * 60 + int(rng.integers(0, 10))
        power[y:y + 3, x:x + 10] = rng.gamma(4.0, 0.25, (3, 10))
    return write_raster(path, (10 * np.log10(power)).astype(np.float32), descriptions=["VV"])


def package(dest: Path, onnx: bool = True, threshold: float = 0.0) -> Path:
    torch.manual_seed(0)
    model = ChipScorer(ChipScorerConfig()).eval()
    card = cfar_scored_card(CFAR, model.cfg.to_dict(), "ship", threshold, "scored-test")
    return save_package(model.state_dict(), card, dest, onnx_bytes=export_chip_scorer(model) if onnx else None)


def boxes_scores(gpkg: str) -> tuple[np.ndarray, np.ndarray]:
    import fiona

    with fiona.open(gpkg, layer="detections") as src:
        p = [f["properties"] for f in src]
    b = np.asarray([(q["px_col"], q["px_row"], q["px_width"], q["px_height"]) for q in p], float).reshape(-1, 4)
    return b, np.asarray([q["score"] for q in p], float)


def test_a_chip_is_centred_on_its_box_and_median_normalised():
    db = np.zeros((100, 120), np.float32)
    db[50, 60] = 30.0  # one bright pixel at the centre of a box 55..66 x 45..56
    valid = np.ones_like(db, bool)
    box = np.array([[55.5, 45.5, 65.5, 55.5]])
    chip = sample_chips(db, valid, 0, box, chip_sides(box), 32)[0, 0]
    assert np.median(chip) == 0.0  # dB minus the chip's median
    peak = np.unravel_index(np.argmax(chip), chip.shape)
    assert abs(peak[0] - 15.5) <= 1 and abs(peak[1] - 15.5) <= 1, peak
    # the same box, its rows read from a strip starting at row 30
    strip = sample_chips(db[30:], valid[30:], 30, box, chip_sides(box), 32)[0, 0]
    np.testing.assert_allclose(strip, chip, atol=1e-6)
    crop = sample_chips(db[30:80, 20:100], valid[30:80, 20:100], 30, box, chip_sides(box), 32, col0=20)[0, 0]
    np.testing.assert_allclose(crop, chip, atol=1e-6)  # the chip's square alone, as read_chips reads it


def test_chips_read_by_strips_match_the_whole_raster(tmp_path):
    path = scene(tmp_path / "s.tif")
    boxes = np.array([[10, 5, 20, 9], [100, 95, 110, 99], [150, 180, 160, 196]], float)
    with SarRaster.open(str(path)) as r:
        small = read_chips(r, "db", boxes, 32, "s.tif", block_rows=32)
        whole = read_chips(r, "db", boxes, 32, "s.tif", block_rows=4096)
    np.testing.assert_allclose(small, whole, atol=1e-5)
    assert np.isfinite(whole).all() and whole.std() > 0


def test_onnxruntime_and_torch_give_the_same_boxes(tmp_path):
    path, pkg = scene(tmp_path / "s.tif"), package(tmp_path / "p.pkg")
    out = {}
    for backend in ("onnxruntime", "torch"):
        res = run_inference([str(path)], tmp_path / f"{backend}.gpkg", str(pkg),
                            InferenceOptions(backend=backend, input_units="db", score_threshold=0.0))
        assert res.statistics["scorer"]["backend"].startswith(backend)
        assert res.statistics["scorer"]["proposals"] >= 9
        out[backend] = boxes_scores(res.outputs["detections"])
    (bo, so), (bt, st) = out["onnxruntime"], out["torch"]
    assert len(bo) == len(bt) >= 9
    np.testing.assert_allclose(bo, bt)
    np.testing.assert_allclose(so, st, atol=1e-4)
    assert not np.allclose(so, so[0])  # scores come from the network, one per chip


def test_auto_runs_onnx_without_torch_weights_in_memory(tmp_path):
    path, pkg = scene(tmp_path / "s.tif"), package(tmp_path / "p.pkg")
    loaded = load_package(pkg, lazy=True)
    res = run_inference([str(path)], tmp_path / "d.gpkg", loaded, InferenceOptions(input_units="db"))
    assert res.statistics["scorer"]["backend"].startswith("onnxruntime") and not loaded.model_loaded
    assert "chip scorer (onnxruntime" in res.provenance["backend"]


def test_info_describes_the_method(tmp_path, capsys):
    pkg = package(tmp_path / "p.pkg", threshold=0.4)
    assert main(["info", str(pkg)]) == 0
    out = capsys.readouterr().out
    assert "cfar_scored (a network of its own, no encoder)" in out
    assert "small CNN on 32x32 chips" in out and "score threshold 0.4" in out


def test_a_package_without_a_score_threshold_is_refused(tmp_path):
    pkg = package(tmp_path / "p.pkg")
    card = json.loads((pkg / "model.json").read_text())
    del card["architecture"]["cfar_scored"]["score_threshold"]
    (pkg / "model.json").write_text(json.dumps(card))
    with pytest.raises(PackageError, match=r"p\.pkg.*cfar_scored\.score_threshold.*train the package again"):
        load_package(pkg)


def test_onnxruntime_without_model_onnx_says_what_to_do(tmp_path):
    path, pkg = scene(tmp_path / "s.tif"), package(tmp_path / "p.pkg", onnx=False)
    with pytest.raises(SarmaeError, match=r"p\.pkg.*no model\.onnx.*--backend torch"):
        run_inference([str(path)], tmp_path / "d.gpkg", str(pkg), InferenceOptions(backend="onnxruntime"))


def test_db_given_as_linear_is_refused(tmp_path):
    path, pkg = scene(tmp_path / "s.tif"), package(tmp_path / "p.pkg")
    with pytest.raises(RasterInputError, match=r"s\.tif.*look like dB"):
        run_inference([str(path)], tmp_path / "d.gpkg", str(pkg), InferenceOptions(input_units="linear_power"))


def test_export_says_the_onnx_is_already_there(tmp_path, capsys):
    pkg = package(tmp_path / "p.pkg")
    assert main(["export", str(pkg)]) != 0
    err = capsys.readouterr().err
    assert "p.pkg" in err and "already there" in err and "Traceback" not in err, err


def test_init_points_to_finetune(tmp_path, capsys):
    rc = main(["init", "--task", "detect", "--method", "cfar_scored", "--output", str(tmp_path / "x.pkg")])
    assert rc != 0 and "sarmae finetune --task detect --method cfar_scored" in capsys.readouterr().err


def test_to_db_floors_zero_power():
    v = to_db(np.array([[0.0, 1.0]], np.float32), np.array([[True, False]]))
    assert v.tolist() == [[-100.0, 0.0]]


def test_the_plugin_reads_it_as_a_method_card(tmp_path):
    from sarmae_qgis.model_cards import read_card as plugin_card

    card = plugin_card(package(tmp_path / "p.pkg"))
    assert card.task == "detect" and card.method == "cfar_scored" and card.classes[0][0] == "ship"


# --- format 2: the box branch, and the proposal levels ------------------------------------------

def regress_package(dest: Path, bias: tuple[float, float, float, float], onnx: bool = True) -> Path:
    """A format-2 package whose box branch moves every box by ``bias`` (deltas: centre in chip sides,
    log width / height), its score seeded and untrained."""
    torch.manual_seed(0)
    model = ChipScorer(ChipScorerConfig(regress=True, box_channel=True)).eval()
    with torch.no_grad():
        model.box[-1].bias.copy_(torch.tensor(bias))
    card = cfar_scored_card(CFAR, model.cfg.to_dict(), "ship", 0.0, "scored-v2")
    assert card.architecture.extra["cfar_scored"]["format"] == 2
    return save_package(model.state_dict(), card, dest, onnx_bytes=export_chip_scorer(model) if onnx else None)


def test_deltas_round_trip_and_follow_a_quarter_turn():
    from engine.models.chip_scorer import apply_deltas, box_deltas
    from training.finetune.cfar_scored import augment

    boxes = np.array([[10, 10, 22, 13], [50, 40, 53, 60]], float)
    target = np.array([[11, 9, 25, 14], [49, 42, 54, 57]], float)
    sides = chip_sides(boxes)
    np.testing.assert_allclose(apply_deltas(boxes, box_deltas(boxes, target, sides), sides), target, atol=1e-4)
    # a chip with a bright target off its centre: after any augmentation, the deltas still point at it
    s = 32
    chip = torch.zeros(1, 1, s, s)
    chip[0, 0, 4:8, 20:30] = 1.0  # rows 4..7, columns 20..29 of a chip sampled 1:1
    centre = np.array([[12.0, 12.0, 20.0, 20.0]])
    d = torch.from_numpy(box_deltas(centre, np.array([[20.0, 4.0, 30.0, 8.0]]), np.array([s])))
    torch.manual_seed(3)
    for _ in range(12):
        c, g, dd = augment(chip.clone(), torch.zeros(1, 3), d.clone())
        rows, cols = torch.nonzero(c[0, 0] > 0.5, as_tuple=True)
        seen = np.array([[cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]], float)
        np.testing.assert_allclose(dd.numpy(), box_deltas(centre, seen, np.array([s])), atol=1e-5)


def test_the_box_branch_moves_boxes_the_same_through_onnxruntime_and_torch(tmp_path):
    path = scene(tmp_path / "s.tif")
    plain = run_inference([str(path)], tmp_path / "p.gpkg", str(package(tmp_path / "p.pkg")),
                          InferenceOptions(input_units="db", score_threshold=0.0))
    b0, _ = boxes_scores(plain.outputs["detections"])
    pkg = regress_package(tmp_path / "r.pkg", (0.0, 0.0, float(np.log(1.5)), 0.0))
    out = {}
    for backend in ("onnxruntime", "torch"):
        res = run_inference([str(path)], tmp_path / f"{backend}.gpkg", str(pkg),
                            InferenceOptions(backend=backend, input_units="db", score_threshold=0.0))
        out[backend] = boxes_scores(res.outputs["detections"])
    np.testing.assert_allclose(out["onnxruntime"][0], out["torch"][0], atol=1e-3)
    b1 = out["torch"][0]
    assert len(b1) == len(b0) >= 9
    key = lambda b: np.lexsort((b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2))  # noqa: E731  by centre
    b0, b1 = b0[key(b0)], b1[key(b1)]
    inside = (b1[:, 0] > 0) & (b1[:, 0] + b1[:, 2] < 200)  # not clipped at the raster's edge
    np.testing.assert_allclose(b1[inside, 2], 1.5 * b0[inside, 2], rtol=1e-3)  # width x 1.5, centre kept
    np.testing.assert_allclose(b1[:, 3], b0[:, 3], rtol=1e-3)
    np.testing.assert_allclose(b1[inside, 0] + b1[inside, 2] / 2, b0[inside, 0] + b0[inside, 2] / 2, atol=1e-3)


def test_format_1_packages_still_run_and_unknown_formats_are_refused(tmp_path):
    old = package(tmp_path / "old.pkg")
    card = json.loads((old / "model.json").read_text())
    assert card["architecture"]["cfar_scored"]["format"] == 2 and card["architecture"]["head"]["regress"] is False
    # as the packages of the last round: no format, no box-branch field, no proposal levels
    del card["architecture"]["cfar_scored"]["format"], card["architecture"]["head"]["regress"]
    del card["architecture"]["cfar"]["levels_db"]
    (old / "model.json").write_text(json.dumps(card))
    res = run_inference([str(scene(tmp_path / "s.tif"))], tmp_path / "d.gpkg", str(old),
                        InferenceOptions(input_units="db", score_threshold=0.0))
    assert res.statistics["scorer"]["proposals"] >= 9
    new = regress_package(tmp_path / "new.pkg", (0.0, 0.0, 0.0, 0.0))
    card = json.loads((new / "model.json").read_text())
    card["architecture"]["cfar_scored"]["format"] = 3
    (new / "model.json").write_text(json.dumps(card))
    with pytest.raises(PackageError, match=r"new\.pkg.*format.*3.*update sarmae"):
        load_package(new)
    del card["architecture"]["cfar_scored"]["format"]
    (new / "model.json").write_text(json.dumps(card))
    with pytest.raises(PackageError, match=r"new\.pkg.*regress.*format' 2"):
        load_package(new)


def test_proposal_levels_split_touching_ships_and_cut_sidelobes():
    from engine.cfar import CfarConfig
    from engine.cfar.objects import detect_array

    def run(power, **cfg):
        c = CfarConfig(method="ca", pfa=1e-4, min_area=4, **cfg)
        return detect_array(power, None, c, c.resolve(None))

    have = lambda o, b: any(np.allclose(x, b) for x in o.boxes)  # noqa: E731
    rng = np.random.default_rng(0)
    power = rng.exponential(1.0, (120, 120)).astype(np.float32)
    power[30:34, 20:32] = 3000.0  # two ships 2 px apart: one object at the threshold (merge gap 2 px)
    power[30:34, 34:46] = 3000.0
    plain, levels = run(power, guard=11, background=41), run(power, guard=11, background=41, levels_db=[3, 6, 10])
    assert have(plain, [20, 30, 46, 34]) and not have(plain, [20, 30, 32, 34])
    for box in ([20, 30, 46, 34], [20, 30, 32, 34], [34, 30, 46, 34]):
        assert have(levels, box), box  # the CFAR object and each ship
    assert len(np.unique(levels.boxes, axis=0)) == len(levels)  # each box once
    power = rng.exponential(1.0, (120, 120)).astype(np.float32)
    power[80:84, 60:72] = 3000.0  # a ship with sidelobes along its rows, 7 px beyond each end, 15 dB down
    power[81:83, 53:60] = power[81:83, 72:79] = 100.0
    plain, levels = run(power, guard=31, background=61), run(power, guard=31, background=61, levels_db=[3, 6, 10])
    assert not have(plain, [60, 80, 72, 84]) and have(levels, [60, 80, 72, 84])
    with pytest.raises(Exception, match="levels_db"):
        CfarConfig(levels_db=[-3.0])


def test_the_box_channel_draws_the_proposal_in_its_chip():
    from engine.cfar.chips import box_masks

    boxes = np.array([[10, 10, 22, 14], [100, 50, 103, 80]], float)
    sides = chip_sides(boxes)
    m = box_masks(boxes, sides, 32)
    assert m.shape == (2, 1, 32, 32) and m.max() <= 1.0
    areas = m.sum((1, 2, 3)) * (sides / 32) ** 2  # cells -> px^2
    np.testing.assert_allclose(areas, [48.0, 90.0], rtol=1e-4)
    rows, cols = np.nonzero(m[0, 0])
    assert rows.min() + rows.max() == 31 and cols.min() + cols.max() == 31  # centred
    assert np.ptp(cols) > np.ptp(rows)  # wider than tall, as the box


def test_bad_input_for_the_learned_detector_says_what_and_where(tmp_path):
    """The issue's bad-input list, through the scorer's method: a background window larger than the
    raster, and a land mask with no water (no boxes, and why), each naming the file."""
    from engine.cfar import CfarConfigError

    pkg = package(tmp_path / "p.pkg")
    small = write_raster(tmp_path / "small.tif", np.full((30, 30), -20.0, np.float32), descriptions=["VV"])
    with pytest.raises(CfarConfigError, match=r"small\.tif.*background window \(41 x 41 px\) is larger than the raster"):
        run_inference([str(small)], tmp_path / "s.gpkg", str(pkg), InferenceOptions(input_units="db"))
    path = scene(tmp_path / "s.tif")
    land = write_raster(tmp_path / "land.tif", np.zeros((200, 200), np.uint8))
    res = run_inference([str(path)], tmp_path / "l.gpkg", str(pkg), InferenceOptions(input_units="db",
                                                                                    water_mask=str(land)))
    assert res.statistics["detections"] == 0
    assert any("land.tif" in w and "has no water" in w for w in res.statistics["warnings"]), res.statistics
