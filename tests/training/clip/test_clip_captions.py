"""``sarmae captions``: caption tables from class folders, masks, instance masks and polygons."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
from clipdata import class_chips, instance_scene, mask_tiles, polygon_raster

from training.clip.caption_sources import load_spec, make_captions
from training.clip.captions import CaptionError, CaptionRow, assign_split, read_table


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_class_folders_table_is_seeded_split_per_class_and_names_sensor_and_pol(tmp_path):
    chips = class_chips(tmp_path / "chips", n=10)
    src = [{"kind": "chips", "name": "mstar", "path": str(chips), "sensor": "X-band", "pol": "HH",
            "phrase": "a {cls} vehicle"}]
    r = make_captions(src, tmp_path / "a.csv", seed=3, val_fraction=0.3)
    make_captions(src, tmp_path / "b.csv", seed=3, val_fraction=0.3)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()  # seeded
    rows = rows_of(tmp_path / "a.csv")
    assert r["rows"] == len(rows) == 30
    assert list(rows[0]) == ["image", "caption", "class", "source", "split"]
    assert {x["class"] for x in rows} == {"bright", "stripes", "dark"}  # the '<k>-' index dropped
    for x in rows:
        assert f"a {x['class']} vehicle" in x["caption"].lower()
        assert (tmp_path / x["image"]).is_file()  # relative to the table's folder
    assert any("X-band" in x["caption"] for x in rows) and any("HH" in x["caption"] for x in rows)
    for c in ("bright", "stripes", "dark"):  # 3 of 10 held out per class
        assert sum(x["split"] == "val" for x in rows if x["class"] == c) == 3
    make_captions(src, tmp_path / "c.csv", seed=4, val_fraction=0.3)
    assert [x["split"] for x in rows_of(tmp_path / "c.csv")] != [x["split"] for x in rows]


def test_split_keeps_groups_together_and_one_group_in_training():
    rows = [CaptionRow(f"i{i}", "c", "water", "s", group=f"block{i // 4}") for i in range(16)]
    assign_split(rows, 0.5, seed=0)
    by_group = {}
    for r in rows:
        by_group.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in by_group.values())  # a group is never cut
    assert sum(r.split == "val" for r in rows) == 8
    lone = [CaptionRow("x", "c", "ship", "s", group="g")] * 3
    assign_split(lone, 0.5, seed=0)
    assert all(r.split == "train" for r in lone)  # one group: nothing to hold out


def test_mask_shares_name_the_dominant_class_and_a_second_one(tmp_path):
    root = mask_tiles(tmp_path / "tiles", shares=(0.0, 0.25, 0.75))
    src = [{"kind": "masks", "name": "floods", "path": str(root / "images"), "sensor": "Sentinel-1", "pol": "VV",
            "masks": {"flood": [["/images/", "/masks/"], ["img_", "mask_"]]},
            "phrases": {"flood": "flooded land", "land": "dry land"}}]
    make_captions(src, tmp_path / "t.csv", val_fraction=0.0)
    rows = {x["image"].split("/")[-1]: x for x in rows_of(tmp_path / "t.csv")}
    assert rows["img_0.png"]["class"] == "land" and "with some" not in rows["img_0.png"]["caption"]
    assert rows["img_1.png"]["class"] == "land" and "dry land with some flooded land" in rows["img_1.png"]["caption"]
    assert rows["img_2.png"]["class"] == "flood" and "flooded land with some dry land" in rows["img_2.png"]["caption"]
    bad = [{**src[0], "masks": {"flood": [["/nowhere/", "/x/"]]}}]
    with pytest.raises(CaptionError, match="do not change"):
        make_captions(bad, tmp_path / "u.csv")


def test_instance_windows_count_ships_and_are_written_as_chips(tmp_path):
    import rasterio

    scene = instance_scene(tmp_path / "hrsid")
    src = [{"kind": "instances", "name": "hrsid", "path": str(scene.parent), "glob": "scene.png",
            "mask": [[".png", "_instance_id_RGB.png"]], "window": 32, "min_pixels": 4}]
    make_captions(src, tmp_path / "t.csv", val_fraction=0.0)
    rows = {x["image"].split("/")[-1]: x for x in rows_of(tmp_path / "t.csv")}
    assert set(rows) == {"scene_r0_c0.tif", "scene_r0_c32.tif", "scene_r32_c0.tif", "scene_r32_c32.tif"}
    assert rows["scene_r0_c0.tif"]["class"] == "ship" and "two ships at sea" in rows["scene_r0_c0.tif"]["caption"].lower()
    assert rows["scene_r32_c32.tif"]["class"] == "ship" and "a ship at sea" in rows["scene_r32_c32.tif"]["caption"]
    assert rows["scene_r0_c32.tif"]["class"] == "sea" and "open sea" in rows["scene_r0_c32.tif"]["caption"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(tmp_path / rows["scene_r0_c0.tif"]["image"]) as ds:
            assert (ds.count, ds.width) == (1, 32)  # gray stored as RGB kept as one band
            assert ds.read(1)[4, 4] == 250


def test_polygon_windows_keep_the_georeferencing_and_the_class(tmp_path):
    import rasterio

    tif, gpkg = polygon_raster(tmp_path / "scene")
    spec = tmp_path / "spec.yaml"
    spec.write_text("- kind: polygons\n  name: poly\n  path: scene/scene.tif\n  vector: scene/labels.gpkg\n"
                    "  class_field: kind\n  window: 16\n")
    r = make_captions(load_spec(spec), tmp_path / "t.csv", val_fraction=0.0)
    rows = rows_of(tmp_path / "t.csv")
    assert r["sources"]["poly"]["classes"] == {"field": 16, "lake": 16}  # centres every 8 px inside each 30 px square
    with rasterio.open(tif) as src:
        full = src.read(1)
        for x in rows:
            with rasterio.open(tmp_path / x["image"]) as ds:
                assert ds.crs == src.crs and ds.width == 16
                row, col = src.index(ds.transform.c + 1, ds.transform.f - 1)  # its top-left pixel in the scene
                assert np.array_equal(ds.read(1), full[row:row + 16, col:col + 16])
                inside = ds.read(1).mean() < -18
                assert inside == (x["class"] == "lake")


def test_missing_images_and_empty_captions_are_counted_skipped_or_refused(tmp_path):
    chips = class_chips(tmp_path / "chips", n=4)
    make_captions([{"kind": "chips", "path": str(chips)}], tmp_path / "t.csv", val_fraction=0.0)
    rows = rows_of(tmp_path / "t.csv")
    rows[0]["image"] = "gone.png"
    rows[1]["caption"] = "  "
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    t = read_table(tmp_path / "bad.csv")
    assert len(t) == 10 and t.skipped == {"missing_image": 1, "empty_caption": 1}
    with pytest.raises(CaptionError, match=r"bad\.csv: 1 row\(s\) with a missing image and 1 with an empty caption"):
        read_table(tmp_path / "bad.csv", strict=True)
    (tmp_path / "none.csv").write_text("image,caption\ngone.png,a caption\nx.png,\n")
    with pytest.raises(CaptionError, match=r"none\.csv: no usable row"):
        read_table(tmp_path / "none.csv")
    (tmp_path / "nocol.csv").write_text("file_name,text_x\na,b\n")
    with pytest.raises(CaptionError, match="no image column"):
        read_table(tmp_path / "nocol.csv")
    with pytest.raises(CaptionError, match="exists"):
        make_captions([{"kind": "chips", "path": str(chips)}], tmp_path / "t.csv")


def test_chips_crop_writes_the_centre_at_full_resolution(tmp_path):
    import rasterio

    chips = class_chips(tmp_path / "chips", classes=("bright", "dark"), n=2, size=32)
    make_captions([{"kind": "chips", "path": str(chips), "crop": 16}], tmp_path / "t.csv", val_fraction=0.0)
    rows = rows_of(tmp_path / "t.csv")
    assert len(rows) == 4 and all(x["image"].endswith("_centre16.tif") for x in rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in rows:
            src = chips / f"{'0-bright' if x['class'] == 'bright' else '1-dark'}" / x["image"].split("/")[-1].replace(
                "_centre16.tif", ".png")
            with rasterio.open(tmp_path / x["image"]) as ds, rasterio.open(src) as full:
                assert (ds.width, ds.height) == (16, 16)
                assert np.array_equal(ds.read(1), full.read(1)[8:24, 8:24])


def test_mask_windows_are_captioned_from_their_own_label_fractions_and_capped_per_image(tmp_path):
    # the left 75 % of img_2's columns are water: in 8 px windows, columns 0-23 are water, 24-31 land
    root = mask_tiles(tmp_path / "tiles", shares=(0.75,))
    src = {"kind": "masks", "name": "lakes", "path": str(root / "images"), "window": 8,
           "masks": {"water": [["/images/", "/masks/"], ["img_", "mask_"]]},
           "phrases": {"water": "open water", "land": "dry land"}}
    make_captions([src], tmp_path / "t.csv", val_fraction=0.0)
    rows = rows_of(tmp_path / "t.csv")
    assert len(rows) == 16
    for r in rows:
        col = int(r["image"].split("_c")[-1].split(".")[0])
        want = ("water", "open water") if col < 24 else ("land", "dry land")
        assert r["class"] == want[0] and want[1] in r["caption"].lower() and "with some" not in r["caption"], r
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import rasterio

        with rasterio.open(tmp_path / rows[0]["image"]) as ds:
            assert (ds.height, ds.width) == (8, 8)
    # windows_per_image: the same N windows on every run, whatever else is in the spec
    capped = {**src, "windows_per_image": 5}
    make_captions([capped], tmp_path / "c1.csv", val_fraction=0.0)
    make_captions([capped, {**src, "name": "other"}], tmp_path / "c2.csv", val_fraction=0.0)
    one = [r["image"].split("/")[-1] for r in rows_of(tmp_path / "c1.csv")]
    two = [r["image"].split("/")[-1] for r in rows_of(tmp_path / "c2.csv") if r["source"] == "lakes"]
    assert len(one) == 5 and one == two


def test_a_list_of_phrases_gives_each_row_one_seeded_wording(tmp_path):
    root = mask_tiles(tmp_path / "tiles", shares=(1.0,))
    words = ["open water", "a lake", "water surface"]
    src = {"kind": "masks", "name": "lakes", "path": str(root / "images"), "window": 8,
           "masks": {"water": [["/images/", "/masks/"], ["img_", "mask_"]]}, "phrases": {"water": words}}
    make_captions([src], tmp_path / "a.csv", val_fraction=0.0, seed=3)
    make_captions([src], tmp_path / "b.csv", val_fraction=0.0, seed=3)
    caps = [r["caption"].lower() for r in rows_of(tmp_path / "a.csv")]
    assert caps == [r["caption"].lower() for r in rows_of(tmp_path / "b.csv")]  # seeded
    used = {w for w in words for c in caps if w in c}
    assert len(caps) == 16 and all(any(w in c for w in words) for c in caps) and len(used) >= 2
