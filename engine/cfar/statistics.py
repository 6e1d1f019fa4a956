"""CFAR statistics on linear power, vectorised: the ring's mean (CA) or order statistic (OS), the
threshold factor for a false-alarm probability, and the per-pixel detection decision.

Cell averaging: with ``n`` valid ring cells of sum ``S`` (box sums of the background window minus
those of the guard window, over valid pixels only, so nodata and land never enter the statistics),
a pixel ``x`` is detected when ``x > T(n) S / n``. For clutter of ``L`` looks (gamma, exponential
when L = 1) ``x / (x + S)`` follows Beta(L, nL), so ``T(n) = n q / (1 - q)`` with
``q = Beta(L, nL).isf(pfa)`` (L = 1: ``T = n (pfa^(-1/n) - 1)``). Vertical box sums come from one
float64 cumulative sum shared by both windows, horizontal ones from ``scipy.ndimage.uniform_filter1d``.

Order statistic: the ring's ``os_rank`` quantile on a coarse grid (``order``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy import stats

from .config import CfarConfig, CfarPixels


def ca_factor(n: np.ndarray | int, pfa: float, enl: float = 1.0) -> np.ndarray:
    """CA-CFAR factor ``T(n)``: ``P(x > T * mean of n ring cells) = pfa`` on gamma clutter of ``enl`` looks."""
    n = np.maximum(np.asarray(n, np.float64), 1.0)
    q = stats.beta.isf(pfa, enl, n * enl)
    return n * q / (1.0 - q)


@dataclass
class CfarMap:
    """What a CFAR pass over one array found: ``detected`` (h, w) bool, ``ratio`` (h, w) float32
    (x over the detection threshold at detected pixels, 0 elsewhere), ``tested_rows`` (h,) the pixels
    of each row with enough valid background to be tested, ``stride`` (OS cell side, 1 for CA)."""

    detected: np.ndarray
    ratio: np.ndarray
    tested_rows: np.ndarray
    stride: int = 1

    @property
    def tested(self) -> int:
        return int(self.tested_rows.sum())


COLUMN_BLOCK = 1024  # columns of the float64 running sum at once (~6 MB for 700 rows: reused, cache-sized)


def _box_sums(a: np.ndarray, halves: list[tuple[int, int]]) -> list[np.ndarray]:
    """Sums of ``a`` (h, w) over (2hy+1) x (2hx+1) boxes centred on each pixel, zeros outside;
    float32 out. Vertically from a float64 cumulative sum down the rows shared by every box, built
    row by row over blocks of columns (whole-row adds stream through memory; ``np.cumsum(axis=0)``
    walks columns and runs ~30x slower, and a small block stays in cache and is never page-faulted
    anew); horizontally with ``scipy.ndimage.uniform_filter1d`` along rows."""
    h, w = a.shape
    pad = max(hy for hy, _ in halves)
    out = [np.empty((h, w), np.float32) for _ in halves]
    buf = np.empty((h + 2 * pad + 1, min(w, COLUMN_BLOCK)), np.float64)  # buf[j] = cumsum of rows < j - pad
    for c0 in range(0, w, COLUMN_BLOCK):
        c1 = min(w, c0 + COLUMN_BLOCK)
        b = buf[:, : c1 - c0]
        b[: pad + 1] = 0.0
        for i in range(h):
            np.add(b[pad + i], a[i, c0:c1], out=b[pad + 1 + i])
        b[pad + 1 + h:] = b[pad + h]
        for (hy, _), v in zip(halves, out):
            np.subtract(b[pad + hy + 1: pad + hy + 1 + h], b[pad - hy: pad - hy + h], out=v[:, c0:c1], casting="unsafe")
    for (_, hx), v in zip(halves, out):
        ndi.uniform_filter1d(v, 2 * hx + 1, axis=1, mode="constant", cval=0.0, output=v)
        v *= 2 * hx + 1
    return out


def _edge_counts(n: int, half: int) -> np.ndarray:
    """Cells of a 2*half+1 window centred on each of n positions that lie inside 0..n-1."""
    i = np.arange(n)
    return (np.minimum(i + half, n - 1) - np.maximum(i - half, 0) + 1).astype(np.float32)


def _tested_rows(shape: tuple[int, int], px: CfarPixels, nmin: float) -> np.ndarray:
    """Per row, the pixels whose full-data ring has at least ``nmin`` cells (no nodata): the count
    depends on the row's edge counts only, so one pass per distinct pair of them."""
    (gy, gx), (by, bx) = px.guard, px.background
    h, w = shape
    ebx, egx = _edge_counts(w, bx), _edge_counts(w, gx)
    pairs, inv = np.unique(np.stack([_edge_counts(h, by), _edge_counts(h, gy)], 1), axis=0, return_inverse=True)
    per = np.array([int(((b * ebx - g * egx) >= nmin).sum()) for b, g in pairs], np.int64)
    return per[inv.ravel()]


