"""Order-statistic CFAR: the ring's ``os_rank`` quantile on a coarse grid, and its threshold factor.

A dense rank filter costs the ring's size (~1500 cells for a 41 px window) per pixel. Instead the
ring is sampled every ``d`` px (``os_stride``; auto: about a third of the guard window) and the
quantile is computed once per CELL of ``D = m d`` px (m = 3; m = 1 when ``os_stride`` is 1, the
exact per-pixel filter), at the cell's centre sample, by ``np.partition`` over the ring samples
gathered with strided slices: ~n_samples / D^2 operations per pixel (~2 for the defaults). Every
pixel of a cell takes the cell's level (the background statistic varies over the background
window's scale, not the cell's). The guard, in samples, is widened so that no ring sample falls in
the guard window of ANY pixel of the cell: then each pixel's test still uses only clutter outside
its own guard, and ``pfa`` holds exactly on homogeneous clutter (the samples are still i.i.d.).

Cells lie on a grid anchored at the raster's origin: strips start on multiples of ``D`` so that
they match the whole array. Nodata / land samples are left out of the ranking (``os_level``).

The factor solves ``pfa = E[P(x > T Y_k)]`` with ``Y_k`` the k-th of ``N`` ring samples (gamma
clutter of ``enl`` looks), by root finding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

from .config import CfarConfig, CfarPixels

CHUNK = 1 << 22  # ring samples x cells gathered at once (16 MB of float32)


@lru_cache(maxsize=64)
def os_factor(n: int, k: int, pfa: float, enl: float = 1.0) -> float:
    """OS-CFAR factor: ``P(x > T * Y_k) = pfa``, ``Y_k`` the k-th smallest of ``n`` clutter cells
    (gamma, ``enl`` looks; exponential when 1), by root finding on the integral over ``u = F(Y_k)``."""
    from scipy import integrate, optimize

    if not 1 <= k <= n:
        raise ValueError(f"rank {k} is not within 1..{n}")
    clutter, order = stats.gamma(enl, scale=1.0 / enl), stats.beta(k, n - k + 1)
    lo, hi = order.ppf(1e-15), order.isf(1e-15)

    def log_pfa(t: float) -> float:
        f = lambda u: order.pdf(u) * clutter.sf(t * clutter.ppf(u))  # noqa: E731
        v, _ = integrate.quad(f, lo, hi, points=[(k - 1) / max(n - 1, 1)], limit=200, epsabs=0, epsrel=1e-9)
        return math.log(max(v, 1e-300))

    return float(optimize.brentq(lambda t: log_pfa(t) - math.log(pfa), 1e-6, 1e7, xtol=1e-10, rtol=1e-10))


@dataclass(frozen=True)
class OsGrid:
    """Sampling step ``d`` (px), cell side ``cell`` = m d (px), and the ring in samples: guard and
    background half-widths (rows, cols); ``offsets`` (n, 2) of the ring samples, ``rank`` (0-based)."""

    d: int
    m: int
    guard: tuple[int, int]
    background: tuple[int, int]
    offsets: np.ndarray
    rank: int

    @property
    def cell(self) -> int:
        return self.d * self.m

    @property
    def reach(self) -> int:
        """Rows beyond a cell's edge that its level reads (the strip margin it needs)."""
        return self.background[0] * self.d + self.cell


def os_grid(cfg: CfarConfig, px: CfarPixels) -> OsGrid:
    """The OS sampling grid of ``cfg`` on the pixel windows ``px``."""
    d = cfg.os_stride or max(1, (2 * min(px.guard) + 1) // 3)
    m = 1 if cfg.os_stride == 1 else 3
    half = (d * m) // 2  # farthest pixel of a cell from its centre sample
    gc = tuple((g + half) // d for g in px.guard)
    bc = tuple(max(g + 1, round(b / d)) for g, b in zip(gc, px.background))
    oy, ox = np.mgrid[-bc[0]: bc[0] + 1, -bc[1]: bc[1] + 1]
    ring = (np.abs(oy) > gc[0]) | (np.abs(ox) > gc[1])
    offsets = np.stack([oy[ring], ox[ring]], 1)
    rank = min(len(offsets) - 1, int(round(cfg.os_rank * (len(offsets) - 1))))
    return OsGrid(d, m, gc, bc, offsets, rank)


def os_level(power: np.ndarray, valid: np.ndarray, all_valid: bool, grid: OsGrid) -> np.ndarray:
    """The ring's order statistic per pixel (h, w) float32 (each pixel its cell's value; +inf where
    a cell's ring has no valid sample). The array's first row and column must lie on the cell grid
    (multiples of ``grid.cell`` from the origin).

    Nodata / land samples are left out of the ranking: of a cell's ``u`` invalid samples,
    ``round(k u / (n - 1))`` become -inf and the rest +inf, so the k-th of all ``n`` samples is the
    same quantile (k / (n - 1)) of its valid samples."""
    h, w = power.shape
    cp, hm, wm = _padded_samples(power, grid.d, grid)
    cv = None if all_valid else _padded_samples(valid, grid.d, grid)[0]
    level = np.empty((hm, wm), np.float32)
    n, k = len(grid.offsets), grid.rank
    step = max(1, CHUNK // max(1, n * wm))
    for k0 in range(0, hm, step):
        k1 = min(hm, k0 + step)
        stack = _gather(cp, grid, k0, k1, wm, np.float32)
        if cv is not None:
            bad = ~_gather(cv, grid, k0, k1, wm, bool)
            if bad.any():
                low = np.rint(k * bad.sum(axis=0) / max(n - 1, 1))  # invalid samples sent below the rank
                stack[bad] = np.where((np.cumsum(bad, axis=0, dtype=np.int32) <= low)[bad], -np.inf, np.inf)
        level[k0:k1] = np.partition(stack, k, axis=0)[k]
    level[level == -np.inf] = np.inf  # no valid sample: nothing to compare with
    cell = grid.cell
    return np.repeat(np.repeat(level, cell, axis=0)[:h], cell, axis=1)[:, :w]


def _padded_samples(a: np.ndarray, d: int, grid: OsGrid) -> tuple[np.ndarray, int, int]:
    """Every d-th pixel from d // 2 (edge-padded to whole steps), padded by the ring ('symmetric' =
    scipy.ndimage's 'reflect') and to whole cells; the cells (rows, cols)."""
    h, w = a.shape
    hp, wp = -(-h // d) * d, -(-w // d) * d
    src = a if (hp, wp) == (h, w) else np.pad(a, ((0, hp - h), (0, wp - w)), mode="edge")
    coarse = src[d // 2:: d, d // 2:: d]
    hc, wc = coarse.shape
    m, (bcy, bcx) = grid.m, grid.background
    hm, wm = -(-hc // m), -(-wc // m)
    return np.pad(coarse, ((bcy, bcy + hm * m - hc), (bcx, bcx + wm * m - wc)), mode="symmetric"), hm, wm


def _gather(cp: np.ndarray, grid: OsGrid, k0: int, k1: int, wm: int, dtype) -> np.ndarray:
    """The ring samples of cell rows k0..k1-1: (samples, k1 - k0, wm), by one strided slice each."""
    m, (bcy, bcx) = grid.m, grid.background
    c = m // 2  # the centre sample of a cell
    stack = np.empty((len(grid.offsets), k1 - k0, wm), dtype)
    for i, (oy, ox) in enumerate(grid.offsets):
        r0, c0 = bcy + c + oy + k0 * m, bcx + c + ox
        stack[i] = cp[r0: r0 + (k1 - k0 - 1) * m + 1: m, c0: c0 + (wm - 1) * m + 1: m]
    return stack
