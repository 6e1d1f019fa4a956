"""The evaluation recipes' splits (training/recipes): OpenSARShip chips are split BY SCENE (no test
scene's chip in the pool), labelled cargo / tanker / other from the AIS type in the file name; HRSID
folds hold one whole image out; the balanced accuracy weighs every class alike."""

import json

import numpy as np
import pytest

from training.recipes.eval_mstar import balanced_accuracy, scene_split


def _product(root, name, files):
    d = root / name / "Patch_Cal"
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_bytes(b"")  # symlinked, never read here


def test_scene_split_keeps_scenes_apart(tmp_path):
    src = tmp_path / "src"
    a = "S1A_IW_GRDH_1SDV_20150902T102505_20150902T102534_007535_00A699_2D00"
    b = "S1A_IW_GRDH_1SSV_20160131T204259_20160131T204324_009743_00E3C6_E792"
    _product(src, a, ["Cargo_x1_y2.tif", "Tanker_x3_y4.tif", "Other Type_x5_y6.tif", "Tug_x7_y8.tif"])
    _product(src, b, ["Cargo_x1_y2.tif", "Passenger_x9_y9.tif"])
    pool, test = scene_split(src, tmp_path / "split", ["20160131T204259"])
    names = lambda part: sorted(p.relative_to(part).as_posix() for p in part.rglob("*.tif"))  # noqa: E731
    assert names(pool) == ["cargo/20150902T102505_Cargo_x1_y2.tif", "other/20150902T102505_Other_Type_x5_y6.tif",
                           "other/20150902T102505_Tug_x7_y8.tif", "tanker/20150902T102505_Tanker_x3_y4.tif"]
    assert names(test) == ["cargo/20160131T204259_Cargo_x1_y2.tif", "other/20160131T204259_Passenger_x9_y9.tif"]
    rec = json.loads((tmp_path / "split" / "split.json").read_text())
    assert rec["chips"]["test"] == {"cargo": 1, "other": 1}
    with pytest.raises(SystemExit, match="other test scenes"):  # a stale split is not reused silently
        scene_split(src, tmp_path / "split", ["20150902T102505"])
    with pytest.raises(SystemExit, match="match no product"):
        scene_split(src, tmp_path / "split2", ["20990101T000000"])


def test_balanced_accuracy_weighs_classes_alike():
    labels = np.array([0] * 8 + [1] * 2)
    always_0 = np.tile([1.0, 0.0], (10, 1))
    assert balanced_accuracy(always_0, labels) == pytest.approx(0.5)  # 80 % accuracy, chance when balanced


def test_hrsid_folds_hold_one_image_out(tmp_path):
    from training.recipes.eval_floods import hrsid_folds
    from training.recipes.eval_smoke import DATA

    if not (DATA / "hrsid").is_dir():
        pytest.skip("../shared/data/hrsid not present")
    import rasterio

    folds = hrsid_folds(tmp_path)
    assert len(folds) == 4 and len({f["test_image"] for f in folds}) == 4
    for f in folds:
        with rasterio.open(f["train_raster"]) as tr, rasterio.open(f["test_raster"]) as te:
            assert (tr.width, te.width) == (3 * te.width, te.width)  # the other three images, side by side
        with rasterio.open(f["test_labels"]) as lab:
            y = lab.read(1)
            assert set(np.unique(y)) == {0, 1} and 0 < y.mean() < 0.2  # sea and a few ship pixels
