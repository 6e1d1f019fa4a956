"""Simulated changes of acquisition (training/acquisition.py): each shift does what it names, in the
contract's physical terms, seeded; 8-bit contracts stay 8-bit; bad specifications are sentences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.acquisition import (
    DEFAULT_SHIFTS,
    Shift,
    accuracy_table,
    acquisition_jitter,
    apply_shift,
    parse_shift,
    shifted_sets,
)

U8 = {"mean": [0.5], "std": [0.5], "units": "uint8", "clip": [0.0, 255.0]}
DB = {"mean": [0.5], "std": [0.5], "units": "db", "clip": [-30.0, 10.0]}


def square(value: float = 0.8, background: float = 0.1, side: int = 16, size: int = 64) -> torch.Tensor:
    """A bright centred square on a dark background, as normalised input (1, 1, size, size)."""
    v = torch.full((1, 1, size, size), background)
    lo = (size - side) // 2
    v[..., lo:lo + side, lo:lo + side] = value
    return (v - 0.5) / 0.5


def scaled(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 + 0.5


def test_gain_gamma_and_quantisation():
    x = square(0.4)
    up = scaled(apply_shift(x, U8, Shift("gain", 6.0)))
    assert torch.allclose(up.max(), torch.tensor(round(0.4 * 10 ** 0.3 * 255) / 255), atol=1e-6)  # amplitude x 10^(6/20)
    assert float(scaled(apply_shift(square(0.8), U8, Shift("gain", 6.0))).max()) == 1.0  # saturates at 255
    assert torch.allclose(up * 255, torch.round(up * 255), atol=1e-4)  # another acquisition's chips are 8-bit too
    db = scaled(apply_shift(x, DB, Shift("gain", -4.0)))
    assert torch.allclose(db - scaled(x), torch.full_like(db, -4.0 / 40), atol=1e-6)  # dB: an offset, not quantised
    g = scaled(apply_shift(x, DB, Shift("gamma", 2.0)))
    assert torch.allclose(g.max(), torch.tensor(0.16)) and torch.allclose(g.min(), torch.tensor(0.01))


def test_speckle_keeps_the_mean_intensity_and_is_seeded():
    x = square(0.5, 0.5, size=128)  # a flat 0.5 in [0, 1]: -10 dB in a [-30, 10] dB contract
    a = apply_shift(x, DB, Shift("speckle", 1.0), seed=3)
    assert torch.equal(a, apply_shift(x, DB, Shift("speckle", 1.0), seed=3))
    assert not torch.equal(a, apply_shift(x, DB, Shift("speckle", 1.0), seed=4))
    power = 10 ** ((scaled(a) * 40 - 30) / 10)  # back to linear power: unit-mean noise on 0.1
    assert abs(float(power.mean()) / 0.1 - 1) < 0.05
    few, many = (float((scaled(apply_shift(x, DB, Shift("speckle", L))) - 0.5).std()) for L in (1.0, 16.0))
    assert few > 3 * many  # one look is far noisier than sixteen


def test_zoom_and_pose_move_the_target():
    x = square()

    def bright(t):
        return int((scaled(t) > 0.45).sum())

    assert bright(apply_shift(x, U8, Shift("zoom", 1.25))) > bright(x) > bright(apply_shift(x, U8, Shift("zoom", 0.8)))
    p = scaled(apply_shift(x, U8, Shift("pose", 0.0, 6.0)))
    rows, cols = torch.nonzero(p[0, 0] > 0.45, as_tuple=True)
    centre = torch.stack([rows.float().mean(), cols.float().mean()]) - 31.5
    assert 5.0 < float(centre.norm()) < 7.0  # translated by 6 px in a seeded direction


def test_sets_jitter_table_and_bad_input():
    x = torch.cat([square(), square(0.6, 0.2)])
    sets = shifted_sets(x, U8)
    assert list(sets) == ["clean", *(s.name for s in DEFAULT_SHIFTS)] and all(v.shape == x.shape for v in sets.values())
    j = acquisition_jitter(x, U8, generator=torch.Generator().manual_seed(0))
    assert j.shape == x.shape and float(j.min()) >= -1 and float(j.max()) <= 1 and not torch.equal(j, x)
    probs = {"clean": np.eye(2), "a": np.eye(2), "b": np.eye(2)[::-1]}
    assert accuracy_table(probs, np.array([0, 1])) == {"clean": 1.0, "a": 1.0, "b": 0.0, "shift mean": 0.5}
    assert parse_shift("pose:10:6") == Shift("pose", 10.0, 6.0) and parse_shift("gain:-3").name == "gain -3 dB"
    with pytest.raises(ValueError, match="acquisition shift 'blur:2': use gain:DB, gamma:EXPONENT"):
        parse_shift("blur:2")
