"""SarRaster: window reads, masks, band selection, stacking, georeferencing, clear errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers.rasters import speckle, write_raster
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import RasterInputError
from engine.reader import SarRaster, gdal_env_options, npy_complex_to_geotiff
from engine.tiling import Window


def whole(r: SarRaster) -> Window:
    return Window(0, 0, r.height, r.width)


# ----------------------------------------------------------------- opening and metadata
def test_multiband_descriptions_metadata(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "s1.tif", speckle((2, 40, 48)), descriptions=["VV", "VH"], nodata=-99.0,
                     blocksize=16)
    with SarRaster.open([str(p)]) as r:
        assert (r.height, r.width, r.count, r.dtype) == (40, 48, 2, "float32")
        assert r.band_names == ["VV", "VH"] and r.polarisations == ["VV", "VH"]
        assert r.crs.to_epsg() == 32631 and r.transform.a == 20.0
        assert r.nodata == [-99.0, -99.0] and r.block_shape == (16, 16)
        assert not r.is_complex and not r.no_crs and r.georeferencing == "transform" and r.gcps == []
        assert "VV+VH" in r.describe()
    assert r.closed


@pytest.mark.parametrize("bands, names", [(["vh"], ["VH"]), ([2, 1], ["VH", "VV"]), (["2"], ["VH"]),
                                          (["VV", "VH"], ["VV", "VH"])])
def test_band_selection(tmp_path: Path, bands: list, names: list[str]) -> None:
    data = np.stack([np.full((8, 8), 1.0), np.full((8, 8), 2.0)]).astype(np.float32)
    p = write_raster(tmp_path / "s1.tif", data, descriptions=["VV", "VH"])
    with SarRaster.open(str(p), bands=bands) as r:
        assert r.band_names == names and r.count == len(names)
        x, _ = r.read(whole(r))
        assert [float(c[0, 0]) for c in x] == [{"VV": 1.0, "VH": 2.0}[n] for n in names]


def test_polarisation_from_band_tags_and_description_tokens(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "a.tif", speckle((2, 8, 8)), descriptions=["Sigma0_HH_db", ""],
                     band_tags=[{}, {"POLARISATION": "hv"}])
    with SarRaster.open(str(p), bands=["HV", "hh"]) as r:
        assert r.band_names == ["HV", "HH"]
        assert r.descriptions == [None, "Sigma0_HH_db"]


def test_stack_single_band_files_named_by_polarisation(tmp_path: Path) -> None:
    vv = write_raster(tmp_path / "scene_30_v1.0_VV.tif", np.full((10, 12), 3.0, np.float32))
    vh = write_raster(tmp_path / "scene_30_v1.0_VH.tif", np.full((10, 12), 4.0, np.float32))
    with SarRaster.open([str(vh), str(vv)], bands=["VV", "VH"]) as r:
        assert r.band_names == ["VV", "VH"] and r.paths == [str(vh), str(vv)]
        x, valid = r.read(whole(r))
        assert x.shape == (2, 10, 12) and valid.all()
        assert x[0, 0, 0] == 3.0 and x[1, 0, 0] == 4.0


def test_repeated_name_takes_files_in_order(tmp_path: Path) -> None:
    d1 = write_raster(tmp_path / "d1_VV.tif", np.full((8, 8), 1.0, np.float32))
    d2 = write_raster(tmp_path / "d2_VV.tif", np.full((8, 8), 2.0, np.float32))
    with SarRaster.open([str(d1), str(d2)], bands=["VV", "vv"]) as r:
        assert r.read(whole(r))[0][:, 0, 0].tolist() == [1.0, 2.0]
    with pytest.raises(RasterInputError, match="no band selected"):
        SarRaster.open([str(d1)], bands=[])


def test_generic_band_names(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "chip.tif", speckle((3, 8, 8)))
    with SarRaster.open(str(p)) as r:
        assert r.band_names == ["band1", "band2", "band3"]


def test_gcps_georeferencing(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "grd.tif", speckle((1, 20, 30)), georef="gcps")
    with SarRaster.open(str(p)) as r:
        assert r.georeferencing == "gcps" and len(r.gcps) == 4 and r.gcp_crs.to_epsg() == 4326
        assert not r.no_crs and r.crs is None


def test_no_crs_is_pixel_space(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "chip.tif", speckle((1, 20, 30)), georef="none")
    with SarRaster.open(str(p)) as r:
        assert r.no_crs and r.georeferencing == "none" and "pixel space" in r.describe()
        assert r.read(Window(0, 0, 5, 5))[0].shape == (1, 5, 5)


# ------------------------------------------------------------------------------ reading
def test_nodata_nan_inf_are_invalid_and_zero(tmp_path: Path) -> None:
    data = np.full((2, 6, 6), -12.0, np.float32)
    data[0, 0, 0] = -99.0       # declared nodata in one band invalidates the pixel in all bands
    data[1, 1, 1] = np.nan
    data[0, 2, 2] = np.inf
    data[1, 3, 3] = -np.inf
    data[:, 4, 4] = 0.0         # 0 (dB) is valid data
    p = write_raster(tmp_path / "db.tif", data, nodata=-99.0, descriptions=["VV", "VH"])
    with SarRaster.open(str(p)) as r:
        x, valid = r.read(whole(r))
    bad = [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert x.dtype == np.float32 and valid.dtype == bool and np.isfinite(x).all()
    assert sorted(map(tuple, np.argwhere(~valid))) == bad
    assert all((x[:, i, j] == 0).all() for i, j in bad)
    assert valid[4, 4] and (x[:, 4, 4] == 0).all() and x[0, 5, 5] == -12.0


def test_integer_nodata(tmp_path: Path) -> None:
    data = np.full((1, 4, 4), 500, np.uint16)
    data[0, 0, 0] = 0
    p = write_raster(tmp_path / "dn.tif", data, nodata=0)
    with SarRaster.open(str(p)) as r:
        x, valid = r.read(whole(r))
    assert not valid[0, 0] and valid.sum() == 15 and x[0, 1, 1] == 500.0


@pytest.mark.parametrize("dtype", ["complex64", "complex_int16"])
@pytest.mark.parametrize("mode", ["intensity", "amplitude"])
def test_complex_to_intensity_or_amplitude(tmp_path: Path, dtype: str, mode: str) -> None:
    z = np.full((1, 6, 6), 3 + 4j, np.complex64)
    p = write_raster(tmp_path / "slc.tif", z, dtype=dtype, georef="none")
    with SarRaster.open(str(p), complex_mode=mode) as r:
        assert r.is_complex
        x, valid = r.read(whole(r))
    assert x.dtype == np.float32 and valid.all()
    assert np.allclose(x, 25.0 if mode == "intensity" else 5.0)


def test_scale_offset_applied(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "packed.tif", np.full((1, 4, 4), 1000, np.uint16))
    with rasterio.open(p, "r+") as ds:
        ds.scales, ds.offsets = (0.01,), (-30.0,)
    with SarRaster.open(str(p)) as r:
        assert np.allclose(r.read(whole(r))[0], -20.0)


def test_edge_window_and_padding(tmp_path: Path) -> None:
    data = np.arange(2 * 37 * 53, dtype=np.float32).reshape(2, 37, 53)
    p = write_raster(tmp_path / "r.tif", data, blocksize=16)
    with SarRaster.open(str(p)) as r:
        x, valid = r.read(Window(27, 43, 10, 10))  # bottom-right corner
        assert np.array_equal(x, data[:, 27:, 43:]) and valid.all()
        x, valid = r.read(Window(30, 40, 7, 13), pad_to=(16, 16))
    assert x.shape == (2, 16, 16) and valid.shape == (16, 16)
    assert np.array_equal(x[:, :7, :13], data[:, 30:, 40:])
    assert (x[:, 7:] == 0).all() and (x[:, :, 13:] == 0).all()
    assert valid[:7, :13].all() and not valid[7:].any() and not valid[:, 13:].any()


def test_bad_windows_are_programming_errors(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "r.tif", speckle((1, 10, 10)))
    with SarRaster.open(str(p)) as r:
        for w in (Window(5, 5, 6, 5), Window(-1, 0, 2, 2), Window(0, 0, 0, 3)):
            with pytest.raises(ValueError):
                r.read(w)
        with pytest.raises(ValueError):
            r.read(Window(0, 0, 8, 8), pad_to=(4, 8))


@pytest.fixture(scope="module")
def grid_raster(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(1).normal(size=(2, 45, 61)).astype(np.float32)
    return write_raster(tmp_path_factory.mktemp("grid") / "g.tif", data, blocksize=16), data


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_window_matches_numpy_slice(grid_raster: tuple[Path, np.ndarray], data: st.DataObject) -> None:
    path, arr = grid_raster
    r0 = data.draw(st.integers(0, 44))
    c0 = data.draw(st.integers(0, 60))
    h, w = data.draw(st.integers(1, 45 - r0)), data.draw(st.integers(1, 61 - c0))
    with SarRaster.open(str(path)) as r:
        x, valid = r.read(Window(r0, c0, h, w))
    assert np.array_equal(x, arr[:, r0:r0 + h, c0:c0 + w]) and valid.all()


def test_reads_from_threads_agree(tmp_path: Path) -> None:
    data = speckle((2, 64, 64))
    p = write_raster(tmp_path / "t.tif", data, blocksize=16)
    results: list[bool] = []
    with SarRaster.open(str(p)) as r:
        def work(k: int) -> None:
            for i in range(20):
                w = Window((k * 7 + i) % 48, (i * 5) % 48, 16, 16)
                results.append(np.array_equal(r.read(w)[0], data[:, w.row_off:w.row_end, w.col_off:w.col_end]))
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 80 and all(results)


def test_gdal_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    assert gdal_env_options() == {"GDAL_CACHEMAX": 256 << 20}  # bytes: what rasterio.Env passes to GDAL
    for value, expected in (("512", 512), ("1GB", 1024), ("64MB", 64), ("lots", 256), (str(300 << 20), 300)):
        monkeypatch.setenv("GDAL_CACHEMAX", value)
        assert gdal_env_options() == {"GDAL_CACHEMAX": expected << 20}


def test_gdal_cache_bound_reaches_gdal_in_megabytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the reader's ``rasterio.Env`` GDAL's block cache holds 64 MB (not 64 bytes): a block
    read there stays cached."""
    import ctypes

    monkeypatch.setenv("GDAL_CACHEMAX", "64")
    libs = sorted((Path(rasterio.__file__).parent.parent / "rasterio.libs").glob("libgdal*.so*"))
    if not libs:
        pytest.skip("rasterio's GDAL library is not a separate file here (not a manylinux wheel)")
    gdal = ctypes.CDLL(str(libs[0]))
    gdal.GDALGetCacheMax64.restype = ctypes.c_int64
    with rasterio.Env(**gdal_env_options()):
        assert gdal.GDALGetCacheMax64() == 64 << 20


