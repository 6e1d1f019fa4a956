"""Chips from labelled polygons / class rasters (training/finetune/labels.py): targets, reprojection,
the spatial split, and every bad input refused with a clear FinetuneError before training."""

from __future__ import annotations

import numpy as np
import pytest
from ftdata import (
    CRS,
    boxes_to_polygons,
    build_encoder,
    class_polygons,
    ship_scene,
    water_land,
    write_db,
    write_labels,
)

from training.finetune.common import FinetuneError
from training.finetune.labels import IGNORE, build_chips, chip_boxes
from training.finetune.sampling import plan_blocks, split_blocks

S = 32


@pytest.fixture(scope="module")
def contract(tmp_path_factory) -> dict:
    from engine.package import read_card

    return read_card(build_encoder(tmp_path_factory.mktemp("enc") / "enc", img_size=S)).input


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 192 px water/land raster, its truth and labels (water + land polygons) in the raster's CRS."""
    d = tmp_path_factory.mktemp("scene")
    tif, truth = water_land(d / "wl.tif")
    gpkg = write_labels(d / "wl.gpkg", class_polygons(truth, {0: "water", 1: "land"}))
    return tif, truth, gpkg


def agreement(chips, truth: np.ndarray) -> float:
    """Share of the chips' labelled mask pixels equal to the truth map at their windows."""
    hit = tot = 0
    for n, (_, r, c) in enumerate(chips.windows):
        m = chips.masks[n].numpy()
        t = truth[r:r + S, c:c + S]
        ok = m[:t.shape[0], :t.shape[1]] != IGNORE
        names = np.array(chips.classes)[m[:t.shape[0], :t.shape[1]][ok]]
        hit += int(np.sum(names == np.where(t[ok] == 0, "water", "land")))
        tot += int(ok.sum())
    return hit / max(tot, 1)


def test_segment_chips_follow_the_polygons(scene, contract):
    tif, truth, gpkg = scene
    chips = build_chips(tif, contract, S, "segment", labels=gpkg, class_field="class", seed=1)
    assert chips.classes == ["land", "water"]
    assert chips.x.shape[1:] == (2, S, S) and chips.x.dtype.is_floating_point
    assert chips.masks.shape == (len(chips.x), S, S)
    assert agreement(chips, truth) > 0.99
    assert chips.split.any() and (~chips.split).any()
    assert any("spatial split" in m for m in chips.log)
    assert "dB" in chips.inputs[0]
    # the chips hold exactly what the engine's radiometry makes of the raster
    from engine.radiometry import Radiometry
    from engine.reader import SarRaster
    from engine.tiling import Window

    i, r, c = chips.windows[0]
    with SarRaster.open(str(tif)) as ras:
        x, v = ras.read(Window(r, c, S, S))
        want = Radiometry.for_raster(contract, ras).apply(x, v)
    assert np.allclose(chips.x[0].float().numpy(), want, atol=2e-3)


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".shp"])
def test_vector_formats_and_numeric_classes(tmp_path, scene, contract, suffix):
    tif, truth, _ = scene
    vec = write_labels(tmp_path / f"codes{suffix}", class_polygons(truth, {0: 10, 1: 20}), field="code", ftype="int")
    chips = build_chips(tif, contract, S, "segment", labels=vec, class_field="code")
    assert chips.classes == ["10", "20"]
    named = np.array(["water", "land"])[(np.array(chips.classes) == "20").astype(int)]
    chips.classes = named.tolist()
    assert agreement(chips, truth) > 0.99


