"""CFAR over a whole raster, by strips of rows, to a GeoPackage of boxes (``run_cfar``).

Each strip of ``block_rows`` rows is read through ``engine.reader.SarRaster`` with a margin of the
background window above and below, so memory grows with the raster's width, never its height, and
its CFAR map is computed for its own rows only (kept sparse: the detections and their ratios). Values
are converted to linear power with ``engine.radiometry`` (dB, amplitude; 8-bit display values as
``display_units``); CFAR never runs on dB. A strip's objects are grouped on its rows plus an object
overlap of its neighbours' maps above and below, and kept when their centre row lies in its own
rows; objects longer than the overlap, cut at its edge, are merged by NMS (numpy).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import CancelledError, RasterInputError
from engine.tiling import Window

from .config import CfarConfig, CfarConfigError, CfarPixels
from .objects import CfarObjects, nms, objects_at_levels
from .order import os_grid
from .statistics import CfarMap, cfar_map

OBJECT_OVERLAP_PX = 64  # rows shared by neighbouring strips for objects (longer ones are merged by NMS)


@dataclass
class CfarResult:
    """What ``run_cfar`` found and wrote: objects in raster pixels, the area searched, the log."""

    output: str | None
    objects: CfarObjects
    valid_pixels: int  # pixels with data (and water, under a water mask)
    tested_pixels: int  # of those, pixels with enough valid background to be tested
    area_km2: float | None  # area of the valid pixels, when the raster is georeferenced in metres
    units: str  # units of the file, as read
    log: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def megapixels(self) -> float:
        return self.valid_pixels / 1e6


def pixel_spacing_m(raster) -> tuple[float, float] | None:
    """(row, column) metres per pixel at the raster's centre, or None (no georeferencing, or a
    projected CRS whose unit is not the metre)."""
    from engine.tasks.georef import EARTH_RADIUS_M, Georef

    geo = Georef(raster, Window(0, 0, raster.height, raster.width))
    if geo.area_unit != "m2":
        return None
    t = geo.transform
    sx, sy = math.hypot(t.a, t.d), math.hypot(t.b, t.e)
    if geo.crs.is_geographic:
        lat = math.radians(t.d * raster.width / 2 + t.e * raster.height / 2 + t.f)
        k = math.radians(1.0) * EARTH_RADIUS_M
        sx, sy = sx * k * math.cos(lat), sy * k
    return (sy, sx) if sx > 0 and sy > 0 else None


def source_units(raster, cfg: CfarConfig, log: list[str]) -> str:
    """The units of what the reader returns, given or detected (8-bit display: ``display_units``)."""
    from engine.radiometry import UNIT_LABEL, detect_units, normalise_units

    if cfg.input_units:
        units, why = normalise_units(cfg.input_units), "given"
    else:
        units, why = detect_units(raster)
    if units == "uint8":
        log.append(f"input units: 8-bit display values ({why}), read as {UNIT_LABEL[cfg.display_units]}")
        return cfg.display_units
    log.append(f"input units: {UNIT_LABEL[units]} ({why})" + ("" if units == "linear_power" else
                                                          ", converted to linear power for CFAR"))
    return units


def to_power(x: np.ndarray, valid: np.ndarray, units: str, given: bool, source: str) -> np.ndarray:
    """Reader values (h, w) -> linear power float32; negative 'linear' values are refused (they are dB)."""
    from engine.radiometry import convert_units

    if units in ("linear_power", "amplitude") and (x < 0).any():  # invalid pixels hold 0
        neg = float(np.mean(x[valid] < 0))
        if neg > 0:
            how = "you gave them as" if given else "they were read as"
            raise RasterInputError(
                f"{source}: {neg:.1%} of the pixels of a strip are negative, but {how} {units.replace('_', ' ')}, "
                "which is never negative: these look like dB values. Give input units 'db' (they are converted "
                "to linear power; CFAR never runs on dB), or leave the units to be detected.")
    return convert_units(x, units, "linear_power") if units != "linear_power" else x


def _open_mask(path: str, raster, source: str):
    """The water-mask raster, checked to lie on the raster's grid."""
    from engine.reader import SarRaster

    mask = SarRaster.open(path)
    if (mask.height, mask.width) != (raster.height, raster.width) or (
            raster.crs is not None and mask.crs is not None and not mask.transform.almost_equals(raster.transform)):
        mask.close()
        raise RasterInputError(f"water mask {path} ({mask.width}x{mask.height} px) is not on the grid of {source} "
                               f"({raster.width}x{raster.height} px): resample it onto the raster's grid first")
    return mask


