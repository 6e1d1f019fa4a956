"""Tiny GeoTIFFs for tests, written with rasterio into a test's ``tmp_path``.

``write_raster`` covers the cases the engine must handle: georeferenced by a transform, by GCPs or
not at all; declared nodata; NaN/inf; complex64; several bands named by description ("VV", "VH").
Real SAR files come from the ``shared_data`` fixture (tests/conftest.py). Import as
``from helpers.rasters import ...`` (tests/conftest.py puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin

DEFAULT_CRS = "EPSG:32631"
DEFAULT_TRANSFORM = from_origin(500000.0, 4500000.0, 20.0, 20.0)  # 20 m pixels, north-up


def corner_gcps(height: int, width: int) -> list[GroundControlPoint]:
    """Four GCPs at the raster's corners, in lon/lat (like a Sentinel-1 GRD in radar geometry)."""
    return [GroundControlPoint(row=r, col=c, x=2.0 + 0.01 * c, y=45.0 - 0.01 * r)
            for r, c in ((0, 0), (0, width), (height, 0), (height, width))]


def write_raster(path: Path, data: np.ndarray, *, georef: str = "transform", crs: str | None = DEFAULT_CRS,
                 transform: Any = DEFAULT_TRANSFORM, nodata: float | None = None,
                 descriptions: list[str] | None = None, band_tags: list[dict[str, str]] | None = None,
                 tags: dict[str, str] | None = None, dtype: str | None = None,
                 blocksize: int | None = None) -> Path:
    """Write ``data`` (C, H, W) or (H, W) as a GeoTIFF and return its path.

    Args:
        path: file to write.
        data: pixel values; dtype of the file is ``dtype`` or ``data.dtype``.
        georef: "transform" (crs + transform), "gcps" (four corner GCPs in EPSG:4326) or "none".
        crs, transform: used when ``georef == "transform"``.
        nodata: declared nodata value (same for every band).
        descriptions: one band description per band (e.g. ["VV", "VH"]).
        band_tags: one tag dict per band; tags: dataset tags.
        blocksize: write a tiled GeoTIFF with square blocks of this size (multiple of 16).
    """
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[None]
    count, height, width = arr.shape
    profile: dict[str, Any] = {"driver": "GTiff", "width": width, "height": height, "count": count,
                               "dtype": dtype or arr.dtype.name, "nodata": nodata}
    if georef == "transform":
        profile.update(crs=CRS.from_user_input(crs) if crs else None, transform=transform)
    if blocksize:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(arr.astype(profile["dtype"]) if "complex_int" not in profile["dtype"] else arr)
            if georef == "gcps":
                dst.gcps = (corner_gcps(height, width), CRS.from_epsg(4326))
            for b, desc in enumerate(descriptions or [], start=1):
                dst.set_band_description(b, desc)
            for b, btags in enumerate(band_tags or [], start=1):
                dst.update_tags(b, **btags)
            if tags:
                dst.update_tags(**tags)
    return Path(path)


def speckle(shape: tuple[int, ...], seed: int = 0, mean_power: float = 0.05) -> np.ndarray:
    """Linear-power speckle (exponential, single look) like a calibrated GRD, float32."""
    return np.random.default_rng(seed).exponential(mean_power, size=shape).astype(np.float32)