def test_unlabelled_pixels_are_ignored_or_background(tmp_path, scene, contract):
    tif, truth, _ = scene
    water_only = [(g, n) for g, n in class_polygons(truth, {0: "water"})]
    gpkg = write_labels(tmp_path / "w.gpkg", water_only + boxes_to_polygons([(150, 150, 170, 170)], "rock"))
    chips = build_chips(tif, contract, S, "segment", labels=gpkg, class_field="class")
    assert (chips.masks == IGNORE).any()  # land pixels are not labelled -> ignored
    bg = build_chips(tif, contract, S, "segment", labels=gpkg, class_field="class", background="land")
    assert bg.classes == ["land", "rock", "water"]
    assert not (bg.masks == IGNORE).any()
    assert agreement(bg, np.where((truth == 1), 1, 0)) > 0.97  # 'rock' (20x20 px) aside, land = truth


def test_later_features_on_top(tmp_path, scene, contract):
    tif, _, _ = scene
    big = boxes_to_polygons([(0, 0, 192, 192)], "land")
    small = boxes_to_polygons([(60, 60, 80, 80)], "ship")
    gpkg = write_labels(tmp_path / "o.gpkg", big + small + boxes_to_polygons([(100, 100, 140, 140)], "ship"))
    chips = build_chips(tif, contract, S, "segment", labels=gpkg, class_field="class", block_chips=2)
    for n, (_, r, c) in enumerate(chips.windows):
        m = chips.masks[n].numpy()
        rr, cc = 70 - r, 70 - c
        if 0 <= rr < S and 0 <= cc < S:
            assert chips.classes[m[rr, cc]] == "ship"


def test_polygons_in_4326_are_reprojected_and_said(tmp_path, scene, contract):
    from rasterio.warp import transform_geom
    from shapely.geometry import mapping, shape

    tif, truth, _ = scene
    feats = [(shape(transform_geom(CRS, "EPSG:4326", mapping(g))), n)
             for g, n in class_polygons(truth, {0: "water", 1: "land"})]
    gj = write_labels(tmp_path / "wgs84.geojson", feats, crs="EPSG:4326")
    chips = build_chips(tif, contract, S, "segment", labels=gj, class_field="class")
    said = [m for m in chips.log if "reprojected" in m]
    assert said and "EPSG:4326" in said[0] and "EPSG:32631" in said[0]
    assert agreement(chips, truth) > 0.98


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_chips", [2, 3, 4])
def test_spatial_split_never_overlaps(tmp_path, contract, seed, block_chips):
    tif, truth = water_land(tmp_path / "big.tif", size=320, seed=seed)
    gpkg = write_labels(tmp_path / "l.gpkg", class_polygons(truth, {0: "water", 1: "land"}))
    chips = build_chips(tif, contract, S, "segment", labels=gpkg, class_field="class", seed=seed,
                        block_chips=block_chips, val_fraction=0.3)
    seen_train = np.zeros(truth.shape, bool)
    seen_val = np.zeros(truth.shape, bool)
    for (_, r, c), val in zip(chips.windows, chips.split):
        inside = [b for b in chips.blocks if b[1] <= r and r + S <= b[3] and b[2] <= c and c + S <= b[4]]
        assert len(inside) == 1 and inside[0][5] == val  # entirely inside one block, of its split
        (seen_val if val else seen_train)[r:r + S, c:c + S] = True
    assert seen_val.any() and seen_train.any()
    assert not (seen_val & seen_train).any()


# -------------------------------------------------------------------------------- classification
def label_share(chips, truth: np.ndarray, names=("water", "land")) -> np.ndarray:
    """Per chip: the share of its window whose truth is the chip's class."""
    out = []
    for n, (_, r, c) in enumerate(chips.windows):
        want = names.index(chips.classes[chips.labels[n]])
        out.append(float(np.mean(truth[r:r + S, c:c + S] == want)))
    return np.array(out)


