"""Sliding-window tiling: cut a raster into model-sized windows (pure integer geometry).

A raster of ``height x width`` pixels is covered by square windows of the model's input size.
Windows overlap so that the stitcher (``engine.stitching``) can blend away the seams; the last
window of each axis is shifted back inside the raster instead of running off its edge, so every
window is read fully from the file and only rasters smaller than one window need padding.

Nothing here reads pixels: the reader turns a ``Window`` into a rasterio window with
``rasterio.windows.Window(w.col_off, w.row_off, w.width, w.height)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby


@dataclass(frozen=True)
class Window:
    """Raster pixels ``[row_off, row_off + height) x [col_off, col_off + width)``, numpy order.

    Attributes:
        row_off: First row of the window.
        col_off: First column of the window.
        height: Number of rows.
        width: Number of columns.
    """

    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def row_end(self) -> int:
        """One past the last row (``row_off + height``)."""
        return self.row_off + self.height

    @property
    def col_end(self) -> int:
        """One past the last column (``col_off + width``)."""
        return self.col_off + self.width

    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices, so that ``array[..., *window.slices()]`` is the window."""
        return slice(self.row_off, self.row_end), slice(self.col_off, self.col_end)


@dataclass(frozen=True)
class TilePlan:
    """The windows covering one raster, in row-major order (one row band after the other).

    Attributes:
        raster_height: Rows of the raster.
        raster_width: Columns of the raster.
        window: Model input size in pixels (square).
        stride: Distance between the starts of neighbouring windows (before the last shift).
        row_starts: Distinct ``row_off`` of the windows, increasing (one per row band).
        col_starts: Distinct ``col_off`` of the windows, increasing (the same in every band).
        windows: Every window, ``len(row_starts) * len(col_starts)`` of them, row-major.
        pad_bottom: Rows of padding appended below each window to reach ``window`` rows
            (``window - raster_height`` if the raster is shorter than one window, else 0).
        pad_right: Columns of padding appended on the right, likewise.
    """

    raster_height: int
    raster_width: int
    window: int
    stride: int
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]
    windows: tuple[Window, ...]
    pad_bottom: int = 0
    pad_right: int = 0

    @property
    def overlap_px(self) -> int:
        """Nominal overlap of neighbouring windows in pixels (``window - stride``)."""
        return self.window - self.stride

    @property
    def pad(self) -> tuple[int, int]:
        """``(bottom, right)`` padding from a read window to the model input."""
        return self.pad_bottom, self.pad_right


def plan_tiles(
    height: int, width: int, window: int, overlap: float = 0.25, align: int = 1
) -> TilePlan:
    """Plan the windows that cover a ``height x width`` raster.

    Per axis of ``size`` pixels:

    - ``stride = max(1, window - round(window * overlap))`` (Python ``round``: half to even),
      then rounded down to a multiple of ``align``: ``stride = max(align, stride // align * align)``.
      Rounding down only increases the overlap, and ``align <= window`` keeps ``stride <= window``,
      so neighbouring windows always touch or overlap: no pixel is skipped.
    - ``size > window``: starts are ``0, stride, 2 * stride, ...`` below ``size - window``, then
      one last window shifted inside the raster at ``size - window``; that is
      ``n = ceil((size - window) / stride) + 1`` windows of ``window`` pixels. Every start is a
      multiple of ``align`` except, possibly, the shifted last one.
    - ``size <= window``: one window of ``size`` pixels at 0; the model input is padded with
      ``window - size`` pixels at the end of the axis (bottom or right).

    Args:
        height: Raster rows, >= 1.
        width: Raster columns, >= 1.
        window: Model input size (square), >= 1.
        overlap: Fraction of ``window`` shared by neighbouring windows, in ``[0, 1)``.
        align: Window starts are multiples of this (e.g. the patch size 16, so that token grids
            of neighbouring windows line up), ``1 <= align <= window``.

    Returns:
        The plan; its windows are in row-major order, grouped by row band.

    Raises:
        ValueError: If an argument is not an integer where one is needed or is out of range.
    """
    height = _int_at_least("height", height, 1)
    width = _int_at_least("width", width, 1)
    window = _int_at_least("window", window, 1)
    align = _int_at_least("align", align, 1)
    if align > window:
        raise ValueError(f"align ({align}) must not exceed the window size ({window})")
    if (
        isinstance(overlap, bool)
        or not isinstance(overlap, numbers.Real)
        or not math.isfinite(overlap)
        or not 0 <= overlap < 1
    ):
        raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap!r}")

    stride = max(1, window - round(window * overlap))
    stride = max(align, stride // align * align)
    row_starts = _axis_starts(height, window, stride)
    col_starts = _axis_starts(width, window, stride)
    win_h, win_w = min(window, height), min(window, width)
    windows = tuple(Window(r, c, win_h, win_w) for r in row_starts for c in col_starts)
    return TilePlan(
        raster_height=height,
        raster_width=width,
        window=window,
        stride=stride,
        row_starts=row_starts,
        col_starts=col_starts,
        windows=windows,
        pad_bottom=window - win_h,
        pad_right=window - win_w,
    )


def iter_row_bands(plan: TilePlan) -> Iterator[tuple[int, list[Window]]]:
    """Yield ``(band_row_off, windows)`` for each row band of the plan, top to bottom.

    A band is the run of consecutive windows sharing one ``row_off``; a caller can read the
    band's rows once (``row_off`` to ``row_off + window.height``) and process its windows.
    """
    for row_off, band in groupby(plan.windows, key=lambda w: w.row_off):
        yield row_off, list(band)


def _axis_starts(size: int, window: int, stride: int) -> tuple[int, ...]:
    """Window starts along one axis (see ``plan_tiles`` for the formula)."""
    if size <= window:
        return (0,)
    last = size - window
    return (*range(0, last, stride), last)


def _int_at_least(name: str, value: object, minimum: int) -> int:
    """``value`` as an ``int``, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