# ------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RasterInputError, match="not found: .*nope.tif"):
        SarRaster.open([str(tmp_path / "nope.tif")])


def test_text_file_named_tif(tmp_path: Path) -> None:
    p = tmp_path / "notes.tif"
    p.write_text("this is not a raster\n")
    with pytest.raises(RasterInputError, match="notes.tif is not a raster GDAL can read"):
        SarRaster.open([str(p)])


@pytest.mark.parametrize("shape", [(1, 1), (1, 50)])
def test_tiny_raster_refused(tmp_path: Path, shape: tuple[int, int]) -> None:
    p = write_raster(tmp_path / "dot.tif", np.ones(shape, np.float32))
    with pytest.raises(RasterInputError, match="too small to be SAR imagery"):
        SarRaster.open([str(p)])


def test_missing_polarisation_lists_what_is_there(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "s1_VV.tif", speckle((1, 8, 8)))
    with pytest.raises(RasterInputError, match=r"polarisation VH is not in .*s1_VV.tif.*1: VV"):
        SarRaster.open([str(p)], bands=["VH"])
    with pytest.raises(RasterInputError, match="band 3 is not in"):
        SarRaster.open([str(p)], bands=[3])


@pytest.mark.parametrize("other", [dict(shape=(9, 8)), dict(crs="EPSG:32632"),
                                   dict(transform=rasterio.transform.from_origin(500020.0, 4500000.0, 20, 20))])