def test_classify_chips_inside_the_polygons(scene, contract):
    tif, truth, gpkg = scene
    chips = build_chips(tif, contract, S, "classify", labels=gpkg, class_field="class")
    assert chips.masks is None and chips.boxes is None and chips.labels.shape == (len(chips.x),)
    assert len(chips.x) > 40  # a grid of chips inside each of the two large polygons
    assert label_share(chips, truth).mean() > 0.9
    for split in (False, True):  # both classes on both sides of the spatial split
        assert set(chips.labels[chips.split == split].tolist()) == {0, 1}
    for (_, r, c), val in zip(chips.windows, chips.split):
        inside = [b for b in chips.blocks if b[1] <= r and r + S <= b[3] and b[2] <= c and c + S <= b[4]]
        assert len(inside) == 1 and inside[0][5] == val
    again = build_chips(tif, contract, S, "classify", labels=gpkg, class_field="class")
    assert again.windows == chips.windows  # seeded
    capped = build_chips(tif, contract, S, "classify", labels=gpkg, class_field="class", max_chips=20)
    assert len(capped.x) == 20 and np.bincount(capped.labels).tolist() == [10, 10]
    assert any("20 chips kept" in m and "balanced over classes" in m for m in capped.log)


def test_classify_background_chips_touch_no_label(tmp_path, scene, contract):
    tif, truth, _ = scene
    gpkg = write_labels(tmp_path / "w.gpkg", class_polygons(truth, {0: "water"}))
    with pytest.raises(FinetuneError, match=r"only one class \(water\) in w.gpkg over wl.tif: classification"):
        build_chips(tif, contract, S, "classify", labels=gpkg, class_field="class")
    chips = build_chips(tif, contract, S, "classify", labels=gpkg, class_field="class", background="land",
                        background_share=0.5)
    assert chips.classes == ["land", "water"]
    land = chips.labels == 0
    assert land.sum() >= 5
    for n in np.flatnonzero(land):  # background chips hold no labelled (water) pixel at all
        _, r, c = chips.windows[n]
        assert truth[r:r + S, c:c + S].min() == 1


def test_classify_chips_from_a_label_raster(tmp_path, scene, contract):
    import rasterio

    tif, truth, _ = scene
    with rasterio.open(tif) as src:
        prof = dict(driver="GTiff", width=src.width, height=src.height, count=1, dtype="uint8", crs=src.crs,
                    transform=src.transform)
    with rasterio.open(tmp_path / "lab.tif", "w", **prof) as dst:
        dst.write(truth, 1)
    chips = build_chips(tif, contract, S, "classify", label_raster=tmp_path / "lab.tif", classes=["water", "land"])
    assert set(chips.labels.tolist()) == {0, 1} and label_share(chips, truth).mean() > 0.8


def test_classify_evaluation_chips(tmp_path, scene, contract):
    tif, truth, _ = scene
    feats = class_polygons(truth, {0: "water", 1: "land"}) + boxes_to_polygons([(10, 150, 40, 180)], "rock")
    gpkg = write_labels(tmp_path / "e.gpkg", feats)
    chips = build_chips(tif, contract, S, "classify", labels=gpkg, class_field="class", classes=["water", "land"],
                        evaluation=True)
    assert chips.split.all() and chips.unknown_classes == {"rock": 1}  # matched by name, the rest reported
    assert label_share(chips, truth).mean() > 0.9
    one = write_labels(tmp_path / "one.gpkg", class_polygons(truth, {0: "water"}))
    only = build_chips(tif, contract, S, "classify", labels=one, class_field="class", classes=["water", "land"],
                       evaluation=True)  # one class is enough to evaluate
    assert set(only.labels.tolist()) == {0}


def test_split_holds_out_a_share_of_the_labels_not_of_the_blocks():
    """Ten labelled blocks, one a dense harbour with 90 of the 108 objects: validation takes about
    a fifth of the objects (never the harbour), not a fifth of the blocks."""
    present = [np.array([True])] * 10
    weights = [90] + [2] * 9
    for seed in range(5):
        val = split_blocks(present, [True] * 10, 0.2, np.random.default_rng(seed), weights)
        share = sum(w for w, v in zip(weights, val) if v) / sum(weights)
        assert not val[0] and 0.1 <= share <= 0.2 and 1 <= val.sum() <= 9
    even = split_blocks(present, [True] * 10, 0.2, np.random.default_rng(0))  # default: a fifth of the blocks
    assert even.sum() == 2


