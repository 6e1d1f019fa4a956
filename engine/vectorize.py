"""Class raster -> GeoPackage polygons, strip by strip, with no polygon cut along strip seams.

Memory: one strip (``strip_rows`` x width pixels) and its polygons, plus the "open" polygons that
touch the strip's bottom edge. A region that spans many strips is held until it closes, as a
whole-raster polygonisation would hold it; nothing else grows with the raster's height.

How seams are healed: every strip is polygonised in pixel coordinates (column, row), where each
vertex is an integer, so the pieces of one region meet exactly on the seam. Pieces that touch the
strip's bottom edge form the *frontier*. A piece of the next strip that touches its top edge joins
(union-find) every frontier piece of the same class whose boundary it shares over a positive length
(a corner contact is not 4-connectivity). A group with no piece on the new frontier cannot grow any
more: its pieces are unioned, filtered by area, mapped to CRS coordinates and written at once.
The result equals polygonising the whole raster in one go (same polygons, count and areas).
"""

from __future__ import annotations

import math
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError, RasterInputError, SarmaeError

NODATA = 255
WRITE_BATCH = 1000  # features per GeoPackage transaction
SCHEMA = {"geometry": "Polygon", "properties": {"class_id": "int", "class_name": "str",
                                                 "area_m2": "float", "area_px": "float"}}


def polygonize_classes(class_tif: str | Path, out_gpkg: str | Path, class_names: list[str], *,
                       min_area_px: int = 0, strip_rows: int = 1024, skip_classes: tuple[int, ...] = (),
                       progress: Callable[[float], None] | None = None) -> dict:
    """Vectorise a class raster (values 0..K-1, 255 = nodata) into one polygon per 4-connected region.

    Args:
        class_tif: single-band integer class raster (band 1 is read; 255 and the file's nodata are masked).
        out_gpkg: GeoPackage to write (layer named after the file stem; replaced atomically).
        class_names: name of class ``i`` at index ``i``; ids beyond the list are named ``class_<id>``.
        min_area_px: drop regions smaller than this many pixels (measured after seams are merged).
        strip_rows: rows read per strip; memory is about ``strip_rows * width`` bytes plus open polygons.
        skip_classes: class ids not to vectorise (e.g. background); they are treated like nodata.
        progress: called with the fraction done (0..1] after each strip.

    Returns:
        ``{"path", "layer", "features", "per_class": {name: {"count", "area_m2"}}, "dropped_small",
        "georeferencing", "area_units"}``. ``area_m2`` is square metres for a projected CRS (converted
        from its linear unit) or a geographic CRS (exact ellipsoidal area of the lon/lat pixel cells);
        with no CRS it is in squared pixel/transform units, as ``area_units`` says.

    Raises:
        RasterInputError: the raster cannot be read or is not a single-band integer raster.
        OutputError: the GeoPackage cannot be written (no partial file is left behind).
    """
    import rasterio
    from rasterio.windows import Window

    if strip_rows < 1 or min_area_px < 0:
        raise ValueError(f"strip_rows must be >= 1 and min_area_px >= 0 (got {strip_rows}, {min_area_px})")
    out = Path(out_gpkg).resolve()
    if out == Path(class_tif).resolve():
        raise OutputError(f"{out_gpkg}: the output would overwrite the input raster; choose another path")
    if not out.parent.is_dir():
        raise OutputError(f"{out_gpkg}: the folder {out.parent} does not exist; create it or choose another")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            src = rasterio.open(class_tif)
    except rasterio.errors.RasterioIOError as e:
        raise RasterInputError(f"{class_tif}: cannot open the class raster ({e})") from e
    with src:
        if not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
            raise RasterInputError(f"{class_tif}: a class raster must hold integers, not {src.dtypes[0]}")
        transform, crs, georef = src.transform, src.crs, "transform"
        gcps, gcp_crs = src.gcps
        if crs is None and gcps:
            from rasterio.transform import from_gcps
            transform, crs = from_gcps(gcps), gcp_crs
            georef = "gcps (affine approximation by rasterio.transform.from_gcps)"
        elif crs is None:
            georef = "none (pixel coordinates)" if transform.is_identity else "transform without CRS"
        area_m2, area_units = _area_function(crs, transform)
        names = {i: n for i, n in enumerate(class_names)}
        per_class = {names[i]: {"count": 0, "area_m2": 0.0} for i in names if i not in skip_classes}
        drop = {NODATA, *skip_classes} | ({int(src.nodata)} if src.nodata is not None else set())
        height, width = src.height, src.width

        def strips() -> Iterator[tuple[int, int, np.ndarray]]:
            for r0 in range(0, height, strip_rows):
                r1 = min(r0 + strip_rows, height)
                try:
                    data = src.read(1, window=Window(0, r0, width, r1 - r0))
                except rasterio.errors.RasterioIOError as e:
                    raise RasterInputError(f"{class_tif}: cannot read rows {r0}-{r1} ({e})") from e
                yield r0, r1, data
                if progress is not None:
                    progress(r1 / height)

        tmp = out.with_name(f".{out.stem}.{uuid.uuid4().hex[:8]}.tmp.gpkg")
        n_written = n_dropped = 0
        try:
            import fiona
            from shapely.affinity import affine_transform
            from shapely.geometry import mapping

            matrix = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
            with fiona.open(tmp, "w", driver="GPKG", schema=SCHEMA, layer=out.stem,
                            crs_wkt=crs.to_wkt() if crs else None) as dst:
                batch: list[dict] = []
                for cls, poly in _merged_regions(strips(), height, sorted(drop)):
                    area_px = float(poly.area)
                    if area_px < min_area_px:
                        n_dropped += 1
                        continue
                    geom = affine_transform(poly, matrix)
                    name = names.get(cls, f"class_{cls}")
                    area = area_m2(geom, area_px)
                    batch.append({"geometry": mapping(geom), "properties": {
                        "class_id": cls, "class_name": name, "area_m2": area, "area_px": area_px}})
                    if len(batch) >= WRITE_BATCH:  # one transaction per batch, not per feature
                        dst.writerecords(batch)
                        batch.clear()
                    stats = per_class.setdefault(name, {"count": 0, "area_m2": 0.0})
                    stats["count"] += 1
                    stats["area_m2"] += area
                    n_written += 1
                dst.writerecords(batch)
            os.replace(tmp, out)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, SarmaeError):
                raise
            raise OutputError(f"{out_gpkg}: writing the polygons failed ({e}); nothing was written. "
                              "Check the disk space and that the folder is writable") from e
    return {"path": str(out), "layer": out.stem, "features": n_written, "per_class": per_class,
            "dropped_small": n_dropped, "georeferencing": georef, "area_units": area_units}


