"""CFAR detector: thresholds, false-alarm rate, targets, guard window, nodata, units, strips, bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from engine.cfar import CfarConfig, CfarConfigError
from engine.cfar.objects import detect_array, nms
from engine.cfar.order import os_factor, os_grid
from engine.cfar.scene import run_cfar
from engine.cfar.statistics import ca_factor, cfar_map
from engine.errors import RasterInputError

TARGETS = [(40, 50), (100, 200), (180, 90), (250, 260), (300, 40), (60, 300)]  # (row, col) of 3 x 5 px ships


def scene(h: int = 360, w: int = 360, looks: float = 4.0, seed: int = 0, level: float = 40.0) -> np.ndarray:
    """Gamma clutter (mean 1, ``looks`` looks) with bright 3 x 5 px targets at TARGETS."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(looks, 1.0 / looks, size=(h, w)).astype(np.float32)
    for r, c in TARGETS:
        if r + 3 <= h and c + 5 <= w:
            x[r:r + 3, c:c + 5] = level
    return x


def truth_boxes(h: int = 360, w: int = 360) -> np.ndarray:
    return np.array([(c, r, c + 5, r + 3) for r, c in TARGETS if r + 3 <= h and c + 5 <= w], np.float64)


def write_tif(path: Path, a: np.ndarray, *, nodata=None, crs=None, transform=None, tags=None) -> str:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    prof = dict(driver="GTiff", width=a.shape[1], height=a.shape[0], count=1, dtype=a.dtype, nodata=nodata)
    if crs is not None:
        prof.update(crs=crs, transform=transform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **prof) as dst:
            dst.write(a, 1)
            if tags:
                dst.update_tags(**tags)
    return str(path)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x1, y1 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_threshold_factors_match_closed_forms():
    # CA on exponential clutter: T = n (pfa^(-1/n) - 1)
    assert ca_factor(400, 1e-5) == pytest.approx(400 * (1e-5 ** (-1 / 400) - 1), rel=1e-9)
    # OS on exponential clutter: pfa = prod_{i<k} (n - i) / (n - i + T)
    t = os_factor(120, 90, 1e-4)
    assert np.prod([(120 - i) / (120 - i + t) for i in range(90)]) == pytest.approx(1e-4, rel=1e-6)
    # more looks: smaller factor (less speckle), at the same pfa
    assert ca_factor(400, 1e-5, enl=4) < ca_factor(400, 1e-5)


@pytest.mark.parametrize("method,looks", [("ca", 1.0), ("ca", 4.0), ("os", 1.0)])
def test_false_alarm_rate_on_clutter_is_the_pfa(method, looks):
    x = np.random.default_rng(1).gamma(looks, 1 / looks, size=(700, 700)).astype(np.float32)
    cfg = CfarConfig(method=method, pfa=2e-3, enl=looks, guard=3, background=21, min_area=1)
    m = cfar_map(x, np.ones(x.shape, bool), cfg, cfg.resolve(None))
    rate = m.detected.sum() / m.tested
    # ~980 expected detections: well within 20 % unless the threshold factor or the statistics are wrong
    assert rate == pytest.approx(2e-3, rel=0.2), rate


def test_k_sigma_rule():
    x = np.random.default_rng(2).exponential(size=(500, 500)).astype(np.float32)
    cfg = CfarConfig(pfa=None, k_sigma=3.0, guard=3, background=31, min_area=1)
    m = cfar_map(x, np.ones(x.shape, bool), cfg, cfg.resolve(None))
    assert m.detected.sum() / m.tested == pytest.approx(np.exp(-4.0), rel=0.15)  # P(x > 1 + 3) for Exp(1)