def test_plan_blocks_cover_the_raster_once():
    for h, w in [(192, 192), (200, 90), (31, 500), (96, 97)]:
        cover = np.zeros((h, w), int)
        for r0, c0, r1, c1 in plan_blocks(h, w, S, 3):
            cover[r0:r1, c0:c1] += 1
            assert (r1 - r0 >= S or h < S) and (c1 - c0 >= S or w < S)
        assert (cover == 1).all()


def test_small_rasters_are_padded_and_padding_ignored(tmp_path, contract):
    rng = np.random.default_rng(0)
    paths, feats = [], []
    for k in range(2):  # two 24 x 40 rasters side by side: one block each
        db = np.full((2, 24, 40), -20.0) + rng.normal(0, 1, (2, 24, 40))
        db[:, :, 20:] += 14
        from rasterio.transform import from_origin

        tf = from_origin(500000.0 + k * 2000, 4500000.0, 20.0, 20.0)
        paths.append(write_db(tmp_path / f"small{k}.tif", db, tf=tf))
        feats += boxes_to_polygons([(0, 0, 20, 24)], "water", tf) + boxes_to_polygons([(20, 0, 40, 24)], "land", tf)
    gpkg = write_labels(tmp_path / "s.gpkg", feats)
    chips = build_chips(paths, contract, S, "segment", labels=gpkg, class_field="class")
    assert {w[0] for w in chips.windows} == {0, 1}
    assert all(r == 0 and c in range(0, 9) for _, r, c in chips.windows)
    for n, (_, _, c) in enumerate(chips.windows):
        m = chips.masks[n].numpy()
        assert (m[24:, :] == IGNORE).all() and (m[:, 40 - c:] == IGNORE).all()  # padding: ignored
        assert (m[:24, :40 - c] != IGNORE).all()  # every raster pixel is labelled
        assert (chips.x[n, :, 24:].float() == 0).all()


def test_label_raster_like_sen1floods11(tmp_path, scene, contract):
    import rasterio

    tif, truth, _ = scene
    lab = truth.astype(np.int16)
    lab[:20, :] = -1  # nodata band at the top
    with rasterio.open(tif) as src:
        prof = dict(driver="GTiff", width=src.width, height=src.height, count=1, dtype="int16", crs=src.crs,
                    transform=src.transform)
    with rasterio.open(tmp_path / "lab.tif", "w", **prof) as dst:
        dst.write(lab, 1)
    chips = build_chips(tif, contract, S, "segment", label_raster=tmp_path / "lab.tif", classes=["water", "land"])
    assert chips.classes == ["water", "land"]
    for n, (_, r, c) in enumerate(chips.windows):
        m, t = chips.masks[n].numpy(), lab[r:r + S, c:c + S]
        assert (m[t < 0] == IGNORE).all() and (m[t >= 0] == t[t >= 0]).all()
    auto = build_chips(tif, contract, S, "segment", label_raster=tmp_path / "lab.tif")
    assert auto.classes == ["class_0", "class_1"]
    with pytest.raises(FinetuneError, match="value 1 but only 1 class"):
        build_chips(tif, contract, S, "segment", label_raster=tmp_path / "lab.tif", classes=["water"])
    with rasterio.open(tmp_path / "ones.tif", "w", **prof) as dst:
        dst.write(np.ones_like(lab), 1)
    with pytest.raises(FinetuneError, match=r"only one class \(land\).*in the label raster"):
        build_chips(tif, contract, S, "segment", label_raster=tmp_path / "ones.tif", classes=["water", "land"])