def _merged_regions(strips: Iterator[tuple[int, int, np.ndarray]], height: int,
                    drop: list[int]) -> Iterator[tuple[int, Any]]:
    """Yield ``(class_id, polygon in pixel coordinates)`` for every region, as soon as it is closed.

    ``strips`` yields ``(row0, row1, data[row1 - row0, width])`` top to bottom.
    """
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    groups: dict[int, tuple[int, list]] = {}   # root id -> (class, pieces)
    alias: dict[int, int] = {}                 # merged group id -> the id it was merged into
    frontier: list[tuple[Any, int, int]] = []  # (piece, class, group) touching the previous strip's bottom
    next_id = 0

    def find(g: int) -> int:
        while g in alias:
            g = alias[g]
        return g

    for r0, r1, data in strips:
        mask = ~np.isin(data, drop)
        found = [(shapely.geometry.shape(g), int(v)) for g, v in
                 shapes(data, mask=mask, connectivity=4, transform=Affine.translation(0, r0))]
        if not found:
            pieces, classes, bounds = np.empty(0, object), np.empty(0, int), np.empty((0, 4))
        else:
            pieces = np.array([p for p, _ in found], dtype=object)
            classes = np.array([c for _, c in found])
            bounds = shapely.bounds(pieces)
        links = _seam_links(frontier, pieces, classes, bounds[:, 1] == r0)
        new_frontier = []
        for i, (piece, cls) in enumerate(found):
            touches_bottom = r1 < height and bounds[i, 3] == r1
            roots = sorted({find(g) for g in links.get(i, ())})
            if not roots and not touches_bottom:
                yield cls, piece  # closed inside this strip: nothing to merge
                continue
            if roots:
                root = roots[0]
                for other in roots[1:]:
                    groups[root][1].extend(groups.pop(other)[1])
                    alias[other] = root
                groups[root][1].append(piece)
            else:
                root, next_id = next_id, next_id + 1
                groups[root] = (cls, [piece])
            if touches_bottom:
                new_frontier.append((piece, cls, root))
        frontier = [(p, c, find(g)) for p, c, g in new_frontier]
        still_open = {g for _, _, g in frontier}
        for g in [g for g in groups if g not in still_open]:
            cls, parts = groups.pop(g)
            yield cls, parts[0] if len(parts) == 1 else _glue(parts)
        alias = {}  # the frontier now names roots only


