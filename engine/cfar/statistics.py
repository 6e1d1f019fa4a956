"""CFAR statistics on linear power, vectorised: the ring's mean (CA) or order statistic (OS), the
threshold factor for a false-alarm probability, and the per-pixel detection decision.

Cell averaging: with ``n`` valid ring cells of sum ``S`` (box sums of the background window minus
those of the guard window, over valid pixels only, so nodata and land never enter the statistics),
a pixel ``x`` is detected when ``x > T(n) S / n``. For clutter of ``L`` looks (gamma, exponential
when L = 1) ``x / (x + S)`` follows Beta(L, nL), so ``T(n) = n q / (1 - q)`` with
``q = Beta(L, nL).isf(pfa)`` (L = 1: ``T = n (pfa^(-1/n) - 1)``). Vertical box sums come from one
float64 cumulative sum shared by both windows, horizontal ones from ``scipy.ndimage.uniform_filter1d``.

Order statistic: the ring's ``os_rank`` quantile from ``scipy.ndimage.rank_filter`` on a grid that
samples every ``d``-th pixel (``d = os_stride``; 1 = the exact filter), with a guard wide enough
that no sample of a pixel's ring falls in its guard window; each pixel takes its cell's value. The
factor solves ``pfa = E[P(x > T Y_k)]`` with ``Y_k`` the k-th of ``N`` ring samples. Nodata samples
are filled with the local cell-average before ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi
from scipy import stats

from .config import CfarConfig, CfarPixels


def ca_factor(n: np.ndarray | int, pfa: float, enl: float = 1.0) -> np.ndarray:
    """CA-CFAR factor ``T(n)``: ``P(x > T * mean of n ring cells) = pfa`` on gamma clutter of ``enl`` looks."""
    n = np.maximum(np.asarray(n, np.float64), 1.0)
    q = stats.beta.isf(pfa, enl, n * enl)
    return n * q / (1.0 - q)


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


@dataclass
class CfarMap:
    """What a CFAR pass over one array found: ``detected`` (h, w) bool, ``ratio`` (h, w) float32
    (x over the detection threshold at detected pixels, 0 elsewhere), ``tested_rows`` (h,) the pixels
    of each row with enough valid background to be tested, ``stride`` (OS sampling step, 1 for CA)."""

    detected: np.ndarray
    ratio: np.ndarray
    tested_rows: np.ndarray
    stride: int = 1

    @property
    def tested(self) -> int:
        return int(self.tested_rows.sum())


def _box_sums(a: np.ndarray, halves: list[tuple[int, int]]) -> list[np.ndarray]:
    """Sums of ``a`` (h, w) over (2hy+1) x (2hx+1) boxes centred on each pixel, zeros outside:
    one float64 cumulative sum down the rows serves every box; float32 out."""
    h, w = a.shape
    pad = max(hy for hy, _ in halves)
    buf = np.empty((h + 2 * pad + 1, w), np.float64)  # buf[j] = cumsum row j - pad - 1, clipped
    buf[: pad + 1] = 0.0
    np.cumsum(a, axis=0, dtype=np.float64, out=buf[pad + 1: pad + 1 + h])
    buf[pad + 1 + h:] = buf[pad + h]
    out = []
    for hy, hx in halves:
        v = np.empty((h, w), np.float32)
        np.subtract(buf[pad + hy + 1: pad + hy + 1 + h], buf[pad - hy: pad - hy + h], out=v, casting="unsafe")
        s = ndi.uniform_filter1d(v, 2 * hx + 1, axis=1, mode="constant", cval=0.0, output=v)
        s *= 2 * hx + 1
        out.append(s)
    return out


def _edge_counts(n: int, half: int) -> np.ndarray:
    """Cells of a 2*half+1 window centred on each of n positions that lie inside 0..n-1."""
    i = np.arange(n)
    return (np.minimum(i + half, n - 1) - np.maximum(i - half, 0) + 1).astype(np.float32)


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


def os_stride(cfg: CfarConfig, px: CfarPixels) -> int:
    """The OS sampling step: ``os_stride``, or about a third of the guard window's smaller side."""
    return cfg.os_stride or max(1, (2 * min(px.guard) + 1) // 3)


def cfar_map(power: np.ndarray, valid: np.ndarray, cfg: CfarConfig, px: CfarPixels) -> CfarMap:
    """Per-pixel CFAR decision on linear power (h, w) float32 with its valid mask (h, w) bool.

    For OS the array's first row and column must lie on the global sampling grid (a multiple of
    the stride from the raster's origin) for strips to match the whole array.
    """
    all_valid = bool(valid.all())
    n = ring_counts(valid, px, all_valid)
    nmin = cfg.min_background * px.ring_cells
    ok = valid & (n >= nmin - 0.5)
    tested = ok.sum(axis=1)
    ratio = np.zeros(power.shape, np.float32)
    stride = 1
    if cfg.method == "ca" and cfg.pfa is not None:
        s, _ = ring_sums(power, valid, px, all_valid)
        t_min = float(ca_factor(px.ring_cells, cfg.pfa, cfg.enl))  # T(n) falls with n: a cheap pre-filter
        cand = np.flatnonzero(ok & (power * n > np.float32(t_min) * s))
        nc = n.flat[cand]
        level = ca_factor(nc, cfg.pfa, cfg.enl) * s.flat[cand] / nc
    elif cfg.method == "ca":  # k-sigma
        s, q = ring_sums(power, valid, px, all_valid, square=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s / n
            std = np.sqrt(np.maximum(q / n - mean * mean, 0.0))
            lvl = mean + np.float32(cfg.k_sigma) * std
        cand = np.flatnonzero(ok & (power > lvl))
        level = lvl.flat[cand].astype(np.float64)
    else:
        stride = os_stride(cfg, px)
        lvl, n_samples, rank = _os_level(power, valid, all_valid, px, cfg.os_rank, stride)
        t = os_factor(n_samples, rank + 1, float(cfg.pfa), float(cfg.enl))
        cand = np.flatnonzero(ok & (power > np.float32(t) * lvl))
        level = t * lvl.flat[cand].astype(np.float64)
    x = power.flat[cand].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(level > 0, x / level, np.inf)
    keep = r > 1.0
    detected = np.zeros(power.shape, bool)
    detected.flat[cand[keep]] = True
    ratio.flat[cand[keep]] = np.minimum(r[keep], np.finfo(np.float32).max)
    return CfarMap(detected, ratio, tested, stride)


def _os_level(power: np.ndarray, valid: np.ndarray, all_valid: bool, px: CfarPixels, os_rank: float,
              d: int) -> tuple[np.ndarray, int, int]:
    """The ring's order statistic per pixel (h, w) float32 from samples every ``d`` px; the number of
    ring samples and the 0-based rank used."""
    (gy, gx), (by, bx) = px.guard, px.background
    gcy, gcx = math.ceil(gy / d), math.ceil(gx / d)
    bcy, bcx = max(gcy + 1, round(by / d)), max(gcx + 1, round(bx / d))
    ring = np.ones((2 * bcy + 1, 2 * bcx + 1), bool)
    ring[bcy - gcy: bcy + gcy + 1, bcx - gcx: bcx + gcx + 1] = False
    n_samples = int(ring.sum())
    rank = min(n_samples - 1, int(round(os_rank * (n_samples - 1))))
    off = d // 2
    h, w = power.shape
    hp, wp = -(-h // d) * d, -(-w // d) * d
    src = power if (hp, wp) == (h, w) else np.pad(power, ((0, hp - h), (0, wp - w)), mode="edge")
    coarse = np.ascontiguousarray(src[off::d, off::d])
    if not all_valid:  # nodata / land samples take the local valid mean, so they do not bias the rank
        vsrc = valid if (hp, wp) == (h, w) else np.pad(valid, ((0, hp - h), (0, wp - w)), mode="edge")
        cv = vsrc[off::d, off::d]
        if cv.any() and not cv.all():
            cpx = CfarPixels((gcy, gcx), (bcy, bcx), 1.0, None, None)
            s, _ = ring_sums(coarse, cv, cpx, False)
            cnt = ring_counts(cv, cpx, False)
            fill = np.float32(np.median(coarse[cv]))
            with np.errstate(invalid="ignore", divide="ignore"):
                local = np.where(cnt > 0, s / np.maximum(cnt, 1), fill)
            coarse = np.where(cv, coarse, local).astype(np.float32)
    lvl = ndi.rank_filter(coarse, rank, footprint=ring, mode="reflect")
    if d > 1:
        lvl = np.repeat(np.repeat(lvl, d, axis=0), d, axis=1)
    return lvl[:h, :w], n_samples, rank
