"""CFAR detections -> objects: connected components, their boxes, scores, sizes; NMS in numpy.

A component's score is its peak CFAR ratio ``r`` (pixel over its detection threshold, > 1) mapped
to ``1 - 1/r``: 0 at the threshold, 0.5 at twice it, towards 1 for the brightest; monotone, so
rankings (mAP) follow the CFAR statistic. Its length is the major axis of the ellipse with the
same second moments (``4 sqrt(largest eigenvalue)``, as skimage's ``major_axis_length``),
measured on the (row, column) spacing of the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .config import CfarPixels

EIGHT = np.ones((3, 3), bool)  # 8-connectivity: a ship's diagonal pixels belong together


@dataclass
class CfarObjects:
    """Objects of one array (n rows each): boxes (x0, y0, x1, y1) in pixel edges, scores in [0, 1),
    peak ratios, pixel counts, major-axis lengths (in the grid's spacing units), centre rows."""

    boxes: np.ndarray
    scores: np.ndarray
    ratios: np.ndarray
    pixels: np.ndarray
    lengths: np.ndarray
    centre_rows: np.ndarray

    @classmethod
    def empty(cls) -> CfarObjects:
        z = np.zeros(0)
        return cls(np.zeros((0, 4)), z, z, np.zeros(0, np.int64), z, z)

    def take(self, keep: np.ndarray) -> CfarObjects:
        return CfarObjects(self.boxes[keep], self.scores[keep], self.ratios[keep], self.pixels[keep],
                           self.lengths[keep], self.centre_rows[keep])

    def shifted(self, row: float, col: float = 0.0) -> CfarObjects:
        b = self.boxes + np.array([col, row, col, row])
        return CfarObjects(b, self.scores, self.ratios, self.pixels, self.lengths, self.centre_rows + row)

    @staticmethod
    def concat(parts: list[CfarObjects]) -> CfarObjects:
        if not parts:
            return CfarObjects.empty()
        return CfarObjects(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                             ("boxes", "scores", "ratios", "pixels", "lengths", "centre_rows")))

    def __len__(self) -> int:
        return len(self.scores)


def score_of(ratio: np.ndarray) -> np.ndarray:
    """Peak CFAR ratio (> 1) -> score in [0, 1): ``1 - 1/r``."""
    r = np.asarray(ratio, np.float64)
    return np.clip(1.0 - 1.0 / np.maximum(r, 1.0), 0.0, 1.0)


def objects_of(detected: np.ndarray, ratio: np.ndarray, px: CfarPixels) -> CfarObjects:
    """Connected components of ``detected`` (h, w) -> objects within the size limits of ``px``."""
    lab, n = ndi.label(detected, structure=EIGHT)
    if n == 0:
        return CfarObjects.empty()
    idx = np.flatnonzero(lab)  # only the detected pixels are visited below
    ids = lab.ravel()[idx] - 1
    rows, cols = np.divmod(idx, detected.shape[1])
    cnt = np.bincount(ids, minlength=n).astype(np.float64)
    peak = np.zeros(n)
    np.maximum.at(peak, ids, ratio.ravel()[idx].astype(np.float64))
    r0, c0 = np.full(n, np.iinfo(np.int64).max), np.full(n, np.iinfo(np.int64).max)
    r1, c1 = np.zeros(n, np.int64), np.zeros(n, np.int64)
    np.minimum.at(r0, ids, rows)
    np.minimum.at(c0, ids, cols)
    np.maximum.at(r1, ids, rows)
    np.maximum.at(c1, ids, cols)
    sy, sx = px.spacing
    y, x = rows * sy, cols * sx
    my, mx = np.bincount(ids, y, n) / cnt, np.bincount(ids, x, n) / cnt
    dy, dx = y - my[ids], x - mx[ids]
    # second moments + 1/12 of a cell (a pixel is a square, not a point)
    vyy = np.bincount(ids, dy * dy, n) / cnt + sy * sy / 12
    vxx = np.bincount(ids, dx * dx, n) / cnt + sx * sx / 12
    vxy = np.bincount(ids, dx * dy, n) / cnt
    lam = (vyy + vxx) / 2 + np.sqrt(((vyy - vxx) / 2) ** 2 + vxy ** 2)
    length = 4.0 * np.sqrt(lam)
    keep = cnt >= px.min_area - 1e-9
    if px.max_area is not None:
        keep &= cnt <= px.max_area + 1e-9
    if px.max_length is not None:
        keep &= length <= px.max_length
    boxes = np.stack([c0, r0, c1 + 1, r1 + 1], axis=1).astype(np.float64)
    obj = CfarObjects(boxes, score_of(peak), peak, cnt.astype(np.int64), length, (r0 + r1 + 1) / 2.0)
    return obj.take(keep)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indexes kept by greedy non-maximum suppression (best score first), numpy only: a box is
    dropped when its IoU with a kept, better-scored box exceeds ``iou``."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = (boxes[:, k] for k in range(4))
    area = (x1 - x0) * (y1 - y0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        h = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = w * h
        union = area[i] + area[rest] - inter
        order = rest[inter <= iou * union]
    return np.asarray(keep, np.int64)


def detect_array(power: np.ndarray, valid: np.ndarray | None, cfg, px: CfarPixels) -> CfarObjects:
    """Whole-array CFAR: linear power (h, w) + valid mask -> objects (pixel coordinates of the array)."""
    from .statistics import cfar_map

    power = np.asarray(power, np.float32)
    valid = np.isfinite(power) if valid is None else valid & np.isfinite(power)
    m = cfar_map(np.where(valid, power, np.float32(0)), valid, cfg, px)
    obj = objects_of(m.detected, m.ratio, px)
    return obj.take(obj.scores >= cfg.score_threshold)
