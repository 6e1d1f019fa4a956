"""Georeferencing of the processed region (at the pixel or a coarser grid), shared by the task sinks."""

from __future__ import annotations

from typing import Any

import numpy as np


class Georef:
    """Georeferencing of the processed region, optionally at a coarser pixel (``scale`` px per cell).

    A raster georeferenced by transform gets ``transform * translation(col0, row0) * scale(s)``; one
    georeferenced by GCPs gets its GCPs shifted and scaled (and, for vectors, the affine fitted to
    them by ``rasterio.transform.from_gcps``); without either, coordinates stay in pixels.
    """

    def __init__(self, raster, region, scale: int = 1):
        from affine import Affine
        from rasterio.control import GroundControlPoint

        self.crs = raster.crs
        self.gcps, self.gcp_crs = None, None
        r0, c0 = region.row_off, region.col_off
        if raster.georeferencing == "gcps":
            self.gcps = [GroundControlPoint(row=(g.row - r0) / scale, col=(g.col - c0) / scale, x=g.x, y=g.y, z=g.z,
                                            id=g.id, info=g.info) for g in raster.gcps]
            self.gcp_crs = raster.gcp_crs
            self.crs = raster.gcp_crs
            from rasterio.transform import from_gcps

            self.transform = from_gcps(self.gcps)
            self.approximate = True
        else:
            base = raster.transform if raster.transform is not None else Affine.identity()
            self.transform = base * Affine.translation(c0, r0) * Affine.scale(scale)
            self.approximate = False
        # no CRS, or a CRS on an identity transform (radar geometry, e.g. an SLC): pixels, never map units
        self.pixel_space = raster.georeferencing in ("none", "identity")

    def writer_kwargs(self) -> dict[str, Any]:
        if self.gcps:
            return {"gcps": self.gcps, "gcp_crs": self.gcp_crs}
        return {"crs": self.crs, "transform": self.transform}

    @property
    def area_unit(self) -> str:
        if self.pixel_space or self.crs is None:
            return "px"
        return "m2" if (self.crs.is_geographic or _linear_units_metres(self.crs)) else "crs_units2"

    def row_areas(self, row_off: int, rows: int) -> np.ndarray:
        """Area of one pixel in each of ``rows`` output rows: m^2 for projected CRSs in metres and
        for geographic CRSs (spherical Earth of the authalic radius, cos(latitude) per row),
        CRS units^2 for other projected CRSs, 1 in pixel space."""
        t = self.transform
        cell = abs(t.a * t.e - t.b * t.d)
        if self.area_unit == "px":
            return np.ones(rows)
        if self.crs.is_geographic:
            r = np.arange(row_off, row_off + rows) + 0.5
            lat = np.radians(t.d * 0.5 + t.e * r + t.f)  # latitude of the row centre (column 0.5)
            return cell * np.radians(1.0) ** 2 * EARTH_RADIUS_M**2 * np.cos(lat)
        return np.full(rows, cell)

    def to_map(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.transform
        return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


EARTH_RADIUS_M = 6371007.2  # authalic radius of WGS84


def _linear_units_metres(crs) -> bool:
    try:
        return crs.linear_units.lower() in ("metre", "meter", "m")
    except Exception:  # some CRSs have no linear units
        return False
