"""Writers: GeoTIFFs streamed strip by strip and GeoPackages, published by ``engine.publish``.

Every raster output keeps the input's CRS and transform (or its GCPs), is tiled and compressed
(a Cloud-Optimised GeoTIFF with ``cog=True``), carries provenance tags, and appears under its
final name only when complete and read back (``engine.publish``: GDAL errors checked, temporary
file verified, lock-checked rename): a failed, cancelled or disk-full run leaves nothing behind and
never touches an existing file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError
from .publish import (
    claim,
    disk_error,
    gdal_errors,
    publish,
    raster_estimate,
    remove_temporary,
    reserve,
    temp_sibling,
    verify_gpkg,
    verify_raster,
)

__all__ = ["GeoTiffWriter", "check_output", "class_colormap", "disk_error", "temp_sibling", "write_features"]


def check_output(path: str | os.PathLike, inputs: list[str], overwrite: bool) -> Path:
    """Refuse an output that equals an input, exists (without overwrite) or cannot be written."""
    out = Path(path).resolve()
    for src in inputs:
        if Path(src).resolve() == out:
            raise OutputError(f"{path}: the output would overwrite the input raster; choose another output path")
    if out.is_dir():
        raise OutputError(f"{path} is a folder; give a file path such as {Path(path) / 'result.tif'}")
    if out.exists() and not overwrite:
        raise OutputError(f"{path} already exists; choose another output or pass --overwrite")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{path}: {parent} is a file, not a folder; choose an output path inside a folder")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"{path}: cannot create the output folder {parent} ({e.strerror})") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the output folder {parent} is not writable; choose a folder you can write to")
    claim(out)  # locked for the current run (engine.publish.Publication), if one is open
    return out


class GeoTiffWriter:
    """Stream rows into a tiled, compressed GeoTIFF; ``commit()`` renames it into place.

    Use as a context manager: leaving the block normally commits, an exception aborts (the
    temporary file is removed, any existing output is left as it was).
    """

    def __init__(self, path: str | os.PathLike, *, width: int, height: int, count: int, dtype: str,
                 crs: Any = None, transform: Any = None, gcps: list | None = None, gcp_crs: Any = None,
                 nodata: float | None = None, colormap: dict | None = None, descriptions: list[str] | None = None,
                 tags: dict[str, str] | None = None, cog: bool = False, blocksize: int = 256,
                 compress: str = "deflate", half_float: bool = False):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.path = Path(path)
        self.tmp = temp_sibling(self.path, ".tif")
        self.cog = cog
        self.count = count
        profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype, tiled=True,
                       blockxsize=blocksize, blockysize=blocksize, compress=compress, BIGTIFF="IF_SAFER")
        if compress.lower() == "deflate":
            # level 1: most of deflate's size gain at a fraction of its CPU, which on a small machine
            # is taken from the model (COG outputs are recompressed by GDAL's COG driver anyway)
            profile["zlevel"] = 1
        if dtype in ("float32", "float64"):
            profile["predictor"] = 3
        if half_float:  # float16 on disk (GDAL's NBITS=16 for Float32), read back as float32
            if dtype != "float32":
                raise ValueError("half_float needs dtype float32")
            profile["nbits"] = 16
            profile.pop("predictor", None)
        if nodata is not None:
            profile["nodata"] = nodata
        if not gcps:
            profile["crs"] = crs
            if transform is not None:
                profile["transform"] = transform
        self.shape = (width, height, count, dtype)
        self.ds = None
        self._closed = False
        try:
            dt = np.dtype(dtype)
            reserve(self.path, raster_estimate(width, height, count, 2 if half_float else dt.itemsize, dt.kind in "fc"))
            with gdal_errors(self.path, "creating it"):
                with warnings.catch_warnings():  # GCPs are set just below; pixel-space output is said in the log
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    self.ds = rasterio.open(self.tmp, "w", **profile)
                if gcps:
                    self.ds.gcps = (gcps, gcp_crs)
                if colormap:
                    self.ds.write_colormap(1, colormap)
                for i, d in enumerate(descriptions or []):
                    self.ds.set_band_description(i + 1, d)
                if tags:
                    self.ds.update_tags(**{k: str(v) for k, v in tags.items()})
        except BaseException as e:
            self.abort()
            if isinstance(e, Exception):
                raise disk_error(self.path, e) from e
            raise
        self.rows_written = 0

    def write_rows(self, row_off: int, data: np.ndarray) -> None:
        """Write (count, rows, width) at ``row_off``."""
        from rasterio.windows import Window as RioWindow

        if data.ndim == 2:
            data = data[None]
        try:
            with gdal_errors(self.path):
                self.ds.write(data, window=RioWindow(0, row_off, data.shape[2], data.shape[1]))
        except BaseException as e:
            self.abort()
            if isinstance(e, Exception):
                raise disk_error(self.path, e) from e
            raise
        self.rows_written += data.shape[1]

    def close(self) -> Path:
        """First phase of ``commit``: flush and close the temporary file (and convert it to a COG),
        read it back (``engine.publish.verify_raster``), without publishing it; returns the
        temporary path (complete, readable). Writers of one run are all closed before any is
        committed, so a disk filling up while the last one is flushed leaves no output of the run
        behind."""
        import rasterio
        from rasterio.shutil import copy as rio_copy

        if self._closed:
            return self.tmp
        try:
            with gdal_errors(self.path, "closing it"):
                self.ds.close()
            if self.cog:
                cog_tmp = temp_sibling(self.path, ".cog.tif")
                try:
                    with gdal_errors(self.path, "converting it to a COG"), rasterio.open(self.tmp) as src:
                        rio_copy(src, cog_tmp, driver="COG", compress="DEFLATE", BIGTIFF="IF_SAFER")
                except BaseException:
                    remove_temporary(cog_tmp)
                    raise
                remove_temporary(self.tmp)
                self.tmp = cog_tmp
            width, height, count, dtype = self.shape
            verify_raster(self.tmp, self.path, width=width, height=height, count=count, dtype=dtype)
        except BaseException as e:
            self.abort()
            if isinstance(e, Exception):
                raise disk_error(self.path, e) from e
            raise
        self._closed = True
        return self.tmp

    def commit(self) -> Path:
        """Close (see ``close``) and publish the temporary file under the final name
        (``engine.publish.publish``: lock-checked rename)."""
        self.close()
        return publish(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self.ds is not None and not self.ds.closed:
                self.ds.close()
        except Exception:  # the file is being discarded anyway
            pass
        remove_temporary(self.tmp)

    def __enter__(self) -> GeoTiffWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def hex_to_rgba(colour: str) -> tuple[int, int, int, int]:
    c = colour.lstrip("#")
    if len(c) not in (6, 8):
        raise ValueError(f"colour '{colour}' is not #rrggbb")
    r, g, b = int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    a = int(c[6:8], 16) if len(c) == 8 else 255
    return r, g, b, a


def class_colormap(classes: list[dict]) -> dict[int, tuple[int, int, int, int]]:
    """Colour table for a uint8 class raster: value i -> class i's colour; 255 (nodata) transparent."""
    cmap = {i: hex_to_rgba(c.get("colour", "#808080")) for i, c in enumerate(classes)}
    cmap[255] = (0, 0, 0, 0)
    return cmap


