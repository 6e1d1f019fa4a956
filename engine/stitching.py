"""Weighted blending of overlapping window logits into a raster, in a rolling buffer of rows.

Each window of a ``TilePlan`` yields logits ``(C, window, window)``; where windows overlap, the
output is the weighted mean ``sum_i(w_i * logits_i) / sum_i(w_i)`` with ``w_i`` from
``blend_weights``, which favours each window's centre over its border, where a model sees the
least context. Rows are handed out as soon as no later window of the plan can touch them, so the
memory grows with the raster's width, never with its area.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
from numpy.typing import DTypeLike

from engine.tiling import TilePlan, Window, iter_row_bands


def blend_weights(window: int, overlap_px: int, floor: float = 1e-3) -> np.ndarray:
    """Separable blending weights for one ``window x window`` model output.

    With ``d = min(i, window - 1 - i)`` the distance of pixel ``i`` to the nearest border, the
    1-D profile is a raised-cosine ramp over the ``overlap_px`` border pixels::

        p(d) = max(floor, 0.5 - 0.5 * cos(pi * (d + 0.5) / overlap_px))   if d < overlap_px
        p(d) = 1                                                          otherwise

    and the weight is ``W[i, j] = p(i) * p(j)``. It is symmetric under flips and transposition,
    1 in the middle, and never below ``floor ** 2``, so that pixels covered by a single window
    (at the raster's edges) still get their value. ``overlap_px = 0`` gives all ones.

    Args:
        window: Model input size, >= 1.
        overlap_px: Length of the taper in pixels, >= 0 (usually ``plan.overlap_px``).
        floor: Smallest value of the 1-D profile, in ``(0, 1]``.

    Returns:
        ``(window, window)`` float32 weights in ``(0, 1]``.

    Raises:
        ValueError: If an argument is out of range.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if overlap_px < 0:
        raise ValueError(f"overlap_px must be >= 0, got {overlap_px}")
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1], got {floor}")
    d = np.minimum(np.arange(window), np.arange(window)[::-1]).astype(np.float64)
    profile = np.ones(window)
    if overlap_px > 0:
        ramp = 0.5 - 0.5 * np.cos(math.pi * (d + 0.5) / overlap_px)
        profile = np.where(d < overlap_px, np.maximum(ramp, floor), 1.0)
    return np.outer(profile, profile).astype(np.float32)