def run_cfar(paths: list[str] | str, output: str | Path | None, cfg: CfarConfig, *, bands: list | None = None,
             complex_mode: str = "intensity", overwrite: bool = False,
             progress: Callable[[float], None] | None = None,
             should_cancel: Callable[[], bool] | None = None,
             refine: Callable[..., CfarObjects] | None = None) -> CfarResult:
    """Run CFAR over a raster strip by strip and write its boxes to ``output`` (a GeoPackage, layer
    'detections'; None: write nothing, return the objects). See the module docstring.

    ``refine(raster, units, objects, source) -> objects``: called on every object found, the raster
    still open (``units``: what its reader returns), before anything is written: the learned scorer
    of ``detect.cfar_scored`` rescores and moves the boxes there.

    Raises:
        CfarConfigError: windows that do not fit the raster or its valid area.
        RasterInputError: unreadable input, dB given as linear, a water mask on another grid.
        OutputError: the output cannot be written.
    """
    from engine.reader import SarRaster
    from engine.writers import check_output

    paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    out = None if output is None else check_output(output, paths, overwrite)
    log: list[str] = []
    with SarRaster.open(paths, bands, complex_mode) as first:
        count, names = first.count, first.band_names
    if count > 1:  # one channel: the first selected
        log.append(f"{', '.join(Path(p).name for p in paths)}: {count} channels; CFAR runs on the first ({names[0]})")
        bands = [1] if bands is None else bands[:1]
    with SarRaster.open(paths, bands, complex_mode) as raster:
        source = ", ".join(Path(p).name for p in raster.paths)
        units = source_units(raster, cfg, log)
        spacing = pixel_spacing_m(raster)
        px = cfg.resolve(spacing, source)
        (by, bx) = px.background
        if 2 * by + 1 > raster.height or 2 * bx + 1 > raster.width:
            raise CfarConfigError(f"{source}: the CFAR background window ({2 * bx + 1} x {2 * by + 1} px) is larger "
                                  f"than the raster ({raster.width} x {raster.height} px): choose a smaller background")
        mask = _open_mask(cfg.water_mask, raster, source) if cfg.water_mask else None
        try:
            res = _strips(raster, mask, cfg, px, units, source, progress, should_cancel)
        finally:
            if mask is not None:
                mask.close()
        objects, valid, tested, water, seams = res
        if cfg.water_mask and water == 0:
            msg = f"no boxes: the mask {cfg.water_mask} has no water (no pixel with value {cfg.water_values})"
            return _finish(out, CfarResult(None, CfarObjects.empty(), 0, 0, 0.0 if px.metres else None, units, log,
                                           [msg]), raster, cfg, px)
        if valid == 0:
            raise RasterInputError(f"{source}: no valid pixel (all nodata{' or land' if mask else ''}): nothing to search")
        if tested == 0:
            raise CfarConfigError(
                f"{source}: no valid pixel has {cfg.min_background:.0%} of its {px.ring_cells}-cell background ring "
                f"valid: the background window ({2 * bx + 1} x {2 * by + 1} px) is larger than the valid area. "
                "Choose a smaller background window")
        objects = _merge_at_seams(objects, seams, cfg.nms_iou)
        if refine is not None:
            found = len(objects)
            objects = refine(raster, units, objects, source)
            log.append(f"CFAR proposals: {found}, {len(objects)} kept by the scorer")
        area = valid * spacing[0] * spacing[1] / 1e6 if spacing is not None else None
        log.append(f"CFAR {cfg.method.upper()} ({_rule(cfg)}): {len(objects)} object(s) in {valid / 1e6:.2f} Mpx"
                   + (f" ({area:.2f} km2)" if area is not None else ""))
        return _finish(out, CfarResult(None, objects, valid, tested, area, units, log), raster, cfg, px)


