"""Tiny labelled data for the SARCLIP training tests, made inside each test's tmp_path.

- ``class_chips``: 8-bit PNG chips in class folders ``<k>-<name>/`` (MSTAR's layout), one pattern
  per class (a bright centre, stripes, dark speckle), so a small model can tell them apart.
- ``mask_tiles``: PNG images with flood masks in a sibling folder (OMBRIA's layout) of known shares.
- ``instance_scene``: a gray-as-RGB PNG scene with an RGB instance mask (HRSID's layout).
- ``polygon_raster``: a georeferenced dB GeoTIFF and a GeoPackage of classed polygons on it.
- ``tiny_model``: an open_clip config small enough for a test step in well under a second.
Import as ``from clipdata import ...`` (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

CRS = "EPSG:32631"


def _png(path: Path, a: np.ndarray) -> Path:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    path.parent.mkdir(parents=True, exist_ok=True)
    a = a if a.ndim == 3 else a[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="PNG", height=a.shape[1], width=a.shape[2], count=a.shape[0],
                           dtype="uint8") as ds:
            ds.write(a.astype(np.uint8))
    return path


def pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    noise = rng.normal(0, 12, (size, size))
    if kind == "bright":
        r = np.hypot(yy - size / 2 + rng.integers(-2, 3), xx - size / 2 + rng.integers(-2, 3))
        a = 40 + 200 * (r < size / 5)
    elif kind == "stripes":
        a = 60 + 140 * ((xx + rng.integers(0, 4)) // 4 % 2)
    else:
        a = np.full((size, size), 30.0)
    return np.clip(a + noise, 0, 255)


def class_chips(root: Path, classes=("bright", "stripes", "dark"), n: int = 12, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        for i in range(n):
            _png(root / f"{k}-{c}" / f"{i:03d}.png", pattern(c, size, rng))
    return root


def mask_tiles(root: Path, shares=(0.0, 0.25, 0.75), size: int = 32) -> Path:
    """images/img_<i>.png and masks/mask_<i>.png: the left ``share`` of the columns flooded (255)."""
    rng = np.random.default_rng(1)
    for i, s in enumerate(shares):
        m = np.zeros((size, size), np.uint8)
        m[:, : int(round(s * size))] = 255
        _png(root / "images" / f"img_{i}.png", np.where(m > 0, 20, 150) + rng.normal(0, 5, m.shape))
        _png(root / "masks" / f"mask_{i}.png", m)
    return root


def instance_scene(root: Path, size: int = 64) -> Path:
    """scene.png (gray stored as RGB) with two ships in the top-left 32 px window, one in the bottom-right."""
    img = np.full((size, size), 30.0)
    ids = np.zeros((3, size, size), np.uint8)
    for n, (r, c) in enumerate([(4, 4), (16, 20), (40, 44)], start=1):
        img[r:r + 5, c:c + 3] = 250
        ids[0, r:r + 5, c:c + 3] = 64 * n
        ids[1, r:r + 5, c:c + 3] = 128
    _png(root / "scene.png", np.repeat(img[None], 3, axis=0))
    _png(root / "scene_instance_id_RGB.png", ids)
    return root / "scene.png"


def polygon_raster(root: Path) -> tuple[Path, Path]:
    """scene.tif (1 band dB, 20 m, 128 px) and labels.gpkg: 'field' / 'lake' squares in map coordinates."""
    import fiona
    import rasterio
    from rasterio.transform import from_origin
    from shapely.geometry import box, mapping

    root.mkdir(parents=True, exist_ok=True)
    t = from_origin(500000.0, 4500000.0, 20.0, 20.0)
    a = np.random.default_rng(2).normal(-12, 1.5, (1, 128, 128)).astype(np.float32)
    a[0, 70:110, 70:110] = -22
    tif = root / "scene.tif"
    with rasterio.open(tif, "w", driver="GTiff", height=128, width=128, count=1, dtype="float32", crs=CRS,
                       transform=t) as ds:
        ds.write(a)
        ds.set_band_description(1, "VV")
    gpkg = root / "labels.gpkg"
    polys = [("field", (10, 10, 40, 40)), ("lake", (75, 75, 105, 105))]  # (col0, row0, col1, row1)
    schema = {"geometry": "Polygon", "properties": {"kind": "str"}}
    with fiona.open(gpkg, "w", driver="GPKG", crs=CRS, schema=schema) as dst:
        for name, (c0, r0, c1, r1) in polys:
            x0, y1 = t * (c0, r0)
            x1, y0 = t * (c1, r1)
            dst.write({"geometry": mapping(box(x0, y0, x1, y1)), "properties": {"kind": name}})
    return tif, gpkg


def tiny_model(img_size: int = 32) -> dict:
    return {"embed_dim": 32, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "image_size": img_size},
            "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
