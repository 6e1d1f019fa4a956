"""Property tests of engine.stitching: weights, exact reconstruction, strip order, memory."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.stitching import RollingStitcher, blend_weights
from engine.tiling import TilePlan, Window, plan_tiles

sizes = st.integers(1, 700)
windows = st.sampled_from([16, 32, 64, 128])
overlaps = st.sampled_from([0.0, 0.25, 0.5])
plans = st.builds(plan_tiles, sizes, sizes, windows, overlaps)

Model = Callable[[Window, np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def run(
    plan: TilePlan, image: np.ndarray, model: Model, copy_strips: bool = True, pop_every: int = 1
) -> tuple[np.ndarray, list[tuple[int, int]], RollingStitcher]:
    """Stitch ``model`` over ``image`` (C, H, W), popping after every ``pop_every`` windows (1: like
    a real run).

    Returns the stitched raster, the ``(row_off, rows)`` of every strip, and the stitcher.
    """
    channels = image.shape[0]
    stitcher = RollingStitcher(plan, channels, copy_strips=copy_strips)
    out = np.full_like(image, np.nan, dtype=np.float32)
    strips: list[tuple[int, int]] = []

    def take(ready: list[tuple[int, np.ndarray]]) -> None:
        for row_off, strip in ready:
            assert strip.dtype == np.float32
            assert strip.shape[0] == channels and strip.shape[2] == plan.raster_width
            out[:, row_off : row_off + strip.shape[1]] = strip
            strips.append((row_off, strip.shape[1]))

    for i, window in enumerate(plan.windows):
        pad = ((0, 0), (0, plan.pad_bottom), (0, plan.pad_right))
        model_input = np.pad(image[(slice(None), *window.slices())], pad)  # (C, window, window)
        logits, valid = model(window, model_input)
        stitcher.add(window, logits, valid)
        if (i + 1) % pop_every == 0:
            take(stitcher.pop_ready())
        if pop_every == 1:
            assert stitcher.held_rows <= plan.window + plan.stride
    take(stitcher.flush())
    return out, strips, stitcher


def identity(window: Window, x: np.ndarray) -> tuple[np.ndarray, None]:
    return x, None


def nodata_box3(plan: TilePlan, seed: int) -> tuple[np.ndarray, Model]:
    """An image and a 3x3 box-filter model that also marks random pixels invalid (like nodata)."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(size=(2, plan.raster_height, plan.raster_width)).astype(np.float32)

    def model(window: Window, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return box3(x), rng.uniform(size=x.shape[1:]) > 0.3

    return image, model


def box3(x: np.ndarray) -> np.ndarray:
    """3x3 box sum with zero padding, (C, H, W) -> (C, H, W)."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    h, w = x.shape[1:]
    return sum(padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3))


@given(st.integers(1, 256), st.integers(0, 300))
def test_weights_strictly_positive_and_symmetric(window: int, overlap_px: int) -> None:
    weights = blend_weights(window, overlap_px)
    assert weights.shape == (window, window) and weights.dtype == np.float32
    assert (weights > 0).all() and (weights <= 1).all()
    np.testing.assert_array_equal(weights, weights[::-1])
    np.testing.assert_array_equal(weights, weights[:, ::-1])
    np.testing.assert_array_equal(weights, weights.T)
    if window > 2 * overlap_px:
        assert weights[window // 2, window // 2] == 1
    if overlap_px == 0:
        assert (weights == 1).all()


def test_weights_taper_towards_the_border() -> None:
    profile = blend_weights(64, 16)[32]
    assert (np.diff(profile[:17]) > 0).all() and (profile[16:48] == 1).all()
    with pytest.raises(ValueError, match="window must be >= 1"):
        blend_weights(0, 0)
    with pytest.raises(ValueError, match="overlap_px must be >= 0"):
        blend_weights(16, -1)


@settings(deadline=None, max_examples=50)
@given(plans, st.sampled_from([1, 3]))
def test_constant_field_is_reproduced(plan: TilePlan, channels: int) -> None:
    constants = np.linspace(-3, 5, channels, dtype=np.float32)[:, None, None]
    image = np.zeros((channels, plan.raster_height, plan.raster_width), np.float32)

    def constant(window: Window, x: np.ndarray) -> tuple[np.ndarray, None]:
        return np.broadcast_to(constants, x.shape), None

    out, _, _ = run(plan, image, constant)
    np.testing.assert_allclose(out, np.broadcast_to(constants, out.shape), rtol=1e-6)


@settings(deadline=None, max_examples=50)
@given(plans, st.sampled_from([1, 2]), st.integers(0, 2**32 - 1))
def test_identity_model_reproduces_the_image_and_strips_cover_rows_once(
    plan: TilePlan, channels: int, seed: int
) -> None:
    shape = (channels, plan.raster_height, plan.raster_width)
    image = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    out, strips, stitcher = run(plan, image, identity)
    np.testing.assert_allclose(out, image, atol=1e-5)
    # Strips come once each, in order, and tile the rows exactly.
    assert strips[0][0] == 0
    assert all(r0 + n == r1 for (r0, n), (r1, _) in pairwise(strips))
    assert sum(n for _, n in strips) == plan.raster_height
    assert stitcher.pop_ready() == [] and stitcher.done


@settings(deadline=None, max_examples=50)
@given(
    st.builds(plan_tiles, sizes, sizes, windows, st.sampled_from([0.25, 0.5])),
    st.integers(0, 2**32 - 1),
)
def test_box_filter_model_matches_the_whole_image_result(plan: TilePlan, seed: int) -> None:
    """A translation-equivariant model, with each window's wrong border pixels marked invalid."""
    image = np.random.default_rng(seed).uniform(size=(1, plan.raster_height, plan.raster_width))
    image = image.astype(np.float32)
    h_img, w_img = plan.raster_height, plan.raster_width

    def model(window: Window, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Inside a window a 3x3 filter sees zeros past the window's edge: right only where that
        # edge is the raster's edge (the zero padding of the whole-image result).
        valid = np.zeros(x.shape[1:], dtype=bool)
        top = 0 if window.row_off == 0 else 1
        left = 0 if window.col_off == 0 else 1
        bottom = window.height if window.row_end == h_img else window.height - 1
        right = window.width if window.col_end == w_img else window.width - 1
        valid[top:bottom, left:right] = True
        return box3(x), valid

    out, _, _ = run(plan, image, model)
    np.testing.assert_allclose(out, box3(image), atol=1e-5)


@pytest.mark.parametrize("height", [16, 500, 5000])
def test_buffer_rows_do_not_grow_with_raster_height(height: int) -> None:
    plan = plan_tiles(height, 40, 16, overlap=0.25)
    image = np.zeros((1, height, 40), np.float32)
    _, _, stitcher = run(plan, image, identity)
    assert stitcher.buffer_rows == 16
    assert stitcher._acc.shape[1] == 16
    assert stitcher._wsum is None  # all windows valid: the weight sum comes from the plan
    assert stitcher.peak_held_rows <= plan.window + plan.stride


def test_windows_out_of_order_raise() -> None:
    plan = plan_tiles(40, 40, 16, overlap=0.25)
    logits = np.zeros((2, 16, 16), np.float32)
    stitcher = RollingStitcher(plan, channels=2)
    with pytest.raises(ValueError, match="out of the plan's order"):
        stitcher.add(plan.windows[1], logits)
    stitcher.add(plan.windows[0], logits)
    with pytest.raises(ValueError, match="out of the plan's order"):
        stitcher.add(plan.windows[0], logits)
    with pytest.raises(ValueError, match="windows were never added"):
        stitcher.flush()
    for window in plan.windows[1:]:
        stitcher.add(window, logits)
    with pytest.raises(ValueError, match="already added"):
        stitcher.add(plan.windows[-1], logits)


def test_bad_shapes_and_arguments_raise() -> None:
    plan = plan_tiles(40, 40, 16)
    stitcher = RollingStitcher(plan, channels=2)
    with pytest.raises(ValueError, match="logits has shape"):
        stitcher.add(plan.windows[0], np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="valid has shape"):
        stitcher.add(plan.windows[0], np.zeros((2, 16, 16)), np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="channels must be >= 1"):
        RollingStitcher(plan, channels=0)
    with pytest.raises(ValueError, match="floating"):
        RollingStitcher(plan, channels=1, dtype=np.int32)


def test_pixels_without_weight_get_the_fill_value_without_warnings() -> None:
    plan = plan_tiles(10, 12, 16)  # one padded window
    stitcher = RollingStitcher(plan, channels=1)
    valid = np.ones((16, 16), bool)
    valid[2:4] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stitcher.add(plan.windows[0], np.ones((1, 16, 16), np.float32), valid)
        ((row_off, strip),) = stitcher.flush()
    assert row_off == 0 and strip.shape == (1, 10, 12)
    assert np.isnan(strip[:, 2:4]).all()
    np.testing.assert_array_equal(np.delete(strip, [2, 3], axis=1), 1)


@settings(deadline=None, max_examples=40)
@given(plans, st.integers(0, 2**32 - 1))
def test_view_strips_equal_copied_strips_and_hold_only_the_ring(plan: TilePlan, seed: int) -> None:
    image, model = nodata_box3(plan, seed)
    want, want_strips, _ = run(plan, image, model)
    image, model = nodata_box3(plan, seed)  # the same random validity masks again
    got, strips, stitcher = run(plan, image, model, copy_strips=False)
    np.testing.assert_array_equal(got, want)
    assert strips == want_strips
    assert stitcher.peak_held_rows == stitcher.buffer_rows  # no copies: the ring only


@settings(deadline=None, max_examples=40)
@given(plans, st.integers(2, 9), st.integers(0, 2**32 - 1))
def test_view_strips_not_popped_before_the_next_add_are_copied_not_lost(plan: TilePlan, every: int,
                                                                         seed: int) -> None:
    """A caller that pops only every few windows (across band ends) still gets every row right."""
    image, model = nodata_box3(plan, seed)
    want, want_strips, _ = run(plan, image, model)
    image, model = nodata_box3(plan, seed)
    got, strips, _ = run(plan, image, model, copy_strips=False, pop_every=every)
    np.testing.assert_array_equal(got, want)
    assert strips == want_strips


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 70), w=st.integers(1, 70), window=st.integers(4, 24), overlap=st.sampled_from([0.0, 0.25, 0.5]),
       bad_from=st.integers(0, 40), copy=st.booleans(), seed=st.integers(0, 10_000))