def test_label_raster_on_another_grid_is_reprojected(tmp_path, scene, contract):
    import rasterio
    from rasterio.transform import from_origin

    tif, truth, _ = scene
    coarse = truth[::2, ::2].astype(np.uint8)  # 40 m pixels, same CRS
    with rasterio.open(tmp_path / "coarse.tif", "w", driver="GTiff", width=96, height=96, count=1, dtype="uint8",
                       crs=CRS, transform=from_origin(500000.0, 4500000.0, 40.0, 40.0), nodata=255) as dst:
        dst.write(coarse, 1)
    chips = build_chips(tif, contract, S, "segment", label_raster=tmp_path / "coarse.tif", classes=["water", "land"])
    assert any("reprojected onto the grid" in m for m in chips.log)
    assert agreement(chips, truth) > 0.95


def test_detection_boxes(tmp_path, contract):
    tif, boxes = ship_scene(tmp_path / "ships.tif")
    gpkg = write_labels(tmp_path / "ships.gpkg", boxes_to_polygons(boxes))
    chips = build_chips(tif, contract, S, "detect", labels=gpkg, class_field="class")
    assert chips.classes == ["ship"] and chips.masks is None
    assert sum(len(b) for b in chips.boxes) >= len(boxes)
    for (_, r, c), bx, lb in zip(chips.windows, chips.boxes, chips.box_labels):
        assert (lb == 1).all() and ((bx >= 0) & (bx <= S)).all()
        clipped = {(max(b[0], c) - c, max(b[1], r) - r, min(b[2], c + S) - c, min(b[3], r + S) - r) for b in boxes}
        assert {tuple(b) for b in bx.tolist()} <= clipped  # each box: a ship seen through the chip
    tr = np.flatnonzero(~chips.split)
    held = [b for b in chips.blocks if b[-1]]
    in_train = [b for b in boxes if not any(r0 <= (b[1] + b[3]) / 2 < r1 and c0 <= (b[0] + b[2]) / 2 < c1
                                            for _, r0, c0, r1, c1, _ in held)]
    assert len(tr) == len(in_train) + round(len(in_train) / 3)  # one per ship in training + 25 % placed anywhere


def test_validation_tiles_the_held_out_blocks(tmp_path, contract):
    """Dense tasks are validated as a scene is seen: the held-out blocks tiled edge to edge (sea
    between the ships included), and no training chip reaches into them."""
    tif, boxes = ship_scene(tmp_path / "ships.tif")
    gpkg = write_labels(tmp_path / "ships.gpkg", boxes_to_polygons(boxes))
    chips = build_chips(tif, contract, S, "detect", labels=gpkg, class_field="class")
    held = [b for b in chips.blocks if b[-1]]
    assert held and any("tiling the held-out blocks" in m for m in chips.log)
    for _, r0, c0, r1, c1, _ in held:
        cover = np.zeros((r1 - r0, c1 - c0), int)
        for (_i, r, c), v in zip(chips.windows, chips.split):
            if v and r0 <= r < r1 and c0 <= c < c1:
                assert r + S <= r1 and c + S <= c1  # a tile stays inside its block
                cover[r - r0:r - r0 + S, c - c0:c - c0 + S] += 1
        assert cover.min() >= 1  # every pixel of the block is scored
    for (_i, r, c), v in zip(chips.windows, chips.split):
        if not v:
            assert not any(r < r1 and r + S > r0 and c < c1 and c + S > c0 for _, r0, c0, r1, c1, _ in held)
    capped = build_chips(tif, contract, S, "detect", labels=gpkg, class_field="class", max_chips=10, val_fraction=0.2)
    assert capped.split.sum() == 2 and any("kept at random" in m for m in capped.log)


