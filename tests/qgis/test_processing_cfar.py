"""``processing.run("sarmae:cfar")``: the CFAR detector with no model, end to end through the real
engine (the package made by ``sarmae init --method cfar`` and cached by its settings), and the
plugin reading a CFAR package like any detection package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from qgis import processing
from qgis.core import QgsProcessingException, QgsVectorLayer

from sarmae_qgis.model_cards import check_channels, describe_html, fit_rank, read_card
from sarmae_qgis.processing.cfar import cache_folder

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("provider")]

TARGETS = [(40, 50), (100, 150), (160, 60)]  # (row, col) of 3x3 bright targets


def sea_scene(path: Path, size: int = 200) -> None:
    """Single-look sea clutter in dB (exponential intensity, mean -20 dB) with three bright targets."""
    from osgeo import gdal, osr

    rng = np.random.default_rng(3)
    power = rng.exponential(10 ** (-20 / 10), (size, size))
    for r, c in TARGETS:
        power[r - 1:r + 2, c - 1:c + 2] = 10 ** (5 / 10)  # +25 dB above the sea
    ds = gdal.GetDriverByName("GTiff").Create(str(path), size, size, 1, gdal.GDT_Float32)
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 4600000.0, 0.0, -10.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32631)
    ds.SetProjection(srs.ExportToWkt())
    ds.GetRasterBand(1).WriteArray((10 * np.log10(power)).astype(np.float32))
    ds.GetRasterBand(1).SetDescription("VV")
    ds.SetMetadataItem("UNITS", "dB")
    ds = None


def test_cfar_finds_the_targets_without_a_model(tmp_path):
    scene = tmp_path / "sea.tif"
    sea_scene(scene)
    params = {"INPUT": str(scene), "PFA": 1e-6, "GUARD": 9, "BACKGROUND": 41, "MIN_AREA": 2,
              "OUTPUT": str(tmp_path / "ships.gpkg")}
    out = processing.run("sarmae:cfar", params)
    layer = QgsVectorLayer(out["OUTPUT"], "ships", "ogr")
    assert layer.isValid() and {"class_name", "score"} <= set(layer.fields().names())
    boxes = [f.geometry().boundingBox() for f in layer.getFeatures()]
    assert {f["class_name"] for f in layer.getFeatures()} == {"ship"}
    for r, c in TARGETS:  # every target inside a box (map coordinates of the pixel centre)
        x, y = 500000.0 + 10 * (c + 0.5), 4600000.0 - 10 * (r + 0.5)
        assert any(b.xMinimum() <= x <= b.xMaximum() and b.yMinimum() <= y <= b.yMaximum() for b in boxes), (r, c)
    assert len(boxes) <= len(TARGETS) + 2  # pfa 1e-6 on 40,000 sea pixels: hardly any false alarm
    assert json.loads(out["STATISTICS"])["detections"] == len(boxes)
    packages = list(cache_folder().glob("cfar-*"))
    out2 = processing.run("sarmae:cfar", {**params, "OUTPUT": str(tmp_path / "again.gpkg")})
    assert QgsVectorLayer(out2["OUTPUT"], "a", "ogr").featureCount() == len(boxes)
    assert sorted(cache_folder().glob("cfar-*")) == sorted(packages)  # the same settings reuse the package
    card = read_card(packages[0])  # the plugin reads the CFAR package like any detection package
    assert card.task == "detect" and card.method == "cfar" and card.class_names == ["ship"]
    check_channels(card, ["VV", "VH"], None, "scene")  # band 1 by default: any layer fits
    assert fit_rank(card, ["HH"])[0] == 0 and "CFAR" in describe_html(card)


def test_cfar_refuses_bad_windows_and_bands(tmp_path):
    scene = tmp_path / "sea.tif"
    sea_scene(scene, 64)
    with pytest.raises(QgsProcessingException, match="must be larger than the guard"):
        processing.run("sarmae:cfar", {"INPUT": str(scene), "GUARD": 41, "BACKGROUND": 21,
                                       "OUTPUT": str(tmp_path / "a.gpkg")})
    with pytest.raises(QgsProcessingException, match="band 3 is not in layer"):
        processing.run("sarmae:cfar", {"INPUT": str(scene), "BAND": 3, "OUTPUT": str(tmp_path / "b.gpkg")})
    assert not (tmp_path / "a.gpkg").exists() and not (tmp_path / "b.gpkg").exists()