def test_different_grids_name_both_files(tmp_path: Path, other: dict) -> None:
    a = write_raster(tmp_path / "a_VV.tif", speckle((8, 8)))
    kwargs = {k: v for k, v in other.items() if k != "shape"}
    b = write_raster(tmp_path / "b_VH.tif", speckle(other.get("shape", (8, 8))), **kwargs)
    with pytest.raises(RasterInputError, match=r"a_VV.tif and .*b_VH.tif are not on the same grid"):
        SarRaster.open([str(a), str(b)])


def test_npy_is_refused_with_a_hint(tmp_path: Path) -> None:
    p = tmp_path / "slc.npy"
    np.save(p, np.zeros((4, 4, 2), np.float32))
    with pytest.raises(RasterInputError, match="npy_complex_to_geotiff"):
        SarRaster.open([str(p)])


# ------------------------------------------------------------------------- real data
# (``shared_data``, tests/conftest.py: ../shared/data beside the repository; skipped when absent)
def test_real_pyrosar_db_nodata(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "pyrosar" / "S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"
    with SarRaster.open([str(src)]) as r:
        assert r.nodata == [-99.0] and r.band_names == ["VV"] and r.crs.to_epsg() == 32631
        x, valid = r.read(Window(100, 150, 117, 118))  # bottom-right edge of the 217x268 raster
        assert x.shape == (1, 117, 118) and valid.all() and (x < 2).all()
    # the crop holds no -99 pixel: punch some into a copy to see them masked
    with rasterio.open(src) as ds:
        arr, profile = ds.read(), ds.profile
    arr[0, :5, :5] = -99.0
    with rasterio.open(tmp_path / "holes.tif", "w", **profile) as dst:
        dst.write(arr)
    with SarRaster.open([str(tmp_path / "holes.tif")]) as r:
        x, valid = r.read(Window(0, 0, 10, 10))
    assert not valid[:5, :5].any() and valid[5:].all() and (x[0, :5, :5] == 0).all()


def test_real_opera_vv_vh_stacked(shared_data: Path) -> None:
    files = sorted((shared_data / "opera_rtc_s1" / "one_burst_all_dates").glob("*20211119T015859Z*.tif"))
    with SarRaster.open([str(f) for f in files], bands=["VV", "VH"]) as r:  # files sort VH first
        assert r.band_names == ["VV", "VH"] and r.crs.to_epsg() == 32611 and (r.height, r.width) == (100, 100)
        x, valid = r.read(Window(90, 90, 10, 10), pad_to=(32, 32))
    assert x.shape == (2, 32, 32) and valid[:10, :10].all() and not valid[10:].any()
    assert (x[0, :10, :10] > x[1, :10, :10]).mean() > 0.9  # co-pol is brighter than cross-pol


def test_real_opera_neighbouring_bursts_are_not_one_grid(shared_data: Path) -> None:
    files = sorted((shared_data / "opera_rtc_s1" / "one_date_all_bursts").glob("*_VV.tif"))[:3:2]
    with pytest.raises(RasterInputError, match="not on the same grid"):
        SarRaster.open([str(f) for f in files])


def test_real_sen1floods11_two_bands(shared_data: Path) -> None:
    with SarRaster.open([str(shared_data / "sen1floods11" / "Spain_7370579_S1Hand.tif")]) as r:
        assert r.band_names == ["VV", "VH"] and r.crs.to_epsg() == 4326
        x, valid = r.read(Window(256, 256, 256, 256))
    assert np.isfinite(x).all() and valid.all()


def test_real_envisat_complex_slc(shared_data: Path) -> None:
    path = shared_data / "complex_slc" / "warped_envisat.slc.vrt"
    with SarRaster.open([str(path)]) as r:
        assert r.is_complex and r.dtype == "complex64" and r.georeferencing == "identity"
        x, valid = r.read(Window(200, 300, 64, 64))
    with rasterio.open(path) as ds:
        z = ds.read(1, window=rasterio.windows.Window(300, 200, 64, 64))
    assert valid.all() and np.allclose(x[0], np.abs(z) ** 2, rtol=1e-5)


def test_real_npy_slc_through_geotiff(shared_data: Path, tmp_path: Path) -> None:
    tif = npy_complex_to_geotiff(str(shared_data / "complex_slc" / "test_image_data.npy"), str(tmp_path / "slc.tif"))
    arr = np.load(shared_data / "complex_slc" / "test_image_data.npy")
    with SarRaster.open([tif], complex_mode="amplitude") as r:
        assert r.is_complex and r.no_crs and (r.height, r.width) == (256, 256)
        x, _ = r.read(Window(0, 0, 256, 256))
    assert np.allclose(x[0], np.hypot(arr[..., 0], arr[..., 1]), rtol=1e-5)


def test_real_mstar_jpeg_pixel_space(shared_data: Path) -> None:
    jpeg = next((shared_data / "mstar_soc10" / "train_17deg" / "0-2S1").glob("*.jpeg"))
    with SarRaster.open([str(jpeg)]) as r:
        assert r.no_crs and r.dtype == "uint8" and (r.height, r.width) == (128, 128)
        x, valid = r.read(Window(0, 0, 128, 128))
    assert valid.all() and 0 <= x.min() and x.max() <= 255
