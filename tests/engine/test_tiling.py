"""Property tests of engine.tiling: coverage, bounds, sizes, alignment, order."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tiling import TilePlan, Window, iter_row_bands, plan_tiles

sizes = st.integers(1, 700)
windows = st.sampled_from([16, 32, 64, 128])
overlaps = st.sampled_from([0.0, 0.25, 0.5])
aligns = st.sampled_from([1, 4, 16])

plans = st.builds(plan_tiles, sizes, sizes, windows, overlaps, aligns)


@settings(deadline=None)
@given(plans)
def test_every_pixel_is_covered_and_windows_stay_inside(plan: TilePlan) -> None:
    covered = np.zeros((plan.raster_height, plan.raster_width), dtype=bool)
    for w in plan.windows:
        assert 0 <= w.row_off and w.row_end <= plan.raster_height
        assert 0 <= w.col_off and w.col_end <= plan.raster_width
        covered[w.slices()] = True
    assert covered.all()


@given(plans)
def test_windows_have_the_model_size_unless_the_raster_is_smaller(plan: TilePlan) -> None:
    for w in plan.windows:
        assert w.height == min(plan.window, plan.raster_height)
        assert w.width == min(plan.window, plan.raster_width)
        assert w.height + plan.pad_bottom == plan.window
        assert w.width + plan.pad_right == plan.window
    assert plan.pad_bottom == max(0, plan.window - plan.raster_height)
    assert plan.pad_right == max(0, plan.window - plan.raster_width)


@given(sizes, sizes, windows, overlaps, aligns)
def test_stride_formula_and_aligned_starts(
    height: int, width: int, window: int, overlap: float, align: int
) -> None:
    plan = plan_tiles(height, width, window, overlap, align)
    stride = max(1, window - round(window * overlap))
    assert plan.stride == max(align, stride // align * align)
    assert 1 <= plan.stride <= window
    for size, starts in ((height, plan.row_starts), (width, plan.col_starts)):
        if size <= window:
            assert starts == (0,)
            continue
        assert len(starts) == math.ceil((size - window) / plan.stride) + 1
        assert starts[-1] == size - window  # last window shifted inside
        assert all(s == k * plan.stride for k, s in enumerate(starts[:-1]))
        assert all(s % align == 0 for s in starts[:-1])
        assert all(0 < b - a <= plan.stride for a, b in pairwise(starts))


@given(sizes, sizes, windows, overlaps, aligns)
def test_deterministic(height: int, width: int, window: int, overlap: float, align: int) -> None:
    assert plan_tiles(height, width, window, overlap, align) == plan_tiles(
        height, width, window, overlap, align
    )


@given(plans)
def test_row_major_order_grouped_by_row_band(plan: TilePlan) -> None:
    offsets = [(w.row_off, w.col_off) for w in plan.windows]
    assert offsets == sorted(set(offsets))  # row-major and no duplicates
    assert len(plan.windows) == len(plan.row_starts) * len(plan.col_starts)
    bands = list(iter_row_bands(plan))
    assert [row_off for row_off, _ in bands] == list(plan.row_starts)
    assert [w for _, band in bands for w in band] == list(plan.windows)
    for row_off, band in bands:
        assert all(w.row_off == row_off for w in band)
        assert tuple(w.col_off for w in band) == plan.col_starts


def test_worked_examples() -> None:
    plan = plan_tiles(10, 10, 4, overlap=0.5)
    assert plan.stride == 2 and plan.row_starts == (0, 2, 4, 6)
    plan = plan_tiles(10, 9, 4, overlap=0.0)
    assert plan.stride == 4 and plan.row_starts == (0, 4, 6) and plan.col_starts == (0, 4, 5)
    plan = plan_tiles(100, 50, 32, overlap=0.25, align=16)  # stride 24 -> 16
    assert plan.stride == 16 and plan.row_starts == (0, 16, 32, 48, 64, 68)
    plan = plan_tiles(5, 300, 16)
    assert plan.row_starts == (0,) and plan.pad == (11, 0)
    assert plan.windows[0] == Window(0, 0, 5, 16)


def test_window_slices() -> None:
    w = Window(row_off=2, col_off=3, height=4, width=5)
    assert w.slices() == (slice(2, 6), slice(3, 8))
    assert (w.row_end, w.col_end) == (6, 8)
    assert np.arange(100).reshape(10, 10)[w.slices()].shape == (4, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": 0}, "height must be >= 1"),
        ({"width": -3}, "width must be >= 1"),
        ({"window": 0}, "window must be >= 1"),
        ({"height": 2.5}, "height must be an integer"),
        ({"window": True}, "window must be an integer"),
        ({"overlap": 1.0}, r"overlap must be a fraction in \[0, 1\)"),
        ({"overlap": -0.1}, "overlap"),
        ({"overlap": float("nan")}, "overlap"),
        ({"overlap": "0.5"}, "overlap"),
        ({"align": 0}, "align must be >= 1"),
        ({"align": 32}, "must not exceed the window size"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs: dict, match: str) -> None:
    args = {"height": 100, "width": 100, "window": 16, "overlap": 0.25, "align": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        plan_tiles(**args)


def test_numpy_integers_are_accepted() -> None:
    assert plan_tiles(np.int64(40), np.int32(40), np.int64(16)) == plan_tiles(40, 40, 16)