class RollingStitcher:
    """Blend window logits, arriving in the plan's row-major order, into strips of full rows.

    The accumulators are a ring of ``R = min(window, raster_height)`` rows: raster row ``r``
    lives in ring row ``r % R``. When the last window of a row band has been added, every row
    above the next band's ``row_off`` is final (no later window starts higher): those rows are
    divided by their summed weight, copied out as a strip (at most ``stride`` rows) and their
    ring rows zeroed for reuse. The final band's rows are normalised in place and handed out as
    views of the ring, which is never written again.

    Peak memory, for ``C`` channels, raster width ``W``, ``itemsize`` bytes (4 for float32), if
    ``pop_ready`` is called after every ``add``::

        itemsize * W * (C * R + C * stride + 32)  +  O(C * window**2) per window

    i.e. ``window + stride`` rows of width ``W``, independent of the raster's height. The
    weight sum ``sum(w)`` is a function of the plan while every window is valid: it is then
    recomputed for the rows being finalised, 32 at a time, by the same float additions in the
    same order (bitwise what a kept buffer would hold). The first window with invalid pixels
    starts an explicit ``R``-row buffer for it (``(C + 1) * R`` rows from then on).
    ``held_rows`` and ``peak_held_rows`` report that row count. Strips that are not popped stay
    held, so a caller that never pops holds the whole raster.

    With ``copy_strips=False`` the strips are views of the ring, valid until the next ``add``
    (their ring rows are zeroed then; strips not popped by then are copied first, so none is ever
    lost): a caller that writes each strip before adding the next window saves the ``C * stride``
    rows of copies, and holds ``itemsize * W * C * R`` (``window`` rows; ``(C + 1) * R`` with nodata).

    Example::

        stitcher = RollingStitcher(plan, channels=C)
        for window in plan.windows:
            stitcher.add(window, model(read(window)))      # (C, window, window)
            for row_off, strip in stitcher.pop_ready():    # (C, rows, W)
                write(row_off, strip)
        for row_off, strip in stitcher.flush():
            write(row_off, strip)
    """

    def __init__(
        self,
        plan: TilePlan,
        channels: int,
        dtype: DTypeLike = np.float32,
        fill_value: float = float("nan"),
        copy_strips: bool = True,
    ) -> None:
        """Allocate the ring buffer.

        Args:
            plan: The plan whose windows will be added, in its order.
            channels: Logit channels ``C``, >= 1.
            dtype: Floating dtype of the buffers and strips.
            fill_value: Output value where no weight was added (every window marked the pixel
                invalid), instead of dividing by zero.
            copy_strips: False: hand out strips as views of the ring, valid until the next
                ``add`` (see the class notes).

        Raises:
            ValueError: If ``channels`` or ``dtype`` is invalid, or the plan's windows are not
                in row-major band order.
        """
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"dtype must be a floating type, got {self.dtype}")
        self.plan = plan
        self.channels = channels
        self.fill_value = fill_value
        self.buffer_rows = min(plan.window, plan.raster_height)  # R, ring rows
        width = plan.raster_width
        self._acc = np.zeros((channels, self.buffer_rows, width), self.dtype)  # sum(w * logit)
        # sum(w): kept only once a window brings invalid pixels. Until then it is a function of the
        # plan alone and is recomputed for the rows being finalised, a few rows at a time, with the
        # same float additions in the same order (bitwise the same result): one ring of width W less.
        self._wsum: np.ndarray | None = None
        self._weights = blend_weights(plan.window, plan.overlap_px).astype(self.dtype)
        self._band_windows: list[tuple[int, int, int, int]] = []  # (row_off, row_end, first, stop) indexes

        # Index of a band's last window -> rows above this one are final once it is added.
        bands = [(row_off, len(ws)) for row_off, ws in iter_row_bands(plan)]
        if any(a[0] >= b[0] for a, b in pairwise(bands)):
            raise ValueError("the plan's windows are not in row-major order of row bands")
        self._final_after: dict[int, int] = {}
        last = -1
        for k, (row_off, count) in enumerate(bands):
            height = plan.windows[last + 1].height
            self._band_windows.append((row_off, row_off + height, last + 1, last + 1 + count))
            last += count
            self._final_after[last] = bands[k + 1][0] if k + 1 < len(bands) else plan.raster_height

        self._next = 0  # index in plan.windows of the next window expected
        self._lo = 0  # first raster row not yet final; the ring holds rows [_lo, _lo + R)
        self._ready: list[tuple[int, np.ndarray]] = []
        self._ready_copied_rows = 0  # rows of ready strips not backed by the ring
        self.copy_strips = copy_strips
        self._to_zero: list[slice] = []  # ring rows handed out as views, zeroed at the next add
        self.peak_held_rows = self.buffer_rows

    @property
    def held_rows(self) -> int:
        """Rows of width ``W`` held now: the ring plus ready strips that were copied out."""
        return self.buffer_rows + self._ready_copied_rows

    @property
    def done(self) -> bool:
        """Whether every window of the plan has been added."""
        return self._next == len(self.plan.windows)

    def add(self, window: Window, logits: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Accumulate one window's logits.

        Args:
            window: The next window of the plan (windows must come in the plan's order).
            logits: ``(C, window.height, window.width)``, or ``(C, plan.window, plan.window)``
                for a padded model input, which is cropped to the window.
            valid: Optional boolean mask of the same spatial shape as ``logits``; pixels marked
                False (nodata, unreliable borders) get zero weight from this window.

        Raises:
            ValueError: If the window is not the next one of the plan, or a shape is wrong.
        """
        windows = self.plan.windows
        if self._next >= len(windows):
            raise ValueError(f"all {len(windows)} windows of the plan were already added")
        expected = windows[self._next]
        if window != expected:
            raise ValueError(
                f"window {window} is out of the plan's order: expected {expected} "
                f"(window {self._next} of {len(windows)})"
            )
        h, w = window.height, window.width
        logits = self._crop(np.asarray(logits), "logits", (self.channels,))
        weight = self._weights[:h, :w]
        mask = None if valid is None else self._crop(np.asarray(valid, dtype=bool), "valid", ())
        if window.row_off < self._lo or window.row_end > self._lo + self.buffer_rows:
            raise ValueError(f"window {window} does not fit the rolling buffer (inconsistent plan)")

        self._release_views()  # before _start_wsum: it zeroes recycled ring rows
        if mask is not None and not mask.all():
            weight = weight * mask
            if self._wsum is None:
                self._start_wsum()
        cols = window.slices()[1]
        for row_off, ring in self._ring_pieces(window.row_off, window.row_end):
            k = slice(row_off - window.row_off, row_off - window.row_off + ring.stop - ring.start)
            self._acc[:, ring, cols] += logits[:, k] * weight[k]
            if self._wsum is not None:
                self._wsum[ring, cols] += weight[k]

        final = self._final_after.get(self._next)
        self._next += 1
        if final is not None:
            self._finalize(final, in_place=self.done)

    def pop_ready(self) -> list[tuple[int, np.ndarray]]:
        """Take the strips finished so far.

        Returns:
            ``(row_off, strip)`` pairs, strips ``(C, rows, raster_width)``, in row order; over a
            whole run they cover every raster row exactly once.
        """
        ready, self._ready = self._ready, []
        self._ready_copied_rows = 0
        return ready

    def flush(self) -> list[tuple[int, np.ndarray]]:
        """Take the remaining strips once every window has been added.

        Raises:
            ValueError: If some windows of the plan were never added.
        """
        if not self.done:
            missing = len(self.plan.windows) - self._next
            raise ValueError(
                f"{missing} of {len(self.plan.windows)} windows were never added; "
                "the raster is incomplete"
            )
        return self.pop_ready()

    def _crop(self, array: np.ndarray, name: str, lead: tuple[int, ...]) -> np.ndarray:
        """``array`` of shape ``lead + (h, w)`` or ``lead + (window, window)``, cropped to (h, w)."""
        window = self.plan.windows[self._next]
        full = self.plan.window
        shapes = {lead + (window.height, window.width), lead + (full, full)}
        if array.shape not in shapes:
            raise ValueError(
                f"{name} has shape {array.shape}, expected one of {sorted(shapes)} for {window}"
            )
        return array[..., : window.height, : window.width]

    def _ring_pieces(self, start: int, stop: int) -> list[tuple[int, slice]]:
        """Raster rows ``[start, stop)`` as ``(first_row, ring_slice)`` runs (at most two)."""
        pieces = []
        row = start
        while row < stop:
            i = row % self.buffer_rows
            n = min(stop - row, self.buffer_rows - i)
            pieces.append((row, slice(i, i + n)))
            row += n
        return pieces

    def _release_views(self) -> None:
        """Zero the ring rows handed out as views (copying strips nobody popped yet)."""
        if not self._to_zero:
            return
        for i, (row_off, strip) in enumerate(self._ready):
            if np.may_share_memory(strip, self._acc):
                self._ready[i] = (row_off, strip.copy())
                self._ready_copied_rows += strip.shape[1]
        for ring in self._to_zero:
            self._acc[:, ring] = 0
            if self._wsum is not None:
                self._wsum[ring] = 0
        self._to_zero = []
        self.peak_held_rows = max(self.peak_held_rows, self.held_rows)

    def _plan_wsum(self, start: int, stop: int, upto: int) -> np.ndarray:
        """sum(w) over rows ``[start, stop)`` of windows ``plan.windows[:upto]`` (all valid), added
        in the plan's order: what the explicit accumulator would hold there."""
        out = np.zeros((stop - start, self.plan.raster_width), self.dtype)
        windows = self.plan.windows
        for band_start, band_end, first, last in self._band_windows:
            if band_start >= stop or first >= upto:
                break
            if band_end <= start:
                continue
            a, b = max(start, band_start), min(stop, band_end)
            for win in windows[first:min(last, upto)]:
                out[a - start:b - start, win.col_off:win.col_off + win.width] += \
                    self._weights[a - band_start:b - band_start, :win.width]
        return out

    def _start_wsum(self) -> None:
        """The first window with invalid pixels: keep sum(w) explicitly from now on, starting from
        the (all-valid) windows added so far."""
        self._wsum = np.zeros((self.buffer_rows, self.plan.raster_width), self.dtype)
        stop = min(self._lo + self.buffer_rows, self.plan.raster_height)
        for row_off, ring in self._ring_pieces(self._lo, stop):
            self._wsum[ring] = self._plan_wsum(row_off, row_off + ring.stop - ring.start, self._next)

    def _normalise(self, acc: np.ndarray, wsum: np.ndarray) -> None:
        covered = wsum > 0
        np.divide(acc, wsum, out=acc, where=covered)
        acc[:, ~covered] = self.fill_value

    def _finalize(self, until: int, in_place: bool) -> None:
        """Normalise rows ``[_lo, until)`` and queue them as strips."""
        for row_off, ring in self._ring_pieces(self._lo, until):
            acc = self._acc[:, ring]  # view (C, n, W)
            if self._wsum is not None:
                self._normalise(acc, self._wsum[ring])
            else:  # every window so far was valid: sum(w) from the plan, 32 rows at a time
                n = ring.stop - ring.start
                for i in range(0, n, 32):
                    j = min(n, i + 32)
                    self._normalise(acc[:, i:j], self._plan_wsum(row_off + i, row_off + j, self._next))
            if in_place:  # last band: the ring is never written again, hand out views
                self._ready.append((row_off, acc))
                continue
            if not self.copy_strips:  # a view until the next add, which zeroes these rows
                self._ready.append((row_off, acc))
                self._to_zero.append(ring)
                continue
            self._ready.append((row_off, acc.copy()))
            self._ready_copied_rows += ring.stop - ring.start
            acc[...] = 0
            if self._wsum is not None:
                self._wsum[ring] = 0
        self._lo = until
        self.peak_held_rows = max(self.peak_held_rows, self.held_rows)