def test_chip_boxes_clip_and_drop():
    bounds = [(10, 10, 20, 20), (28, 5, 40, 15), (30, 5, 40, 15), (0, 0, 1.5, 10), (-2, 4, 8, 12)]
    bx, lb = chip_boxes(bounds, [0, 1, 0, 0, 1], 0, 0, 32, 32)
    # kept: inside; 4/12 inside (dropped); 2/10 inside (dropped); 1.5 px wide (dropped); 8/10 inside
    assert bx.tolist() == [[10, 10, 20, 20], [0, 4, 8, 12]]
    assert lb.tolist() == [1, 2]
    bx, _ = chip_boxes([(100, 100, 110, 110)], [0], 96, 96, 32, 32)
    assert bx.tolist() == [[4, 4, 14, 14]]


def test_repairs_skips_and_counts(tmp_path, scene, contract):
    from shapely.geometry import Polygon

    tif, truth, _ = scene
    feats = class_polygons(truth, {0: "water", 1: "land"})
    x0, y0 = 500000.0 + 20 * 50, 4500000.0 - 20 * 50
    bowtie = Polygon([(x0, y0), (x0 + 400, y0 - 400), (x0 + 400, y0), (x0, y0 - 400)])
    feats += [(bowtie, "land"), (feats[0][0], ""), (feats[0][0], None)]
    gpkg = write_labels(tmp_path / "r.gpkg", feats)
    chips = build_chips(tif, contract, S, "segment", labels=gpkg, class_field="class")
    assert any("repaired 1 invalid polygon" in m for m in chips.log)
    assert any("skipped 2 feature(s) with an empty class value" in m for m in chips.warnings)
    only = build_chips(tif, contract, S, "segment", labels=gpkg, class_field="class", classes=["water"],
                       background="land")
    assert any("'land' (" in m and "skipped" in m for m in only.warnings)


# ------------------------------------------------------------------------------------ bad input
def test_labels_outside_the_raster(tmp_path, scene, contract):
    from shapely.affinity import translate

    tif, truth, _ = scene
    far = [(translate(g, 300000, 0), n) for g, n in class_polygons(truth, {0: "water", 1: "land"})]
    gpkg = write_labels(tmp_path / "far.gpkg", far)
    with pytest.raises(FinetuneError, match="outside the raster") as e:
        build_chips(tif, contract, S, "segment", labels=gpkg, class_field="class")
    assert "EPSG:32631" in str(e.value) and "wl.tif spans" in str(e.value) and "800000" in str(e.value)


def test_empty_layer(tmp_path, scene, contract):
    gpkg = write_labels(tmp_path / "empty.gpkg", [])
    with pytest.raises(FinetuneError, match="empty.gpkg: the label layer is empty; draw and label"):
        build_chips(scene[0], contract, S, "segment", labels=gpkg, class_field="class")


def test_missing_or_unreadable_label_file(tmp_path, scene, contract):
    with pytest.raises(FinetuneError, match="label file not found: .*nowhere.gpkg"):
        build_chips(scene[0], contract, S, "classify", labels=str(tmp_path / "nowhere.gpkg"), class_field="class")
    (tmp_path / "notes.gpkg").write_text("not a vector file")
    with pytest.raises(FinetuneError, match="notes.gpkg is not a vector file fiona can read"):
        build_chips(scene[0], contract, S, "classify", labels=str(tmp_path / "notes.gpkg"), class_field="class")


def test_missing_class_field_lists_fields(scene, contract):
    with pytest.raises(FinetuneError, match=r"no field 'kind'.*class"):
        build_chips(scene[0], contract, S, "segment", labels=scene[2], class_field="kind")


def test_no_usable_class_value(tmp_path, scene, contract):
    feats = [(g, "") for g, _ in class_polygons(scene[1], {0: "water", 1: "land"})]
    gpkg = write_labels(tmp_path / "blank.gpkg", feats)
    with pytest.raises(FinetuneError, match=r"no usable labelled polygon.*2 with empty class values"):
        build_chips(scene[0], contract, S, "segment", labels=gpkg, class_field="class")
    with pytest.raises(FinetuneError, match="none of classes"):
        build_chips(scene[0], contract, S, "segment", labels=scene[2], class_field="class", classes=["rock"])