def _rule(cfg: CfarConfig) -> str:
    return f"pfa {cfg.pfa:g}, ENL {cfg.enl:g}" if cfg.pfa is not None else f"k-sigma {cfg.k_sigma:g}"


@dataclass
class _StripMap:
    """The CFAR map of a strip's own rows ``r0..r1``, sparse: flat indexes (from row ``r0``) of its
    detections and their ratios (a pixel is detected exactly where its ratio is > 0); its counts."""

    r0: int
    r1: int
    idx: np.ndarray
    ratio: np.ndarray
    valid: int
    tested: int
    water: int


def _strips(raster, mask, cfg: CfarConfig, px: CfarPixels, units: str, source: str, progress, should_cancel):
    """Every strip (on ``cfg.threads`` threads): objects, counts.

    Each row's CFAR decision is computed once, by the strip that owns it (read with ``support`` rows
    of background above and below). A strip's objects come from its own rows plus ``over`` rows of
    its neighbours' maps on each side (an object centred in the strip may reach into them), kept when
    centred in its rows: the same objects as one pass over the whole array. At most ``threads`` maps
    are computed ahead of the objects that need them, so memory stays flat in the raster's height."""
    d, by = 1, px.background[0]
    if cfg.method == "os":  # strips start on the cell grid; a cell's ring reaches further than the window
        grid = os_grid(cfg, px)
        d, by = grid.cell, max(by, grid.reach)
    over = OBJECT_OVERLAP_PX if px.max_length is None else max(
        OBJECT_OVERLAP_PX, math.ceil(px.max_length / px.spacing[0]))
    support = -(-by // d) * d
    step = -(-cfg.block_rows // d) * d
    h, w = raster.height, raster.width
    starts = list(range(0, h, step))
    reach = -(-over // step)  # neighbouring strips on each side that an object's rows can reach
    water_values = np.asarray(cfg.water_values, np.float32)

    def strip_map(r0: int) -> _StripMap:
        if should_cancel is not None and should_cancel():
            raise CancelledError("CFAR cancelled; nothing was written")
        r1 = min(r0 + step, h)
        e0, e1 = max(0, r0 - support), min(h, r1 + support)
        win = Window(e0, 0, e1 - e0, w)
        x, valid = raster.read(win)
        water = None
        if mask is not None:
            m, mv = mask.read(win)
            water = mv & np.isin(m[0], water_values)
            valid &= water
        power = to_power(x[0], valid, units, bool(cfg.input_units), source)
        cm = cfar_map(power, valid, cfg, px)
        core = slice(r0 - e0, r1 - e0)
        idx = np.flatnonzero(cm.detected[core])
        return _StripMap(r0, r1, idx, cm.ratio[core].ravel()[idx], int(valid[core].sum()),
                         int(cm.tested_rows[core].sum()), 0 if water is None else int(water[core].sum()))

    def strip_objects(r0: int, maps: list[_StripMap]) -> CfarObjects:
        """Objects centred in rows r0..r0+step of the maps' rows within ``over`` of them."""
        r1 = min(r0 + step, h)
        lo, hi = max(0, r0 - over), min(h, r1 + over)
        ratio = np.zeros((hi - lo, w), np.float32)  # calloc'd: only the pages of detections are touched
        for m in maps:
            a, b = max(m.r0, lo), min(m.r1, hi)
            if a < b:
                sel = (m.idx >= (a - m.r0) * w) & (m.idx < (b - m.r0) * w)
                ratio.flat[m.idx[sel] + (m.r0 - lo) * w] = m.ratio[sel]
        cm = CfarMap(ratio > 0, ratio, np.zeros(0, np.int64))
        obj = objects_at_levels(cm, px, cfg.levels_db).shifted(lo)
        return obj.take((obj.centre_rows >= r0) & (obj.centre_rows < r1) & (obj.scores >= cfg.score_threshold))

    parts, counts = [], [0, 0, 0]
    maps: dict[int, Future] = {}
    with ThreadPoolExecutor(max_workers=cfg.threads) as ex:
        pending: deque = deque()
        for i, r0 in enumerate(starts):
            while len(maps) < 2 * reach + 1 + cfg.threads and max(maps, default=-1) + 1 < len(starts):
                j = max(maps, default=-1) + 1
                maps[j] = ex.submit(strip_map, starts[j])
            near = [maps[j].result() for j in range(max(0, i - reach), min(len(starts), i + reach + 1))]
            m = maps[i].result()
            counts = [counts[0] + m.valid, counts[1] + m.tested, counts[2] + m.water]
            pending.append(ex.submit(strip_objects, r0, near))
            maps.pop(i - reach, None)  # no later strip reaches back to it
            while len(pending) >= cfg.threads or (i == len(starts) - 1 and pending):
                parts.append(pending.popleft().result())
                if progress is not None:
                    progress(len(parts) / len(starts))
    return CfarObjects.concat(parts), *counts, (np.asarray(starts[1:], np.float64), over)


def _merge_at_seams(objects: CfarObjects, seams: tuple[np.ndarray, int], iou: float) -> CfarObjects:
    """NMS among the objects within the overlap of a seam between strips: the only place where one
    object can be reported twice (inside a strip, connected components are distinct objects)."""
    rows, over = seams
    if iou >= 1 or not len(objects) or not len(rows):
        return objects
    y0, y1 = objects.boxes[:, 1], objects.boxes[:, 3]
    k = np.clip(np.searchsorted(rows, (y0 + y1) / 2), 1, len(rows)) - 1  # the seams around each object
    near = np.zeros(len(objects), bool)
    for kk in (k, np.minimum(k + 1, len(rows) - 1)):
        near |= (y0 < rows[kk] + over) & (y1 > rows[kk] - over)
    cand = np.flatnonzero(near)
    keep = np.ones(len(objects), bool)
    keep[cand] = False
    keep[cand[nms(objects.boxes[cand], objects.scores[cand], iou)]] = True
    return objects.take(keep)


def _finish(out: Path | None, res: CfarResult, raster, cfg: CfarConfig, px: CfarPixels) -> CfarResult:
    """Write the GeoPackage (when asked): boxes in map coordinates, sizes in metres or pixels."""
    if out is None:
        return res
    from shapely.geometry import box as shp_box

    from engine.tasks.georef import Georef
    from engine.writers import write_features

    geo = Georef(raster, Window(0, 0, raster.height, raster.width))
    o = res.objects
    b = o.boxes
    x0, y0 = geo.to_map(b[:, 0], b[:, 1])
    x1, y1 = geo.to_map(b[:, 2], b[:, 3])
    unit_a, unit_l = ("area_m2", "length_m") if px.metres else ("area_px", "length_px")
    cell = px.spacing[0] * px.spacing[1]
    feats = [{"geometry": shp_box(min(x0[i], x1[i]), min(y0[i], y1[i]), max(x0[i], x1[i]), max(y0[i], y1[i])),
              "properties": {"class_id": 0, "class_name": cfg.class_name, "score": float(o.scores[i]),
                             "cfar_ratio": float(min(o.ratios[i], 1e30)), "pixels": int(o.pixels[i]),
                             unit_a: float(o.pixels[i] * cell), unit_l: float(o.lengths[i]),
                             "px_col": float(b[i, 0]), "px_row": float(b[i, 1]),
                             "px_width": float(b[i, 2] - b[i, 0]), "px_height": float(b[i, 3] - b[i, 1])}}
             for i in range(len(o))]
    schema = {"geometry": "Polygon", "properties": {
        "class_id": "int", "class_name": "str", "score": "float", "cfar_ratio": "float", "pixels": "int",
        unit_a: "float", unit_l: "float", "px_col": "float", "px_row": "float", "px_width": "float",
        "px_height": "float"}}
    write_features(out, feats, schema, geo.crs, layer="detections")
    res.output = str(out)
    return res
