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
