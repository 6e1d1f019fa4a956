"""Tiny chips and rasters for the data tests, written with rasterio (import as ``from chipgen import ...``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

DRIVERS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "GTiff", ".tiff": "GTiff"}


def write_image(path: Path, data: np.ndarray, descriptions: list[str] | None = None,
                nodata: float | None = None) -> Path:
    """Write (C, H, W) or (H, W) ``data`` as PNG/JPEG/TIFF (by extension), no georeferencing."""
    arr = np.asarray(data)
    arr = arr[None] if arr.ndim == 2 else arr
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver=DRIVERS[path.suffix.lower()], width=arr.shape[2],
                           height=arr.shape[1], count=arr.shape[0], dtype=arr.dtype.name, nodata=nodata) as dst:
            dst.write(arr)
            for b, d in enumerate(descriptions or [], start=1):
                dst.set_band_description(b, d)
    return path


def gray8(size: int = 32, seed: int = 0, channels: int = 1) -> np.ndarray:
    """Random 8-bit gray image, replicated to ``channels`` identical bands."""
    g = np.random.default_rng(seed).integers(10, 240, (size, size), dtype=np.uint8)
    return np.repeat(g[None], channels, axis=0)


def make_chip_folder(root: Path, n: int = 6, size: int = 32, ext: str = ".png") -> Path:
    """``n`` gray 8-bit chips in two sub-folders (class-style layout)."""
    for i in range(n):
        write_image(root / f"class{i % 2}" / f"chip{i:02d}{ext}", gray8(size, seed=i))
    return root
