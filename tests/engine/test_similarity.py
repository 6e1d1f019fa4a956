"""Similarity search on embedding rasters: query point / polygon, grid, errors."""

import numpy as np
import pytest
import rasterio
from helpers.rasters import DEFAULT_TRANSFORM, write_raster
from shapely.geometry import Point, box

from engine.errors import RasterInputError
from engine.inference import InferenceOptions, run_inference
from engine.similarity import run_similarity


@pytest.fixture(scope="module")
def embedding(tmp_path_factory, tiny_package):
    """An embedding of a scene whose left half is dark water and right half bright land."""
    d = tmp_path_factory.mktemp("sim")
    rng = np.random.default_rng(0)
    db = np.where(np.arange(96)[None, :] < 48, -22.0, -6.0) + rng.normal(0, 1.0, (2, 96, 96))
    src = write_raster(d / "scene.tif", db.astype(np.float32), descriptions=["VV", "VH"])
    out = d / "emb.tif"
    run_inference([str(src)], out, tiny_package("embed", img_size=32), InferenceOptions(overwrite=True))
    return out


def test_point_query_itself_is_most_similar(embedding, tmp_path):
    x, y = DEFAULT_TRANSFORM * (8.0, 40.0)  # a pixel on the water side
    r = run_similarity(embedding, tmp_path / "sim.tif", (x, y))
    assert r["query_cells"] == 1
    with rasterio.open(embedding) as e, rasterio.open(tmp_path / "sim.tif") as s:
        assert (s.width, s.height, s.transform, s.crs) == (e.width, e.height, e.transform, e.crs)
        sim = s.read(1)
        row, col = s.index(x, y)
    assert sim[row, col] == pytest.approx(1.0, abs=1e-3)
    assert np.nanmax(sim) <= 1.0 + 1e-4 and np.nanmin(sim) >= -1.0 - 1e-4
    assert sim[:, : sim.shape[1] // 2].mean() > sim[:, sim.shape[1] // 2 + 1:].mean()  # water like water


def test_polygon_query_and_wkt(embedding, tmp_path):
    x0, y1 = DEFAULT_TRANSFORM * (0, 0)
    x1, y0 = DEFAULT_TRANSFORM * (40, 96)
    r = run_similarity(embedding, tmp_path / "a.tif", box(x0, y0, x1, y1))
    assert r["query_cells"] > 4
    r2 = run_similarity(embedding, tmp_path / "b.tif", box(x0, y0, x1, y1).wkt)
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        assert np.array_equal(a.read(), b.read(), equal_nan=True)
        assert a.tags()["SARMAE_TASK"] == "similarity"
    assert r2["query_cells"] == r["query_cells"]


def test_errors(embedding, tmp_path):
    with pytest.raises(RasterInputError, match="outside the embedding"):
        run_similarity(embedding, tmp_path / "x.tif", Point(0, 0))
    plain = write_raster(tmp_path / "plain.tif", np.zeros((1, 8, 8), np.float32))
    with pytest.raises(RasterInputError, match="not a sarmae embedding"):
        run_similarity(plain, tmp_path / "y.tif", (500010.0, 4499990.0))
    with pytest.raises(RasterInputError, match="not found"):
        run_similarity(tmp_path / "missing.tif", tmp_path / "z.tif", (0, 0))
    assert not list(tmp_path.glob(".*tmp*"))
