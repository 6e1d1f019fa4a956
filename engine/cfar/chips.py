"""Chips around boxes, for the learned scorer of CFAR proposals (``detect.cfar_scored``).

The chip of a box (x0, y0, x1, y1; pixel edges) is the square of side ``chip_sides`` centred on
it (three times its longer side plus a margin, clipped to [MIN_SIDE, MAX_SIDE] px), resampled to
``size`` x ``size`` pixels by bilinear interpolation at the cell centres: sample (a, b) of a chip of
side s centred at (cy, cx) reads the raster at row cy - s/2 + (a + 0.5) s/size (pixel edges; array
index = that - 0.5). Values are in normalised log intensity: 10 log10 of linear power minus the
chip's median over its valid samples, divided by ``DB_SCALE`` and clipped, so a chip does not depend
on the scene's calibration or gain (nodata samples take the median, 0). ``read_chips`` reads a
raster by strips of rows (memory flat in its height) through ``engine.reader.SarRaster`` and
converts each chip's square only, with the same conversion to linear power as CFAR (dB and
amplitude converted; negative 'linear' refused).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

MIN_SIDE, MAX_SIDE, MARGIN = 48.0, 256.0, 16.0  # chip side in px: clip(3 * longer side + MARGIN)
DB_SCALE, CLIP = 10.0, (-3.0, 6.0)  # (dB - median) / 10, clipped


def chip_sides(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) boxes -> (n,) chip sides in px."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    longer = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    return np.clip(3.0 * longer + MARGIN, MIN_SIDE, MAX_SIDE)


def chip_geometry(boxes: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """(n, 3) float32: log2 of the box's width and height (px, at least 1) and of the chip's side."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    w, h = np.maximum(b[:, 2] - b[:, 0], 1.0), np.maximum(b[:, 3] - b[:, 1], 1.0)
    return np.log2(np.stack([w, h, np.asarray(sides, np.float64)], 1)).astype(np.float32)


def sample_chips(db: np.ndarray, valid: np.ndarray, row0: int, boxes: np.ndarray, sides: np.ndarray,
                 size: int, col0: int = 0) -> np.ndarray:
    """Chips (n, 1, size, size) float32 from ``db`` (h, w: 10 log10 power of rows row0..row0 + h and
    columns col0..col0 + w of the raster) and its ``valid`` mask; boxes in raster pixels (outside
    ``db``, its edge values are repeated and the samples count as nodata)."""
    n = len(boxes)
    if n == 0:
        return np.zeros((0, 1, size, size), np.float32)
    b = np.asarray(boxes, np.float64)
    cx, cy = (b[:, 0] + b[:, 2]) / 2 - col0, (b[:, 1] + b[:, 3]) / 2 - row0
    t = (np.arange(size) + 0.5) / size - 0.5  # cell centres in units of the side, centred
    ys = (cy[:, None] + sides[:, None] * t[None]) - 0.5  # (n, size) array coordinates
    xs = (cx[:, None] + sides[:, None] * t[None]) - 0.5
    yy = np.broadcast_to(ys[:, :, None], (n, size, size)).ravel()
    xx = np.broadcast_to(xs[:, None, :], (n, size, size)).ravel()
    fill = float(np.median(db[valid])) if valid.any() else 0.0
    vals = ndi.map_coordinates(np.where(valid, db, fill).astype(np.float32), [yy, xx], order=1, mode="nearest")
    ok = ndi.map_coordinates(valid.astype(np.float32), [yy, xx], order=0, mode="constant", cval=0.0) > 0.5
    vals, ok = vals.reshape(n, size * size), ok.reshape(n, size * size)
    med = np.array([np.median(v[o]) if o.any() else 0.0 for v, o in zip(vals, ok)], np.float32)
    out = np.where(ok, (vals - med[:, None]) / DB_SCALE, 0.0)
    return np.clip(out, *CLIP).astype(np.float32).reshape(n, 1, size, size)


def box_masks(boxes: np.ndarray, sides: np.ndarray, size: int) -> np.ndarray:
    """(n, 1, size, size) float32: the share of each chip cell (the chips of ``sample_chips``: side
    ``sides`` centred on each box) that lies inside the box (its outline to a fraction of a cell)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    s = np.asarray(sides, np.float64)[:, None]
    edges = (np.arange(size) / size - 0.5)[None, :] * s  # cells' low edges, relative to the centre
    step = s / size

    def cover(lo, hi):  # (n, size): overlap of [lo, hi] with each cell, in cells
        return np.clip(np.minimum(hi[:, None], edges + step) - np.maximum(lo[:, None], edges), 0, None) / step

    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    cols, rows = cover(b[:, 0] - cx, b[:, 2] - cx), cover(b[:, 1] - cy, b[:, 3] - cy)
    return (rows[:, :, None] * cols[:, None, :]).astype(np.float32)[:, None]


def scorer_chips(raster, units: str, boxes: np.ndarray, head, source: str, given_units: bool = False) -> np.ndarray:
    """What a chip scorer of config ``head`` reads for ``boxes``: their chips, plus the box channel
    when the scorer has one."""
    chips = read_chips(raster, units, boxes, head.chip, source, given_units)
    if not getattr(head, "box_channel", False):
        return chips
    return np.concatenate([chips, box_masks(boxes, chip_sides(boxes), head.chip)], 1)


def to_db(power: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """10 log10 of linear power (floored at 1e-10) where valid, else 0."""
    return np.where(valid, 10.0 * np.log10(np.maximum(power, 1e-10)), 0.0).astype(np.float32)


def read_chips(raster, units: str, boxes: np.ndarray, size: int, source: str, given_units: bool = False,
               block_rows: int = 512) -> np.ndarray:
    """Chips (n, 1, size, size) around ``boxes`` (raster pixels) of an open ``SarRaster`` whose values
    are in ``units`` (as ``engine.cfar.scene.source_units`` says), read by strips of boxes' centre rows."""
    from engine.tiling import Window

    from .scene import to_power

    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = np.zeros((len(b), 1, size, size), np.float32)
    if not len(b):
        return out
    sides = chip_sides(b)
    cy = (b[:, 1] + b[:, 3]) / 2
    for r0 in range(0, raster.height, block_rows):
        sel = np.flatnonzero((cy >= r0) & (cy < r0 + block_rows) if r0 + block_rows < raster.height else cy >= r0)
        if not len(sel):
            continue
        lo = int(max(0, np.floor((cy[sel] - sides[sel] / 2).min()) - 2))
        hi = int(min(raster.height, np.ceil((cy[sel] + sides[sel] / 2).max()) + 2))
        x, valid = raster.read(Window(lo, 0, hi - lo, raster.width))
        for i in sel:  # each chip's square only: no conversion of the whole strip
            r0, r1 = _span(cy[i], sides[i], lo, hi)
            cx = (b[i, 0] + b[i, 2]) / 2
            c0, c1 = _span(cx, sides[i], 0, raster.width)
            v = valid[r0 - lo:r1 - lo, c0:c1]
            power = to_power(x[0, r0 - lo:r1 - lo, c0:c1], v, units, given_units, source)
            out[i] = sample_chips(to_db(power, v), v, r0, b[i:i + 1], sides[i:i + 1], size, c0)[0]
    return out


def _span(centre: float, side: float, lo: int, hi: int) -> tuple[int, int]:
    """The pixels [start, end) within [lo, hi) that a chip of ``side`` centred at ``centre`` samples."""
    return (int(min(max(lo, np.floor(centre - side / 2) - 2), hi - 1)),
            int(max(min(hi, np.ceil(centre + side / 2) + 2), lo + 1)))
