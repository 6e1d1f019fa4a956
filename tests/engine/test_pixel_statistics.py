"""Issue 15, items 6 and 7: statistics in map units only for a georeferenced raster; output names
that match what a task writes; a warning for detection on a raster without data.

A raster in radar geometry (an SLC: a CRS on an identity transform) used to report areas of
-5e13 m^2 (its pixel indexes read as degrees); it is in pixels, and said so.
"""

from __future__ import annotations

import json

import fiona
import numpy as np
import pytest
from affine import Affine
from helpers.rasters import speckle, write_raster

from engine.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def radar_geometry(path, data):
    """EPSG:4326 on an identity transform, as GDAL reads an SLC in radar geometry."""
    return write_raster(path, data, crs="EPSG:4326", transform=Affine.identity(), descriptions=["VV", "VH"][:len(data)])


def run(capsys, *args) -> tuple[int, dict | None, str]:
    rc = main(["infer", "--threads", "1", "--quiet", "--json", "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def no_georeferencing(path, data):
    """No CRS, no transform, no GCPs: GDAL reads the identity transform."""
    return write_raster(path, data, georef="none", descriptions=["VV", "VH"][:len(data)])


@pytest.mark.parametrize("make,georef", [(radar_geometry, "radar geometry"), (no_georeferencing, "pixel coordinates")])
def test_segment_areas_in_pixels_without_georeferencing(tiny_package, tmp_path, capsys, make, georef):
    src = make(tmp_path / "slc.tif", 10 * np.log10(speckle((2, 40, 48))))
    rc, res, err = run(capsys, "-m", tiny_package("segment"), "-i", src, "-o", tmp_path / "c.tif", "--vector")
    assert rc == 0, err
    stats = res["statistics"]
    assert stats["area_unit"] == "px"
    assert sum(s["area"] for s in stats["per_class"].values()) == stats["pixels"] == 40 * 48
    assert all(s["area"] == s["pixels"] >= 0 for s in stats["per_class"].values())
    vec = stats["vectors"]
    assert vec["area_units"].startswith("px") and georef in vec["georeferencing"]
    assert sum(v["area_px"] for v in vec["per_class"].values()) == 40 * 48
    with fiona.open(res["outputs"]["vectors"]) as f:
        props = [feat["properties"] for feat in f]
    assert props and all(p["area_m2"] is None and p["area_px"] > 0 for p in props)


def test_segment_areas_in_square_metres_when_georeferenced(tiny_package, tmp_path, capsys):
    src = write_raster(tmp_path / "utm.tif", 10 * np.log10(speckle((2, 40, 48))), descriptions=["VV", "VH"])
    rc, res, err = run(capsys, "-m", tiny_package("segment"), "-i", src, "-o", tmp_path / "c.tif")
    assert rc == 0, err
    assert res["statistics"]["area_unit"] == "m2"
    cell = abs(_transform(src).determinant)
    assert sum(s["area"] for s in res["statistics"]["per_class"].values()) == pytest.approx(40 * 48 * cell)


def _transform(path):
    import rasterio

    with rasterio.open(path) as ds:
        return ds.transform


def test_cfar_sizes_in_pixels_without_georeferencing(tmp_path, capsys):
    power = speckle((1, 96, 96), mean_power=0.01)
    power[0, 40:46, 50:54] = 5.0  # one bright target
    src = radar_geometry(tmp_path / "slc.tif", power.astype(np.float32))
    assert main(["init", "--task", "detect", "--method", "cfar", "--classes", "ship", "-o", str(tmp_path / "cfar")]) == 0
    capsys.readouterr()
    rc, res, err = run(capsys, "-m", tmp_path / "cfar", "-i", src, "-o", tmp_path / "ships.gpkg",
                       "--input-units", "linear_power")
    assert rc == 0, err
    with fiona.open(res["outputs"]["detections"]) as f:
        props = [feat["properties"] for feat in f]
        fields = list(f.schema["properties"])
    assert props and "area_px" in fields and "length_px" in fields and "area_m2" not in fields
    assert res["statistics"]["area_km2"] is None


@pytest.mark.parametrize("task, name, words", [
    ("segment", "out.gpkg", "a segment run writes a GeoTIFF: name the output out.tif; with --vector its polygons go "
                            "beside it as out.gpkg"),
    ("detect", "out.tif", "a detect run writes a GeoPackage of vectors: name the output out.gpkg"),
])
def test_an_output_named_for_another_format_is_refused(tiny_package, tmp_path, capsys, task, name, words):
    src = write_raster(tmp_path / "in.tif", 10 * np.log10(speckle((2, 40, 40))), descriptions=["VV", "VH"])
    classes = ("ship",) if task == "detect" else ("water", "land")
    rc, _, err = run(capsys, "-m", tiny_package(task, classes=classes), "-i", src, "-o", tmp_path / name)
    assert rc == 2 and words in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_detect_on_an_all_nodata_raster_warns(tiny_package, tmp_path, capsys):
    src = write_raster(tmp_path / "empty.tif", np.full((2, 40, 40), -9999, np.float32), nodata=-9999,
                       descriptions=["VV", "VH"])
    rc = main(["infer", "--threads", "1", "--device", "cpu", "--json", "-m", str(tiny_package("detect", classes=("ship",))),
               "-i", str(src), "-o", str(tmp_path / "d.gpkg"), "--input-units", "db"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert res["statistics"]["detections"] == 0
    assert any("every pixel of" in w and "is nodata" in w for w in res["statistics"]["warnings"])
    assert "warning: every pixel of" in err