def test_one_class_segmentation_refused_unless_background(tmp_path, scene, contract):
    gpkg = write_labels(tmp_path / "w.gpkg", class_polygons(scene[1], {0: "water"}))
    with pytest.raises(FinetuneError, match=r"only one class \(water\).*background"):
        build_chips(scene[0], contract, S, "segment", labels=gpkg, class_field="class")
    chips = build_chips(scene[0], contract, S, "segment", labels=gpkg, class_field="class", background="land")
    assert chips.classes == ["land", "water"]


@pytest.mark.parametrize("task", ["segment", "classify", "detect"])
def test_fewer_chips_than_the_batch(scene, contract, task):
    with pytest.raises(FinetuneError, match=r"only \d+ training and \d+ validation chip\(s\) of 32 px from wl.gpkg "
                                            r"over wl.tif, for a batch size of 5000: lower the batch size"):
        build_chips(scene[0], contract, S, task, labels=scene[2], class_field="class", batch_size=5000)


def test_input_contract_mismatch(tmp_path, scene, contract):
    one, _ = water_land(tmp_path / "vv.tif", bands=1, descriptions=("VV",))
    with pytest.raises(FinetuneError, match=r"vv.tif.*2 channel"):
        build_chips(one, contract, S, "segment", labels=scene[2], class_field="class")
    hh, _ = water_land(tmp_path / "hh.tif", descriptions=("HH", "HV"))
    with pytest.raises(FinetuneError, match="channel 1 is HH"):
        build_chips(hh, contract, S, "segment", labels=scene[2], class_field="class")
    swapped, _ = water_land(tmp_path / "vhvv.tif", descriptions=("VH", "VV"))  # picked by name: accepted
    chips = build_chips(swapped, contract, S, "segment", labels=scene[2], class_field="class")
    assert any("picked by name" in m and "--bands VV,VH" in m for m in chips.log)


def test_few_instances_warned(tmp_path, contract):
    tif, boxes = ship_scene(tmp_path / "ships.tif")
    feats = boxes_to_polygons(boxes) + boxes_to_polygons(boxes[:3], "buoy")
    gpkg = write_labels(tmp_path / "s.gpkg", feats)
    chips = build_chips(tif, contract, S, "detect", labels=gpkg, class_field="class")
    assert any("'buoy' has only 3 labelled polygon" in m for m in chips.warnings)


def test_classify_warns_about_few_chips_not_few_polygons(tmp_path, scene, contract):
    """One large polygon per class gives dozens of chips each: nothing to warn about; a small class
    with a single chip is still warned about, in chips (what classification learns from)."""
    tif, truth, gpkg = scene
    chips = build_chips(tif, contract, S, "classify", labels=gpkg, class_field="class")
    assert np.bincount(chips.labels[~chips.split]).min() >= 5 and chips.warnings == []
    feats = class_polygons(truth, {0: "water", 1: "land"}) + boxes_to_polygons([(150, 10, 170, 30)], "rock")
    rock = build_chips(tif, contract, S, "classify", labels=write_labels(tmp_path / "r.gpkg", feats), class_field="class")
    assert "class 'rock' appears in only 1 training chip(s): label more of it" in rock.warnings
    assert not [m for m in rock.warnings if "labelled polygon" in m]


def test_labels_in_pixel_space(tmp_path, contract):
    import rasterio

    tif, truth = water_land(tmp_path / "px.tif")
    with rasterio.open(tif) as src:
        db = src.read()
    nogeo = write_db(tmp_path / "nogeo.tif", db, crs=None)
    from affine import Affine

    gpkg = write_labels(tmp_path / "px.gpkg", class_polygons(truth, {0: "water", 1: "land"}, Affine.identity()), crs=None)
    chips = build_chips(nogeo, contract, S, "segment", labels=gpkg, class_field="class")
    assert any("pixel coordinates" in m for m in chips.log)
    assert agreement(chips, truth) > 0.99
    qgis = write_labels(tmp_path / "qgis.gpkg", class_polygons(truth, {0: "water", 1: "land"},
                                                               Affine(1, 0, 0, 0, -1, 0)), crs=None)
    flipped = build_chips(nogeo, contract, S, "segment", labels=qgis, class_field="class")
    assert any("y = -row" in m for m in flipped.log) and agreement(flipped, truth) > 0.99