def _counts_at(flat: np.ndarray, shape: tuple[int, int], px: CfarPixels) -> np.ndarray:
    """Ring cells (no nodata) at flat indexes of an array of ``shape``, float64."""
    (gy, gx), (by, bx) = px.guard, px.background
    rows, cols = np.divmod(flat, shape[1])
    h, w = shape
    return (_edge_counts(h, by)[rows].astype(np.float64) * _edge_counts(w, bx)[cols]
            - _edge_counts(h, gy)[rows].astype(np.float64) * _edge_counts(w, gx)[cols])


def ring_counts(valid: np.ndarray, px: CfarPixels, all_valid: bool) -> np.ndarray:
    """Valid cells in each pixel's ring (h, w) float32; an outer product of edge counts when all valid."""
    (gy, gx), (by, bx) = px.guard, px.background
    if all_valid:
        h, w = valid.shape
        nb = _edge_counts(h, by)[:, None] * _edge_counts(w, bx)[None, :]
        return nb - _edge_counts(h, gy)[:, None] * _edge_counts(w, gx)[None, :]
    nb, ng = _box_sums(valid.astype(np.float32), [(by, bx), (gy, gx)])
    nb -= ng
    return np.rint(nb, out=nb)


def ring_sums(power: np.ndarray, valid: np.ndarray, px: CfarPixels, all_valid: bool, square: bool = False):
    """Sum of the valid ring cells' power (and of its square when ``square``), (h, w) float32."""
    x = power if all_valid else np.where(valid, power, np.float32(0))
    (gy, gx), (by, bx) = px.guard, px.background
    sb, sg = _box_sums(x, [(by, bx), (gy, gx)])
    sb -= sg
    if not square:
        return sb, None
    qb, qg = _box_sums(x * x, [(by, bx), (gy, gx)])
    qb -= qg
    return sb, qb


def cfar_map(power: np.ndarray, valid: np.ndarray, cfg: CfarConfig, px: CfarPixels) -> CfarMap:
    """Per-pixel CFAR decision on linear power (h, w) float32 with its valid mask (h, w) bool.

    For OS the array's first row and column must lie on the global cell grid (a multiple of
    ``order.os_grid(...).cell`` from the raster's origin) for strips to match the whole array.
    """
    all_valid = bool(valid.all())
    nmin = cfg.min_background * px.ring_cells - 0.5
    if all_valid:  # counts from edge counts: no (h, w) array; computed at candidates only
        n, ok, tested = None, None, _tested_rows(power.shape, px, nmin)
    else:
        n = ring_counts(valid, px, False)
        ok = valid & (n >= nmin)
        tested = ok.sum(axis=1)
    stride = 1
    if cfg.method == "ca" and cfg.pfa is not None:
        s, _ = ring_sums(power, valid, px, all_valid)
        # T(n) / n falls with n: x > T(N) / N * S (N the full ring) is a necessary condition, one pass
        pre = np.multiply(s, np.float32(ca_factor(px.ring_cells, cfg.pfa, cfg.enl) / px.ring_cells))
        pre_b = power > pre
        del pre
        if ok is not None:
            pre_b &= ok
        cand = np.flatnonzero(pre_b)
        nc = _counts_at(cand, power.shape, px) if n is None else n.flat[cand].astype(np.float64)
        cand, nc = cand[nc >= nmin], nc[nc >= nmin]
        level = ca_factor(nc, cfg.pfa, cfg.enl) * s.flat[cand] / nc
    else:
        if n is None:
            n = ring_counts(valid, px, True)
            ok = n >= nmin
        if cfg.method == "ca":  # k-sigma
            s, q = ring_sums(power, valid, px, all_valid, square=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = s / n
                std = np.sqrt(np.maximum(q / n - mean * mean, 0.0))
                lvl = mean + np.float32(cfg.k_sigma) * std
            cand = np.flatnonzero(ok & (power > lvl))
            level = lvl.flat[cand].astype(np.float64)
        else:
            from .order import os_factor, os_grid, os_level

            grid = os_grid(cfg, px)
            stride = grid.cell
            lvl = os_level(power, valid, all_valid, grid)
            t = os_factor(len(grid.offsets), grid.rank + 1, float(cfg.pfa), float(cfg.enl))
            cand = np.flatnonzero(ok & (power > np.float32(t) * lvl))
            level = t * lvl.flat[cand].astype(np.float64)
    x = power.flat[cand].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(level > 0, x / level, np.inf)
    keep = r > 1.0
    detected = np.zeros(power.shape, bool)
    detected.flat[cand[keep]] = True
    ratio = np.zeros(power.shape, np.float32)  # calloc'd: only the pages of detections are touched
    ratio.flat[cand[keep]] = np.minimum(r[keep], np.finfo(np.float32).max)
    return CfarMap(detected, ratio, tested, stride)