def _glue(parts: list) -> Any:
    """Union of the pieces of one region, ~4x faster than ``union_all(parts)``.

    A piece's holes are enclosed inside its strip, so they touch no seam and no other piece: only
    the outer rings need a union (its holes are the ones closed by the seams), and the pieces' own
    holes are added back as they are. ``simplify(0)`` drops the collinear vertices left on seams.
    """
    import shapely

    shell = shapely.simplify(shapely.union_all([shapely.Polygon(p.exterior) for p in parts]), 0)
    holes = [*shell.interiors, *(h for p in parts for h in p.interiors)]
    return shapely.polygons(shell.exterior, holes=holes or None)  # C constructor: no Python coord loops


def _seam_links(frontier: list[tuple[Any, int, int]], pieces: np.ndarray, classes: np.ndarray,
                touches_top: np.ndarray) -> dict[int, list[int]]:
    """For each piece touching the seam, the frontier groups of its class it shares an edge with."""
    import shapely

    idx = np.flatnonzero(touches_top)
    if not frontier or idx.size == 0:
        return {}
    upper = np.array([p for p, _, _ in frontier], dtype=object)
    upper_cls = np.array([c for _, c, _ in frontier])
    lo, up = shapely.STRtree(upper).query(pieces[idx])  # bounding boxes meet
    lo = idx[lo]
    same = upper_cls[up] == classes[lo]
    lo, up = lo[same], up[same]
    edge = shapely.relate_pattern(pieces[lo], upper[up], "****1****")  # boundaries share a segment
    links: dict[int, list[int]] = {}
    for i, j in zip(lo[edge], up[edge]):
        links.setdefault(int(i), []).append(frontier[j][2])
    return links


def _area_function(crs: Any, transform: Any) -> tuple[Callable[[Any, float], float], str]:
    """``(area(geometry_in_crs, area_px) -> area, units)`` for the raster's CRS."""
    pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
    if crs is None:
        return (lambda geom, px: px * pixel_area), "squared transform units (no CRS)"
    if not crs.is_geographic:
        _, to_metre = crs.linear_units_factor
        return (lambda geom, px: px * pixel_area * to_metre**2), "m2"
    m = re.search(r'(?:SPHEROID|ELLIPSOID)\["[^"]*",\s*([-+.\deE]+),\s*([-+.\deE]+)', crs.to_wkt())
    a, inv_f = (float(m.group(1)), float(m.group(2))) if m else (6378137.0, 298.257223563)
    return (lambda geom, px: ellipsoidal_area(geom, a, 1 / inv_f if inv_f else 0.0)), "m2"


def ellipsoidal_area(geom: Any, a: float = 6378137.0, f: float = 1 / 298.257223563) -> float:
    """Area in m2 of a lon/lat (degrees) polygon, by the cylindrical equal-area projection.

    ``(lon, lat) -> (a * lon, a * q(lat) / 2)`` preserves ellipsoidal area, and maps meridians and
    parallels to straight lines, so it is exact for polygons made of unrotated lon/lat pixel cells
    (q is the authalic-latitude function; q = 2 sin(lat) on a sphere).
    """
    import shapely

    e = math.sqrt(f * (2 - f))

    def project(xy: np.ndarray) -> np.ndarray:  # (N, 2) degrees -> (N, 2) metres
        s = np.sin(np.radians(xy[:, 1]))
        q = 2 * s if e == 0 else (1 - e * e) * (
            s / (1 - (e * s) ** 2) - np.log((1 - e * s) / (1 + e * s)) / (2 * e))
        return np.column_stack([a * np.radians(xy[:, 0]), a * q / 2])

    return float(shapely.transform(geom, project).area)