def test_weight_sum_from_the_plan_is_bitwise_the_kept_one(h, w, window, overlap, bad_from, copy, seed) -> None:
    """Until a window brings invalid pixels the stitcher keeps no weight-sum buffer and recomputes
    it from the plan; the outputs are bitwise those of keeping it from the start (forced here by an
    invalid pixel in the first window), before and after the switch at window ``bad_from``."""
    plan = plan_tiles(h, w, window, overlap=overlap)
    rng = np.random.default_rng(seed)
    logits = [rng.normal(size=(2, window, window)).astype(np.float32) for _ in plan.windows]
    masks = []
    for i in range(len(plan.windows)):
        m = np.ones((window, window), bool)
        if i >= bad_from:
            m[rng.integers(0, window), rng.integers(0, window)] = False
        masks.append(m)

    def stitch(force_kept: bool):
        st_ = RollingStitcher(plan, channels=2, copy_strips=copy)
        if force_kept:
            st_._start_wsum()
        out = np.full((2, h, w), -1.0, np.float32)
        for win, lg, m in zip(plan.windows, logits, masks):
            st_.add(win, lg, m)
            for r0, strip in st_.pop_ready():
                out[:, r0:r0 + strip.shape[1]] = strip
        for r0, strip in st_.flush():
            out[:, r0:r0 + strip.shape[1]] = strip
        return out

    a, b = stitch(False), stitch(True)
    assert np.array_equal(a, b, equal_nan=True)
