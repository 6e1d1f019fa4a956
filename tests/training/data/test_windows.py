"""RasterWindowDataset: random windows keyed by (seed, epoch, index), nodata skipping, padding."""

import numpy as np
import pytest
import torch
from helpers.rasters import speckle, write_raster

from training.data import DataConfig, DataError
from training.data.windows import RasterWindowDataset


@pytest.fixture
def scene(tmp_path):
    """A 96x80 linear-power raster whose left third is nodata."""
    x = speckle((96, 80), seed=1)
    x[:, :26] = -1.0
    return write_raster(tmp_path / "scene.tif", x, nodata=-1.0)


def test_windows_per_raster_and_values(scene):
    cfg = DataConfig(img_size=32, windows_per_raster=5, max_nodata=0.1)
    ds = RasterWindowDataset([scene], cfg)
    assert len(ds) == 5 and ds.rasters[0].units == "linear_power"
    for i in range(len(ds)):
        item = ds[(0, i)]
        assert item["sar"].shape == (1, 32, 32) and 0 <= item["sar"].min() and item["sar"].max() <= 1
        r0, c0 = map(int, item["source"].rsplit("@", 1)[1].split(","))
        assert c0 >= 26 - 3  # at most 10 % of a 32-px window (3 columns) in the nodata part
        assert (item["sar"][0] == 0).float().mean() <= 0.1


def test_deterministic_by_seed_epoch_index(scene):
    cfg = DataConfig(img_size=32, windows_per_raster=8, max_nodata=1.0)
    a, b = RasterWindowDataset([scene], cfg), RasterWindowDataset([scene], cfg)
    assert torch.equal(a[(2, 5)]["sar"], b[(2, 5)]["sar"])  # another worker or rank: the same window
    sources = {a[(e, i)]["source"] for e in range(2) for i in range(8)}
    assert len(sources) > 12  # different per index and per epoch
    other = RasterWindowDataset([scene], DataConfig(img_size=32, windows_per_raster=8, max_nodata=1.0, seed=1))
    assert [other[i]["source"] for i in range(8)] != [a[i]["source"] for i in range(8)]


def test_all_nodata_raster_is_named(tmp_path):
    x = speckle((40, 40))
    x[:, :] = np.nan
    x[0, 0] = 0.05  # one valid pixel so the units can be detected
    path = write_raster(tmp_path / "hole.tif", x)
    ds = RasterWindowDataset([path], DataConfig(img_size=32, windows_per_raster=1))
    with pytest.raises(DataError, match="hole.tif: 20 random 32x32 windows.*max_nodata=0.5"):
        ds[0]


def test_small_raster_is_padded_and_bands_mapped(tmp_path):
    vv, vh = speckle((20, 24), seed=2), speckle((20, 24), seed=3, mean_power=0.005)
    two = write_raster(tmp_path / "dual.tif", np.stack([vv, vh]), descriptions=["VV", "VH"])
    item = RasterWindowDataset([two], DataConfig(img_size=32, in_chans=2, windows_per_raster=1))[0]
    sar = item["sar"]
    assert sar.shape == (2, 32, 32) and (sar[:, 20:] == 0).all() and (sar[:, :, 24:] == 0).all()
    assert (sar[:, :20, :24] > 0).float().mean() > 0.9  # (a few speckle minima are below -35 dB)
    one = RasterWindowDataset([two], DataConfig(img_size=32, in_chans=1, windows_per_raster=1))[0]["sar"]
    assert torch.equal(one[0], sar[0])
    single = write_raster(tmp_path / "vv.tif", vv)
    rep = RasterWindowDataset([single], DataConfig(img_size=32, in_chans=3, windows_per_raster=1))[0]["sar"]
    assert rep.shape == (3, 32, 32) and torch.equal(rep[0], rep[2])
    with pytest.raises(DataError, match="2 bands.*in_chans=3"):
        RasterWindowDataset([two], DataConfig(img_size=32, in_chans=3))


def test_unreadable_rasters_and_globs(tmp_path, scene):
    (tmp_path / "broken.tif").write_text("nope")
    cfg = DataConfig(img_size=32, windows_per_raster=2, max_bad_fraction=0.5)
    ds = RasterWindowDataset([str(tmp_path / "*.tif")], cfg)
    assert [r.path for r in ds.rasters] == [str(scene)]
    with pytest.raises(DataError, match="1 of 2 raster files are unreadable"):
        RasterWindowDataset([str(tmp_path / "*.tif")], DataConfig(img_size=32))
    with pytest.raises(DataError, match="no file matches"):
        RasterWindowDataset([str(tmp_path / "*.jp2")], cfg)


def test_pickles_without_open_handles(scene):
    import pickle

    ds = RasterWindowDataset([scene], DataConfig(img_size=32, windows_per_raster=2, max_nodata=1.0))
    first = ds[0]["sar"]
    assert ds._open  # opened lazily in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._open and torch.equal(clone[0]["sar"], first)