def test_8bit_rasters_with_a_db_encoder_get_an_8bit_contract(tmp_path, scene, contract):
    """8-bit display rasters (PNG/JPEG-style chips, no calibrated unit) fine-tune from a dB encoder:
    the chips are read 0..255 -> [0, 1] -> the encoder's mean/std and the contract says so; evaluation
    keeps the package's contract (a mismatch there is refused), and calibrated rasters keep the
    encoder's."""
    import rasterio

    tif, truth = water_land(tmp_path / "wl.tif")
    with rasterio.open(tif) as src:
        db, profile = src.read(), src.profile
    u8 = np.clip((db + 35.0) / 45.0 * 255.0, 0, 255).astype(np.uint8)
    profile.update(dtype="uint8", nodata=None)
    with rasterio.open(tmp_path / "u8.tif", "w", **profile) as dst:
        dst.write(u8)
        dst.descriptions = ("VV", "VH")
    gpkg = write_labels(tmp_path / "wl.gpkg", class_polygons(truth, {0: "water", 1: "land"}))
    chips = build_chips(str(tmp_path / "u8.tif"), contract, S, "segment", labels=gpkg, class_field="class")
    assert chips.contract["units"] == "uint8" and chips.contract["clip"] == [0.0, 255.0]
    assert chips.contract["mean"] == contract["mean"] and chips.contract["bands"] == contract["bands"]
    assert any("8-bit display values and the encoder expects dB" in m for m in chips.log)
    x = chips.x.float().numpy()
    want = (u8.astype(np.float32) / 255.0 - 0.5) / 0.5  # what the 8-bit contract makes of the pixels
    assert x.min() >= want.min() - 1e-2 and x.max() <= want.max() + 1e-2
    assert agreement(chips, truth) > 0.99
    calibrated = build_chips(str(tif), contract, S, "segment", labels=gpkg, class_field="class")
    assert calibrated.contract == contract
    with pytest.raises(FinetuneError, match="u8.tif.*8-bit display"):  # evaluation: the package's contract
        build_chips(str(tmp_path / "u8.tif"), contract, S, "segment", labels=gpkg, class_field="class",
                    evaluation=True)
    with pytest.raises(FinetuneError, match="wl.tif.*8-bit"):  # a second raster must meet the first's contract
        build_chips([str(tmp_path / "u8.tif"), str(tif)], contract, S, "segment", labels=gpkg, class_field="class")


def test_block_locator_matches_the_blocks():
    """Every pixel (and points off the raster, clamped) maps to the block that holds it, on rasters
    whose last block row / column is wider (a remainder narrower than a chip joins it)."""
    from types import SimpleNamespace

    from training.finetune.sampling import _block_locator

    rasters = [SimpleNamespace(height=100, width=70), SimpleNamespace(height=40, width=130)]
    blocks = [(i, *b) for i, r in enumerate(rasters) for b in plan_blocks(r.height, r.width, 8, 3)]
    locate = _block_locator(blocks, rasters)
    for i, r in enumerate(rasters):
        for row in range(-3, r.height + 3, 2):
            for col in range(-3, r.width + 3, 2):
                j, r0, c0, r1, c1 = blocks[locate(i, row + 0.5, col + 0.5)]
                rr, cc = min(max(row + 0.5, 0), r.height - 1), min(max(col + 0.5, 0), r.width - 1)
                assert j == i and r0 <= rr < r1 and c0 <= cc < c1
