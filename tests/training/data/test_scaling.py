"""The [0, 1] scaling rule per file (8-bit, 16-bit, dB, linear power, complex) and fit_size."""

import numpy as np
import pytest
import torch
from chipgen import write_image

from engine.reader import SarRaster
from engine.tiling import Window
from training.data.scaling import fit_size, is_gray, item_rng, source_units, split_key, to_unit

CLIP = (-35.0, 10.0)


def units_of(path, units=None):
    with SarRaster.open(str(path)) as r:
        x, valid = r.read(Window(0, 0, r.height, r.width))
        return source_units(r, x[:, valid], units)


def test_units_by_dtype_and_statistics(tmp_path):
    rng = np.random.default_rng(0)
    lin = rng.exponential(0.05, (16, 16)).astype(np.float32)
    lin[0, 0] = 40.0  # a bright ship: still linear power, not amplitude
    db = (10 * np.log10(lin)).astype(np.float32)
    assert units_of(write_image(tmp_path / "a.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))) == "uint8"
    u16 = write_image(tmp_path / "b.tif", rng.integers(0, 65535, (16, 16), dtype=np.uint16))
    assert units_of(u16) == "uint16"
    assert units_of(u16, units="amplitude") == "amplitude"  # given units win for 16-bit data
    assert units_of(write_image(tmp_path / "c.tif", lin)) == "linear_power"
    assert units_of(write_image(tmp_path / "d.tif", db)) == "db"
    cplx = (rng.standard_normal((16, 16)) + 1j * rng.standard_normal((16, 16))).astype(np.complex64)
    cplx_path = write_image(tmp_path / "e.tif", cplx)
    assert units_of(cplx_path) == units_of(cplx_path, units="db") == "linear_power"  # |z|^2, always
    loud = np.abs(rng.standard_normal((16, 16)) * 1000).astype(np.float32)
    assert units_of(write_image(tmp_path / "f.tif", loud)) == "linear_power"  # never amplitude by stats


def test_to_unit_rules():
    valid = np.ones((2, 2), bool)
    assert to_unit(np.full((1, 2, 2), 255.0), valid, "uint8", CLIP).max() == 1.0
    assert to_unit(np.full((1, 2, 2), 65535.0), valid, "uint16", CLIP).max() == 1.0
    db = np.array([[[-40.0, -35.0], [-12.5, 20.0]]])
    np.testing.assert_allclose(to_unit(db, valid, "db", CLIP)[0], [[0, 0], [0.5, 1]], atol=1e-6)
    lin = 10 ** (db / 10)
    np.testing.assert_allclose(to_unit(lin, valid, "linear_power", CLIP), to_unit(db, valid, "db", CLIP), atol=1e-5)
    amp = np.sqrt(lin)
    np.testing.assert_allclose(to_unit(amp, valid, "amplitude", CLIP), to_unit(db, valid, "db", CLIP), atol=1e-5)
    holes = np.array([[True, False], [True, True]])
    assert to_unit(np.full((1, 2, 2), 200.0), holes, "uint8", CLIP)[0, 0, 1] == 0.0


def test_is_gray():
    g = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    assert is_gray(np.repeat(g, 3, axis=0))
    assert is_gray(np.concatenate([g, g + 1 / 255, g]))  # JPEG rounding
    assert not is_gray(np.concatenate([g, g * 0.5, g]))


def test_fit_size_resize_crop_pad():
    x = torch.rand(2, 40, 60)
    assert fit_size(x, 32, "resize").shape == (2, 32, 32)
    assert fit_size(x, 40, "resize").shape == (2, 40, 40)
    c1 = fit_size(x, 32, "crop", np.random.default_rng(1))
    assert c1.shape == (2, 32, 32)
    assert torch.equal(c1, fit_size(x, 32, "crop", np.random.default_rng(1)))  # same rng, same crop
    small = torch.ones(1, 10, 20)
    p = fit_size(small, 32, "crop", np.random.default_rng(0))
    assert p.shape == (1, 32, 32) and p.sum() == 200 and p[0, 16, 16] == 1 and p[0, 0, 0] == 0  # centred
    const = torch.full((1, 50, 50), 0.7)
    assert torch.allclose(fit_size(const, 32, "resize"), torch.tensor(0.7))  # no ringing
    with pytest.raises(ValueError):
        fit_size(x, 32, "stretch")


def test_keys_and_item_rngs():
    assert split_key(5) == (0, 5) and split_key((3, 5)) == (3, 5)
    a = item_rng(0, 1, 2).integers(1 << 30, size=4)
    assert np.array_equal(a, item_rng(0, 1, 2).integers(1 << 30, size=4))
    for other in (item_rng(0, 2, 2), item_rng(0, 1, 3), item_rng(1, 1, 2)):
        assert not np.array_equal(a, other.integers(1 << 30, size=4))