def write_features(path: str | os.PathLike, features: list[dict], schema: dict, crs: Any,
                   layer: str | None = None) -> Path:
    """Write GeoJSON-like features to a GeoPackage atomically (temp file + rename).

    features: [{"geometry": shapely geometry or mapping, "properties": {...}}]; schema: fiona schema.
    An empty list still writes a valid, empty layer (a detector that found nothing).
    """
    import fiona
    from shapely.geometry import mapping

    path = Path(path)
    tmp = temp_sibling(path, ".gpkg")
    layer = layer or path.stem
    crs_wkt = crs.to_wkt() if crs is not None and hasattr(crs, "to_wkt") else (crs or "")
    try:
        reserve(path, 96 * 1024 + 200 * len(features))  # ~260 bytes per box measured; stays below
        with fiona.open(tmp, "w", driver="GPKG", schema=schema, crs_wkt=crs_wkt, layer=layer) as dst:
            dst.writerecords(
                {"geometry": mapping(f["geometry"]) if hasattr(f["geometry"], "geom_type") else f["geometry"],
                 "properties": f["properties"]}
                for f in features
            )
        verify_gpkg(tmp, path, layer, len(features))
    except BaseException as e:
        remove_temporary(tmp)
        if isinstance(e, Exception):
            raise disk_error(path, e) from e
        raise
    return publish(tmp, path)