@pytest.mark.parametrize("method", ["ca", "os"])
def test_targets_found_at_pfa(method):
    x = scene()
    cfg = CfarConfig(method=method, pfa=1e-6, enl=4.0, guard=9, background=41)
    obj = detect_array(x, None, cfg, cfg.resolve(None))
    truth = truth_boxes()
    iou = iou_matrix(truth, obj.boxes)
    assert (iou.max(1) > 0.99).all(), obj.boxes  # every ship, with its exact box
    assert len(obj) <= len(truth) + 2  # pfa 1e-6 over 0.13 Mpx: ~0.1 false alarm expected
    assert ((obj.scores > 0) & (obj.scores < 1)).all()
    assert np.allclose(obj.pixels[iou.argmax(1)], 15)


def test_guard_window_must_hold_the_target():
    x = np.random.default_rng(3).exponential(size=(200, 200)).astype(np.float32)
    x[95:104, 95:104] = 30.0  # a 9 x 9 px object
    small = CfarConfig(pfa=1e-4, guard=3, background=15, min_area=1)
    wide = CfarConfig(pfa=1e-4, guard=13, background=31, min_area=1)
    found = detect_array(x, None, wide, wide.resolve(None))
    hit = iou_matrix(np.array([[95.0, 95, 104, 104]]), found.boxes)[0]
    assert hit.max() == 1.0
    m = cfar_map(x, np.ones(x.shape, bool), small, small.resolve(None))
    assert not m.detected[99, 99]  # the object's own pixels fill the ring: its centre is not detected


@pytest.mark.parametrize("method", ["ca", "os"])
def test_nodata_is_left_out_of_the_background(tmp_path, method):
    x = np.random.default_rng(4).exponential(size=(400, 400)).astype(np.float32)
    x[:, :200] = -9999.0  # declared nodata: half the raster
    path = write_tif(tmp_path / "gap_linear.tif", x, nodata=-9999.0)
    cfg = CfarConfig(method=method, pfa=1e-3, guard=3, background=31, min_area=1, input_units="linear_power")
    res = run_cfar(path, None, cfg)
    assert res.valid_pixels == 400 * 200
    # counted as zeros, the gap would halve the ring mean beside it (~30x the false alarms there)
    near = res.objects.boxes[:, 0] < 200 + 15
    assert near.sum() <= 15, near.sum()  # ~6 expected among 6000 px beside the gap
    assert (res.objects.boxes[:, 0] >= 200).all()


def test_db_input_is_converted_and_db_given_as_linear_is_refused(tmp_path):
    x = scene()
    lin = write_tif(tmp_path / "s_linear.tif", x)
    db = write_tif(tmp_path / "s.tif", (10 * np.log10(x)).astype(np.float32), tags={"UNITS": "dB"})
    cfg = CfarConfig(pfa=1e-6, enl=4.0, guard=9, background=41)
    a, b = run_cfar(lin, None, cfg), run_cfar(db, None, cfg)
    assert (a.units, b.units) == ("linear_power", "db")
    assert np.allclose(a.objects.boxes, b.objects.boxes) and len(a.objects) >= len(TARGETS)
    assert any("converted to linear power" in line for line in b.log)
    with pytest.raises(RasterInputError, match=r"s\.tif.*negative.*dB"):
        run_cfar(db, None, CfarConfig(pfa=1e-6, input_units="linear_power"))


@pytest.mark.parametrize("method,block_rows,levels", [("ca", 64, []), ("os", 64, []), ("ca", 16, [3.0, 6.0]),
                                                      ("os", 48, [3.0])])
