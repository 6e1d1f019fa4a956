"""Radiometry: unit detection, unit conversion, the model's input contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.rasters import speckle, write_raster
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import PackageError, RasterInputError
from engine.radiometry import Radiometry, convert_units, detect_units, normalise_units
from engine.reader import SarRaster
from engine.tiling import Window


def contract(units: str = "db", bands: tuple[str, ...] = ("VV", "VH"), clip: tuple[float, float] = (-30.0, 5.0),
             mean: float = 0.5, std: float = 0.5) -> dict:
    n = len(bands)
    return {"bands": list(bands), "units": units, "clip": list(clip), "mean": [mean] * n, "std": [std] * n,
            "nodata": "mask"}


def detect(path: Path, **kw: object) -> tuple[str, str]:
    with SarRaster.open([str(path)], **kw) as r:  # type: ignore[arg-type]
        return detect_units(r)


# -------------------------------------------------------------------------- conversion
def test_known_conversions() -> None:
    x = np.array([1.0, 0.1, 100.0, 0.0], np.float32)
    assert np.allclose(convert_units(x, "linear_power", "db"), [0.0, -10.0, 20.0, -100.0])
    assert np.allclose(convert_units(np.array([10.0, 1.0]), "amplitude", "db"), [20.0, 0.0])
    assert np.allclose(convert_units(np.array([2.0]), "amplitude", "linear_power"), [4.0])
    assert np.allclose(convert_units(np.array([0.0, -10.0]), "db", "linear_power"), [1.0, 0.1])  # 0 dB = 1
    assert np.allclose(convert_units(np.array([20.0]), "db", "amplitude"), [10.0])
    assert convert_units(x, "db", "dB").dtype == np.float32


finite_db = st.floats(-90.0, 40.0, allow_nan=False)
positive = st.floats(1e-4, 1e4, allow_nan=False)


@given(st.lists(positive, min_size=1, max_size=20))
def test_roundtrip_power_db(values: list[float]) -> None:
    x = np.array(values, np.float32)
    back = convert_units(convert_units(x, "linear_power", "db"), "db", "linear_power")
    assert np.allclose(back, x, rtol=1e-4)


@given(st.lists(positive, min_size=1, max_size=20), st.sampled_from(["linear_power", "db"]))
def test_roundtrip_amplitude(values: list[float], via: str) -> None:
    x = np.array(values, np.float32)
    assert np.allclose(convert_units(convert_units(x, "amplitude", via), via, "amplitude"), x, rtol=1e-4)


@given(st.lists(finite_db, min_size=1, max_size=20), st.sampled_from(["linear_power", "amplitude"]))
def test_roundtrip_db(values: list[float], via: str) -> None:
    x = np.array(values, np.float32)
    assert np.allclose(convert_units(convert_units(x, "db", via), via, "db"), x, atol=1e-3)


def test_uint8_only_feeds_uint8() -> None:
    x = np.array([0.0, 128.0, 255.0], np.float32)
    assert np.array_equal(convert_units(x, "uint8", "uint8"), x)
    for a, b in (("uint8", "db"), ("linear_power", "uint8"), ("uint8", "amplitude")):
        with pytest.raises(RasterInputError, match="8-bit display images .* no calibrated unit.*--input-units"):
            convert_units(x, a, b)


def test_unit_names() -> None:
    assert [normalise_units(u) for u in ("dB", "Linear", "intensity", "amplitude", "uint8")] == \
        ["db", "linear_power", "linear_power", "amplitude", "uint8"]
    with pytest.raises(RasterInputError, match="unknown input units 'furlongs'"):
        normalise_units("furlongs")


# --------------------------------------------------------------------------- detection
def test_detect_complex_follows_complex_mode(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "slc.tif", np.full((1, 8, 8), 1 + 1j, np.complex64), georef="none")
    assert detect(p)[0] == "linear_power" and "complex" in detect(p)[1]
    assert detect(p, complex_mode="amplitude")[0] == "amplitude"


def test_detect_uint8(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "chip.tif", np.full((1, 8, 8), 40, np.uint8), georef="none")
    assert detect(p)[0] == "uint8"


@pytest.mark.parametrize("kw, units, word", [
    (dict(descriptions=["Sigma0_VV_db"]), "db", "db"),
    (dict(band_tags=[{"UNITS": "decibel"}]), "db", "decibel"),
    (dict(descriptions=["Amplitude_VV"]), "amplitude", "amplitude"),
    (dict(descriptions=["Gamma0_VV"]), "linear_power", "gamma0"),
    (dict(tags={"MEASUREMENT": "sigma0 linear"}), "linear_power", "linear"),
])
def test_metadata_wins_over_statistics(tmp_path: Path, kw: dict, units: str, word: str) -> None:
    p = write_raster(tmp_path / "meta.tif", np.full((1, 8, 8), -12.0, np.float32), **kw)
    got, reason = detect(p)
    assert got == units and word in reason


def test_detect_db_from_file_name(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "grd_VV_norm_db.tif", speckle((1, 8, 8)))
    assert detect(p) == ("db", "file name 'grd_VV_norm_db.tif' says 'db'")


@pytest.mark.parametrize("data, units", [
    (10 * np.log10(speckle((2, 64, 64))), "db"),
    (speckle((2, 64, 64)), "linear_power"),
    (np.random.default_rng(0).integers(50, 4000, (1, 64, 64)).astype(np.uint16), "amplitude"),
    (np.sqrt(speckle((1, 64, 64), mean_power=4e4)), "amplitude"),
])
def test_detect_from_statistics(tmp_path: Path, data: np.ndarray, units: str) -> None:
    p = write_raster(tmp_path / "x.tif", data)
    got, reason = detect(p)
    assert got == units and "statistics" in reason and "median" in reason


def test_detect_refuses_real_imag_parts_and_empty(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "ri.tif", np.random.default_rng(0).normal(size=(2, 64, 64)).astype(np.float32))
    with pytest.raises(RasterInputError, match="symmetric about 0.*--input-units"):
        detect(p)
    q = write_raster(tmp_path / "empty.tif", np.full((1, 8, 8), -99.0, np.float32), nodata=-99.0)
    with pytest.raises(RasterInputError, match="no valid pixel.*--input-units"):
        detect(q)


def test_detect_uses_given_sample(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "x.tif", speckle((1, 8, 8)))
    with SarRaster.open([str(p)]) as r:
        assert detect_units(r, sample=np.array([-15.0, -12.0, -8.0, np.nan]))[0] == "db"


def test_detect_reads_windows_not_the_whole_raster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write_raster(tmp_path / "big.tif", speckle((1, 1200, 1100)), blocksize=256)
    seen: list[Window] = []
    with SarRaster.open([str(p)]) as r:
        real_read = r.read
        monkeypatch.setattr(r, "read", lambda w, pad_to=None: (seen.append(w), real_read(w, pad_to))[1])
        assert detect_units(r)[0] == "linear_power"
    assert 1 < len(seen) <= 5 and sum(w.height * w.width for w in seen) < 0.3 * 1200 * 1100


# --------------------------------------------------------------------------- contract
def test_apply_db_contract() -> None:
    rad = Radiometry(contract(), "db", ["VV", "VH"])
    x = np.array([[[-30.0, 5.0], [-12.5, -60.0]], [[20.0, -30.0], [0.0, -12.5]]], np.float32)
    valid = np.array([[True, True], [True, False]])
    y = rad.apply(x, valid)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.allclose(y[0], [[-1.0, 1.0], [0.0, 0.0]])   # clip -> [0,1] -> (x-0.5)/0.5; invalid -> 0
    assert np.allclose(y[1], [[1.0, -1.0], [2 * 30 / 35 - 1, 0.0]])  # 0 dB is data, not nodata


def test_apply_converts_linear_to_db_and_per_channel_stats() -> None:
    c = contract(bands=("band1", "band2"))
    c["mean"], c["std"] = [0.0, 0.5], [1.0, 0.25]
    rad = Radiometry(c, "linear_power", ["VV", "VH"])
    y = rad.apply(np.ones((2, 1, 1), np.float32) * 0.1, np.ones((1, 1), bool))  # 0.1 -> -10 dB
    x01 = 20 / 35
    assert np.allclose(y[:, 0, 0], [x01, (x01 - 0.5) / 0.25])


def test_uint8_contract() -> None:
    rad = Radiometry(contract("uint8", ("band1",), (0, 255)), "uint8", ["band1"])
    y = rad.apply(np.array([[[0.0, 255.0]]], np.float32), np.ones((1, 2), bool))
    assert np.allclose(y, [[[-1.0, 1.0]]])
    with pytest.raises(RasterInputError, match="8-bit display"):
        Radiometry(contract("db", ("VV",)), "uint8", ["band1"])
    with pytest.raises(RasterInputError, match="8-bit display"):
        Radiometry(contract("uint8", ("band1",), (0, 255)), "db", ["VV"])


def test_channel_count_and_polarisation_checks() -> None:
    with pytest.raises(RasterInputError, match=r"model wants VV\+VH .*x.tif has 1 band \(VV\)"):
        Radiometry(contract(), "db", ["VV"], source="x.tif")
    with pytest.raises(RasterInputError, match=r"model wants VV\+VH, x.tif has 2 bands \(HH\+HV\)"):
        Radiometry(contract(), "db", ["HH", "HV"], source="x.tif")
    with pytest.raises(RasterInputError, match="Reorder with --bands VV,VH"):
        Radiometry(contract(), "db", ["VH", "VV"])
    Radiometry(contract(), "db", ["band1", "band2"])  # unknown names: only the count is checked
    Radiometry(contract(bands=("band1", "band2")), "db", ["VV", "VH"])


@pytest.mark.parametrize("bad", [{"units": "furlongs"}, {"clip": [5, -30]}, {"std": [0.5, 0.0]},
                                 {"clip": None}, {"nodata": "keep"}, {"bands": []}])
def test_malformed_contract(bad: dict) -> None:
    with pytest.raises(PackageError, match="contract"):
        Radiometry({**contract(), **bad}, "db", ["VV", "VH"])


def test_describe() -> None:
    rad = Radiometry(contract(), "db", ["VV", "VH"], reason="band metadata says 'decibel'")
    assert rad.describe() == ("input units: dB (band metadata says 'decibel'); clip -30..5 dB; "
                              "mean/std 0.5/0.5")
    assert "converted to dB" in Radiometry(contract(), "linear_power", ["VV", "VH"]).describe()


def test_for_raster_override(tmp_path: Path) -> None:
    p = write_raster(tmp_path / "x.tif", speckle((2, 8, 8)), descriptions=["VV", "VH"])
    with SarRaster.open([str(p)]) as r:
        assert Radiometry.for_raster(contract(), r).src_units == "linear_power"
        rad = Radiometry.for_raster(contract(), r, input_units="amplitude")
        assert rad.src_units == "amplitude" and "--input-units" in rad.describe()


# --------------------------------------------------------------------------- real data
OPERA = "OPERA_L2_RTC-S1_T137-292320-IW1_20211119T015859Z_20250830T120333Z_S1A_30_v1.0_{}.tif"
REAL = {  # name: (paths under ../shared/data, units the detector must report)
    "pyrosar": (["pyrosar/S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"], "db"),
    "sen1floods11": (["sen1floods11/Spain_7370579_S1Hand.tif"], "db"),
    "opera": ([f"opera_rtc_s1/one_burst_all_dates/{OPERA.format(p)}" for p in ("VV", "VH")], "linear_power"),
    "envisat_slc": (["complex_slc/warped_envisat.slc.vrt"], "linear_power"),
    "mstar": (["mstar_soc10/train_17deg/0-2S1/00001.jpeg"], "uint8"),
    "hrsid": (["hrsid/P0094_0_800_3000_3800.png"], "uint8"),
    "opensarship": (["opensarship/S1A_IW_GRDH_1SDV_20150902T102505_20150902T102534_007535_00A699_2D00/"
                     "Patch_Cal/Cargo_x1446_y3299.tif"], "linear_power"),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_units_and_normalised_range(shared_data: Path, name: str) -> None:
    paths, units = REAL[name]
    with SarRaster.open([str(shared_data / p) for p in paths]) as r:
        got, reason = detect_units(r)
        assert got == units, reason
        model_units = "uint8" if units == "uint8" else "db"
        clip = (0.0, 255.0) if units == "uint8" else (-30.0, 5.0)
        rad = Radiometry(contract(model_units, tuple(f"band{i + 1}" for i in range(r.count)), clip), got,
                         r.band_names, reason)
        x, valid = r.read(Window(0, 0, min(r.height, 128), min(r.width, 128)), pad_to=(128, 128))
    y = rad.apply(x, valid)
    assert y.shape == (r.count, 128, 128) and np.isfinite(y).all()
    assert y.min() >= -1.0 and y.max() <= 1.0 and (y[:, ~valid] == 0).all()
