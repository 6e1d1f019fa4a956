"""polygonize_classes: strip-wise vectorising equals whole-raster vectorising; seams, holes, filters."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.control import GroundControlPoint
from rasterio.features import shapes
from shapely.geometry import shape

from engine.errors import OutputError, RasterInputError
from engine.vectorize import ellipsoidal_area, polygonize_classes

NAMES = ["water", "field", "forest", "urban"]
UTM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)  # EPSG:32631, 10 m pixels


def write_classes(path: Path, data: np.ndarray, crs: str | None = "EPSG:32631",
                  transform: Affine | None = UTM, gcps: list | None = None) -> Path:
    """A uint8 class GeoTIFF (nodata 255) with a CRS + transform, GCPs, or no georeferencing."""
    profile = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1, dtype="uint8",
                   nodata=255, tiled=True, blockxsize=16, blockysize=16)
    if gcps:
        profile.update(gcps=gcps, crs=crs)
    elif crs is not None:
        profile.update(crs=crs, transform=transform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data.astype(np.uint8), 1)
    return path


def blobs(h: int, w: int, k: int = 4, seed: int = 0, nodata_frac: float = 0.1) -> np.ndarray:
    """Irregular class regions: a smoothed noise field cut at quantiles, with a smoothed nodata area."""
    rng = np.random.default_rng(seed)

    def smooth(f: np.ndarray, n: int = 4) -> np.ndarray:
        for _ in range(n):
            f = (f + np.roll(f, 1, 0) + np.roll(f, -1, 0) + np.roll(f, 1, 1) + np.roll(f, -1, 1)) / 5
        return f

    f = smooth(rng.normal(size=(h, w)))
    data = np.digitize(f, np.quantile(f, np.linspace(0, 1, k + 1)[1:-1])).astype(np.uint8)
    g = smooth(rng.normal(size=(h, w)))
    data[g > np.quantile(g, 1 - nodata_frac)] = 255
    return data


def reference(data: np.ndarray, transform: Affine = UTM, skip: tuple[int, ...] = ()) -> list[tuple[int, object]]:
    """Whole-raster polygons, straight from rasterio.features.shapes."""
    mask = (data != 255) & ~np.isin(data, skip)
    return [(int(v), shape(g)) for g, v in shapes(data, mask=mask, connectivity=4, transform=transform)]


def read_gpkg(path: Path) -> list[tuple[int, object, dict]]:
    with fiona.open(path) as src:
        return [(f.properties["class_id"], shape(f.geometry), dict(f.properties)) for f in src]


def assert_same_polygons(got: list[tuple[int, object, dict]], ref: list[tuple[int, object]]) -> None:
    """Same count, and each polygon equals one reference polygon of its class (same vertex count too)."""
    assert len(got) == len(ref)
    def key(c: int, g: object) -> tuple:
        return (c, round(g.area, 3), tuple(round(b, 3) for b in g.bounds))
    pool: dict[tuple, list] = {}
    for c, g in ref:
        pool.setdefault(key(c, g), []).append(g)
    for c, g, _ in got:
        candidates = pool.get(key(c, g), [])
        hit = next((i for i, r in enumerate(candidates) if g.equals(r)
                    and shapely.get_num_coordinates(g) == shapely.get_num_coordinates(r)), None)
        assert hit is not None, f"class {c} polygon {g.wkt[:120]} has no twin in the whole-raster result"
        candidates.pop(hit)
    for cls in {c for c, _ in ref}:
        a = shapely.union_all([g for c, g, _ in got if c == cls])
        b = shapely.union_all([g for c, g in ref if c == cls])
        assert a.symmetric_difference(b).area == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------- strips == whole raster
@pytest.mark.parametrize("strip_rows", [1, 3, 7, 16, 200])
def test_strips_equal_whole_raster(tmp_path: Path, strip_rows: int) -> None:
    data = blobs(97, 83, seed=strip_rows)
    tif = write_classes(tmp_path / "c.tif", data)
    res = polygonize_classes(tif, tmp_path / "p.gpkg", NAMES, strip_rows=strip_rows)
    got, ref = read_gpkg(tmp_path / "p.gpkg"), reference(data)
    assert_same_polygons(got, ref)
    whole = polygonize_classes(tif, tmp_path / "w.gpkg", NAMES, strip_rows=97)
    assert res["features"] == whole["features"] == len(ref)
    for name in NAMES:
        assert res["per_class"][name]["count"] == whole["per_class"][name]["count"]
        assert res["per_class"][name]["area_m2"] == pytest.approx(whole["per_class"][name]["area_m2"])
    valid = int((data != 255).sum())
    assert sum(v["area_m2"] for v in res["per_class"].values()) == pytest.approx(valid * 100.0)
    for c, g, props in got:
        assert props["class_name"] == NAMES[c] and props["area_px"] == pytest.approx(g.area / 100)
        assert props["area_m2"] == pytest.approx(g.area) and g.is_valid


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 30), w=st.integers(1, 30), strip_rows=st.integers(1, 9),
       rects=st.lists(st.tuples(st.integers(0, 29), st.integers(0, 29), st.integers(1, 15),
                                st.integers(1, 15), st.sampled_from([0, 1, 2, 255])), max_size=12))
def test_random_rectangles_match_whole_raster(tmp_path_factory: pytest.TempPathFactory, h: int, w: int,
                                              strip_rows: int, rects: list) -> None:
    data = np.full((h, w), 3, np.uint8)
    for r, c, dh, dw, v in rects:
        data[r:r + dh, c:c + dw] = v
    tmp = tmp_path_factory.mktemp("rects")
    tif = write_classes(tmp / "r.tif", data)
    polygonize_classes(tif, tmp / "r.gpkg", NAMES, strip_rows=strip_rows)
    assert_same_polygons(read_gpkg(tmp / "r.gpkg"), reference(data))


# ----------------------------------------------------------------- seams, holes, nodata
@pytest.mark.parametrize("flip", [False, True])
def test_u_shape_crossing_seams_is_one_polygon(tmp_path: Path, flip: bool) -> None:
    data = np.full((24, 20), 255, np.uint8)
    data[2:19, 2:5] = 1    # left arm, crosses the seams at rows 5, 10, 15
    data[2:19, 12:15] = 1  # right arm
    data[16:19, 2:15] = 1  # bottom bar joins the arms in the last strip
    if flip:               # an upside-down U: one piece on top, split into two arms below
        data = data[::-1].copy()
    tif = write_classes(tmp_path / "u.tif", data)
    res = polygonize_classes(tif, tmp_path / "u.gpkg", NAMES, strip_rows=5)
    (c, g, props), = read_gpkg(tmp_path / "u.gpkg")
    assert res["features"] == 1 and c == 1 and g.geom_type == "Polygon"
    assert props["area_px"] == (data == 1).sum() == 3 * 17 * 2 + 3 * 7
    assert len(g.exterior.coords) == 9  # 8 corners: collinear seam vertices removed


def test_hole_across_seams_is_kept_with_island(tmp_path: Path) -> None:
    data = np.full((20, 20), 255, np.uint8)
    data[2:18, 2:18] = 1
    data[5:15, 5:15] = 255  # the hole spans strips 1-3
    data[8:11, 8:11] = 2    # an island inside the hole
    tif = write_classes(tmp_path / "h.tif", data)
    res = polygonize_classes(tif, tmp_path / "h.gpkg", NAMES, strip_rows=4)
    got = {c: (g, p) for c, g, p in read_gpkg(tmp_path / "h.gpkg")}
    assert res["features"] == 2
    ring, props = got[1]
    assert len(ring.interiors) == 1 and props["area_px"] == 16 * 16 - 10 * 10
    assert shapely.Polygon(ring.interiors[0]).area == 10 * 10 * 100.0
    assert got[2][1]["area_px"] == 9
    assert_same_polygons(read_gpkg(tmp_path / "h.gpkg"), reference(data))


def test_nodata_and_skipped_classes_make_no_polygon(tmp_path: Path) -> None:
    data = np.full((30, 30), 255, np.uint8)
    data[:, :10] = 0
    data[3:9, 12:20] = 2
    tif = write_classes(tmp_path / "n.tif", data)
    res = polygonize_classes(tif, tmp_path / "n.gpkg", NAMES, strip_rows=4)
    assert res["features"] == 2 and {c for c, _, _ in read_gpkg(tmp_path / "n.gpkg")} == {0, 2}
    assert res["per_class"]["water"] == {"count": 1, "area_m2": 300 * 100.0}
    res = polygonize_classes(tif, tmp_path / "s.gpkg", NAMES, strip_rows=4, skip_classes=(0,))
    assert res["features"] == 1 and "water" not in res["per_class"]
    assert_same_polygons(read_gpkg(tmp_path / "s.gpkg"), reference(data, skip=(0,)))
    assert res["per_class"]["forest"]["area_m2"] == 48 * 100.0 and res["per_class"]["field"]["count"] == 0


def test_min_area_measures_regions_whole_across_seams(tmp_path: Path) -> None:
    data = np.full((12, 12), 255, np.uint8)
    data[0, 0] = 1          # 1 px
    data[0, 4:6] = 1        # 2 px
    data[3:5, 8:11] = 2     # 6 px, cut in half by the seam at row 4
    data[8:11, 1:4] = 3     # 9 px
    tif = write_classes(tmp_path / "m.tif", data)
    res = polygonize_classes(tif, tmp_path / "m.gpkg", NAMES, strip_rows=4, min_area_px=5)
    assert res["features"] == 2 and res["dropped_small"] == 2
    assert sorted(p["area_px"] for _, _, p in read_gpkg(tmp_path / "m.gpkg")) == [6, 9]
    res = polygonize_classes(tif, tmp_path / "m.gpkg", NAMES, strip_rows=4, min_area_px=7)
    assert res["features"] == 1 and res["dropped_small"] == 3


def test_all_nodata_writes_a_valid_empty_layer(tmp_path: Path) -> None:
    tif = write_classes(tmp_path / "e.tif", np.full((10, 9), 255, np.uint8))
    res = polygonize_classes(tif, tmp_path / "e.gpkg", NAMES, strip_rows=3)
    assert res["features"] == 0 and res["per_class"]["urban"] == {"count": 0, "area_m2": 0.0}
    assert fiona.listlayers(tmp_path / "e.gpkg") == ["e"]
    with fiona.open(tmp_path / "e.gpkg") as src:
        assert len(src) == 0 and list(src.schema["properties"]) == ["class_id", "class_name", "area_m2", "area_px"]
        assert src.crs.to_epsg() == 32631


def test_no_crs_gives_pixel_coordinates(tmp_path: Path) -> None:
    data = np.full((10, 10), 255, np.uint8)
    data[2:8, 3:5] = 7  # beyond the class names
    tif = write_classes(tmp_path / "p.tif", data, crs=None)
    res = polygonize_classes(tif, tmp_path / "p.gpkg", NAMES, strip_rows=3)
    assert res["georeferencing"].startswith("none") and res["area_units"].startswith("px")  # areas in pixels
    (c, g, props), = read_gpkg(tmp_path / "p.gpkg")
    assert g.bounds == (3, 2, 5, 8) and props["class_name"] == "class_7" and props["area_px"] == 12
    assert props["area_m2"] is None
    assert res["per_class"]["class_7"] == {"count": 1, "area_px": 12.0}
    with fiona.open(tmp_path / "p.gpkg") as src:
        assert not src.crs


# ----------------------------------------------------------------- areas in other CRSs
def test_geographic_area_is_ellipsoidal(tmp_path: Path) -> None:
    # two pixels covering the whole globe: the WGS84 ellipsoid's surface, 510,065,621.7 km2
    tif = write_classes(tmp_path / "g.tif", np.zeros((2, 1), np.uint8), crs="EPSG:4326",
                        transform=Affine(360.0, 0, -180.0, 0, -90.0, 90.0))
    res = polygonize_classes(tif, tmp_path / "g.gpkg", NAMES)
    assert res["per_class"]["water"]["area_m2"] == pytest.approx(5.100656217e14, rel=1e-9)
    # a 1 x 1 degree cell at the equator; on a sphere the formula is R^2 * dlon * dsin(lat)
    cell = shapely.box(0, 0, 1, 1)
    assert ellipsoidal_area(cell) == pytest.approx(1.2308e10, rel=1e-3)
    r = 6371000.0
    assert ellipsoidal_area(cell, a=r, f=0.0) == pytest.approx(r * r * math.radians(1) * math.sin(math.radians(1)))


def test_feet_crs_area_is_converted_to_square_metres(tmp_path: Path) -> None:
    tif = write_classes(tmp_path / "f.tif", np.zeros((4, 4), np.uint8), crs="EPSG:2227",
                        transform=Affine(10.0, 0, 6000000.0, 0, -10.0, 2000000.0))
    res = polygonize_classes(tif, tmp_path / "f.gpkg", NAMES)
    assert res["per_class"]["water"]["area_m2"] == pytest.approx(1600 * 0.3048006096**2)


def test_gcp_raster_uses_affine_approximation(tmp_path: Path) -> None:
    gcps = [GroundControlPoint(row=r, col=c, x=500000.0 + 10 * c, y=5000000.0 - 10 * r)
            for r, c in [(0, 0), (0, 20), (20, 0), (20, 20)]]
    data = blobs(20, 20, seed=3)
    tif = write_classes(tmp_path / "gcp.tif", data, crs="EPSG:32631", gcps=gcps)
    res = polygonize_classes(tif, tmp_path / "gcp.gpkg", NAMES, strip_rows=6)
    assert "from_gcps" in res["georeferencing"] and res["area_units"] == "m2"
    got = read_gpkg(tmp_path / "gcp.gpkg")
    assert sum(p["area_m2"] for _, _, p in got) == pytest.approx((data != 255).sum() * 100.0)
    with fiona.open(tmp_path / "gcp.gpkg") as src:
        assert src.crs.to_epsg() == 32631


# ----------------------------------------------------------------- output handling, progress
def test_output_errors_leave_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tif = write_classes(tmp_path / "c.tif", blobs(20, 20))
    with pytest.raises(OutputError, match="does not exist"):
        polygonize_classes(tif, tmp_path / "missing" / "p.gpkg", NAMES)
    with pytest.raises(OutputError, match="overwrite the input"):
        polygonize_classes(tif, tif, NAMES)
    (tmp_path / "p.gpkg").write_text("old")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fiona.Collection, "writerecords", boom)
    with pytest.raises(OutputError, match="disk full while writing"):
        polygonize_classes(tif, tmp_path / "p.gpkg", NAMES, strip_rows=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif", "p.gpkg"]
    assert (tmp_path / "p.gpkg").read_text() == "old"


def test_progress_and_replacing_an_existing_output(tmp_path: Path) -> None:
    tif = write_classes(tmp_path / "c.tif", blobs(50, 20))
    (tmp_path / "p.gpkg").write_text("old")
    seen: list[float] = []
    res = polygonize_classes(tif, tmp_path / "p.gpkg", NAMES, strip_rows=16, progress=seen.append)
    assert seen == [16 / 50, 32 / 50, 48 / 50, 1.0]
    assert res["features"] == len(read_gpkg(tmp_path / "p.gpkg")) > 0
    assert Counter(c for c, _, _ in read_gpkg(tmp_path / "p.gpkg")) == Counter(c for c, _ in reference(blobs(50, 20)))


def test_reads_strips_never_the_whole_raster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tif = write_classes(tmp_path / "c.tif", blobs(45, 30))
    heights: list[int] = []
    read = rasterio.io.DatasetReader.read

    def spy(self: rasterio.io.DatasetReader, *args: object, window: object = None, **kwargs: object) -> np.ndarray:
        heights.append(window.height)
        return read(self, *args, window=window, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    polygonize_classes(tif, tmp_path / "p.gpkg", NAMES, strip_rows=10)
    assert heights == [10, 10, 10, 10, 5]


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RasterInputError, match="cannot open"):
        polygonize_classes(tmp_path / "nope.tif", tmp_path / "p.gpkg", NAMES)
    with rasterio.open(tmp_path / "f.tif", "w", driver="GTiff", width=4, height=4, count=1,
                       dtype="float32", crs="EPSG:32631", transform=UTM) as dst:
        dst.write(np.zeros((1, 4, 4), np.float32))
    with pytest.raises(RasterInputError, match="integers"):
        polygonize_classes(tmp_path / "f.tif", tmp_path / "p.gpkg", NAMES)
    with pytest.raises(ValueError, match="strip_rows"):
        polygonize_classes(tmp_path / "f.tif", tmp_path / "p.gpkg", NAMES, strip_rows=0)
    assert not (tmp_path / "p.gpkg").exists()