def test_strips_equal_the_whole_array(tmp_path, monkeypatch, method, block_rows, levels):
    import engine.cfar.scene as scene_mod

    h, w = 520, 360
    x = scene(h, w, seed=5)
    x[126:131, 10:15] = 60.0  # across the boundary of 64-row strips (rows 128)
    x[255:258, 300:340] = 25.0  # a long object across another one
    x[400:470, 200:203] = 30.0  # longer than the strips of 16 rows and their neighbours' object overlap
    path = write_tif(tmp_path / "strips.tif", x)
    cfg = CfarConfig(method=method, pfa=1e-5, enl=4.0, guard=9, background=41, block_rows=block_rows,
                     input_units="linear_power", threads=2, levels_db=levels)
    rows = []  # the rows of every CFAR pass: each strip's own rows plus its background margins, no overlap twice
    real = scene_mod.cfar_map
    monkeypatch.setattr(scene_mod, "cfar_map", lambda p, *a: (rows.append(p.shape[0]), real(p, *a))[1])
    res = run_cfar(path, tmp_path / "out.gpkg", cfg)
    whole = detect_array(x, None, cfg, cfg.resolve(None))
    order = lambda o: np.lexsort(o.boxes.T[::-1])  # noqa: E731
    a, b = res.objects.take(order(res.objects)), whole.take(order(whole))
    assert len(a) == len(b) >= len(TARGETS) + 3
    assert np.array_equal(a.boxes, b.boxes)
    for f in ("scores", "ratios", "pixels", "lengths"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    px = cfg.resolve(None)
    margin, step = px.background[0], block_rows  # the background window's half (OS: its cells' reach)
    if method == "os":  # on the cell grid
        cell = os_grid(cfg, px).cell
        margin, step = -(-max(margin, os_grid(cfg, px).reach) // cell) * cell, -(-block_rows // cell) * cell
    strips = -(-h // step)
    assert len(rows) == strips and sum(rows) <= h + 2 * margin * strips


def test_geopackage_in_map_units_with_sizes_in_metres(tmp_path):
    import fiona
    from rasterio.transform import from_origin

    x = np.random.default_rng(6).gamma(4, 0.25, size=(200, 200)).astype(np.float32)
    x[100:103, 50:60] = 40.0  # 3 x 10 px = 30 x 100 m
    path = write_tif(tmp_path / "geo_linear.tif", x, crs="EPSG:32631", transform=from_origin(500000, 4650000, 10, 10))
    cfg = CfarConfig(pfa=1e-7, enl=4.0, guard=150, background=500, window_units="m", min_area=500)
    res = run_cfar(path, tmp_path / "ships.gpkg", cfg)
    assert res.area_km2 == pytest.approx(4.0)
    with fiona.open(res.output, layer="detections") as src:
        feats = list(src)
    assert len(feats) == 1
    p = feats[0]["properties"]
    assert p["area_m2"] == pytest.approx(3000.0) and 100 <= p["length_m"] <= 125
    (x0, y0), (x1, y1) = feats[0]["geometry"]["coordinates"][0][0], feats[0]["geometry"]["coordinates"][0][2]
    assert sorted([x0, x1]) == [500500.0, 500600.0] and sorted([y0, y1]) == [4648970.0, 4649000.0]


def test_water_mask(tmp_path):
    x = scene()
    path = write_tif(tmp_path / "coast_linear.tif", x)
    water = np.ones(x.shape, np.uint8)
    water[:, :150] = 0  # land on the left
    res = run_cfar(path, None, CfarConfig(pfa=1e-6, enl=4, guard=9, background=41,
                                          water_mask=write_tif(tmp_path / "water.tif", water)))
    cols = res.objects.boxes[:, 0]
    assert (cols >= 150).all() and len(res.objects) >= sum(c >= 150 for _, c in TARGETS)
    dry = write_tif(tmp_path / "dry.tif", np.zeros(x.shape, np.uint8))
    res = run_cfar(path, tmp_path / "none.gpkg", CfarConfig(water_mask=dry))
    assert len(res.objects) == 0 and "no boxes: the mask" in res.warnings[0] and "dry.tif" in res.warnings[0]
    assert Path(res.output).exists()
    other = write_tif(tmp_path / "small_mask.tif", water[:100])
    with pytest.raises(RasterInputError, match="small_mask.tif.*not on the grid"):
        run_cfar(path, None, CfarConfig(water_mask=other))


def test_bad_settings_and_windows(tmp_path):
    for bad in (dict(pfa=0.0), dict(pfa=1.5), dict(pfa=None), dict(guard=41, background=41), dict(method="x"),
                dict(merge_gap=-1)):
        with pytest.raises(CfarConfigError):
            CfarConfig(**bad)
    small = write_tif(tmp_path / "tiny_linear.tif", np.ones((30, 30), np.float32))
    with pytest.raises(CfarConfigError, match="tiny_linear.tif.*larger than the raster"):
        run_cfar(small, None, CfarConfig(background=41))
    x = np.full((200, 200), -1.0, np.float32)
    x[90:110, 90:110] = 1.0  # a 20 x 20 px valid area, background window 41 px
    gap = write_tif(tmp_path / "islet_linear.tif", x, nodata=-1.0)
    with pytest.raises(CfarConfigError, match="islet_linear.tif.*larger than the valid area"):
        run_cfar(gap, None, CfarConfig(background=41, input_units="linear_power"))
    with pytest.raises(CfarConfigError, match="no georeferencing in metres"):
        run_cfar(small, None, CfarConfig(guard=5, background=21, window_units="m"))


def test_pieces_of_one_ship_are_one_object_ranked_above_a_bright_speck():
    x = np.random.default_rng(7).exponential(size=(200, 200)).astype(np.float32)
    x[100:104, 50:57] = 40.0  # a ship in two pieces, 2 dark columns apart (bow / stern)
    x[100:104, 59:66] = 40.0
    x[40, 150] = 1e4  # one very bright pixel (a speck, a sidelobe)
    found = {}
    for gap in (0, 2):
        cfg = CfarConfig(pfa=1e-6, guard=15, background=41, merge_gap=gap, min_area=1)
        px = cfg.resolve(None)
        assert px.merge == gap // 2
        found[gap] = detect_array(x, None, cfg, px)
    ship = np.array([[50.0, 100, 66, 104]])
    assert iou_matrix(ship, found[2].boxes).max() == 1.0  # one object, one box
    assert iou_matrix(np.array([[50.0, 100, 57, 104], [59, 100, 66, 104]]), found[0].boxes).max(1).min() == 1.0
    # the ship (56 px well above the clutter) outranks the single brightest pixel
    speck = iou_matrix(np.array([[150.0, 40, 151, 41]]), found[2].boxes)[0].argmax()
    assert found[2].scores[iou_matrix(ship, found[2].boxes)[0].argmax()] > found[2].scores[speck]
    assert found[2].ratios[speck] > 100  # ... although its peak CFAR ratio is the highest
    metres = CfarConfig(window_units="m", guard=150, background=500, merge_gap=40)
    assert metres.resolve((10.0, 10.0)).merge == 2  # 40 m = 4 px
    assert CfarConfig(window_units="m", guard=150, background=500).resolve((10.0, 10.0)).merge == 1  # default 2 px


@pytest.mark.parametrize("density", [3e-4, 5e-3, 0.05])
def test_grouping_is_the_grown_mask_components(density):
    from scipy import ndimage as ndi

    from engine.cfar.objects import EIGHT, group, grown

    det = np.random.default_rng(8).random((300, 420)) < density  # 0.05: the dense path
    idx = np.flatnonzero(det)
    for r in (0, 1, 2):
        lab, n = ndi.label(grown(det, r), structure=EIGHT)
        ids, m = group(idx, det.shape, r)
        pairs = np.unique(np.stack([lab.ravel()[idx], ids], 1), axis=0)
        assert n == m == len(pairs)  # the same partition of the detections
        firsts = np.unique(ids, return_index=True)[1]
        assert (np.diff(firsts) > 0).all()  # numbered in raster order of their first pixel


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float64)
    assert sorted(nms(boxes, np.array([0.5, 0.9, 0.1]), 0.5).tolist()) == [1, 2]
    assert sorted(nms(boxes, np.array([0.5, 0.9, 0.1]), 0.9).tolist()) == [0, 1, 2]
