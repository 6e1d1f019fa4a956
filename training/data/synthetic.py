"""A realistic synthetic dual-pol SAR scene with ground truth, for demos and tests.

The scene is built in linear power and written in dB, like a calibrated, terrain-flattened
Sentinel-1 GRD: open water (dark, VV ~ -21 dB, VH ~ -28 dB, with wind streaks), land textures
(fields and forest, VV -8..-12 dB, VH -14..-19 dB), built-up areas (bright, -2 dB), ships (point
targets on water, +5..+15 dB, with a sinc^2 cross of sidelobes along range and azimuth) and
multiplicative speckle (Gamma with L looks, independent per polarisation). Ground truth: water
polygons and ship boxes in a GeoPackage with a ``class`` field, in the scene's projected CRS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Mean backscatter (dB) per class and polarisation: (VV, VH)
CLASS_DB = {"water": (-21.0, -28.0), "field": (-10.5, -17.5), "forest": (-8.0, -14.0), "urban": (-2.0, -8.0)}


@dataclass
class Scene:
    image: Path  # 2-band float32 dB GeoTIFF (VV, VH)
    labels: Path  # GeoPackage: polygons with field 'class' (water, ship)
    land_cover: np.ndarray  # (H, W) uint8: 0 water, 1 field, 2 forest, 3 urban
    ships: list[tuple[float, float, float, float]]  # pixel boxes (col0, row0, col1, row1)


def _smooth_noise(rng, shape, sigma):
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), sigma)
    return (f - f.mean()) / (f.std() + 1e-12)


def make_scene(out_dir: str | Path, size: int = 1024, seed: int = 0, pixel_m: float = 10.0, looks: float = 4.0,
               n_ships: int | None = None, epsg: int = 32631, name: str = "synthetic_s1") -> Scene:
    """Write ``<name>.tif`` (VV, VH in dB) and ``<name>_labels.gpkg`` into ``out_dir``."""
    import fiona
    import rasterio
    from rasterio.features import shapes
    from rasterio.transform import from_origin
    from shapely.geometry import box, mapping, shape

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = w = size
    # land cover: a coastline from a smooth field plus a river; land split into fields/forest/urban
    coast = _smooth_noise(rng, (h, w), size / 10) + np.linspace(-1.2, 1.2, w)[None, :]
    river = np.abs(_smooth_noise(rng, (h, w), size / 6)) < 0.06
    water = (coast < 0) | river
    kind = _smooth_noise(rng, (h, w), size / 40)
    cover = np.where(kind > 0.35, 2, 1).astype(np.uint8)
    cover[_smooth_noise(rng, (h, w), size / 60) > 1.6] = 3
    cover[water] = 0
    # mean backscatter in linear power, with textures
    sigma0 = np.zeros((2, h, w), np.float64)
    for k, cls in enumerate(CLASS_DB):
        for p in range(2):
            sigma0[p][cover == k] = 10 ** (CLASS_DB[cls][p] / 10)
    fields = 1.0 + 0.35 * np.sign(np.sin(np.arange(w)[None, :] / 23.0 + 3 * _smooth_noise(rng, (h, w), 30)))
    sigma0[:, cover == 1] *= fields[cover == 1]
    wind = 10 ** (2.0 * _smooth_noise(rng, (h, w), size / 25) / 10)  # +-2 dB wind streaks on water
    sigma0[:, water] *= wind[water]
    # ships: bright targets on open water, well inside the water body
    from scipy.ndimage import binary_erosion

    deep = binary_erosion(water, iterations=12)
    candidates = np.argwhere(deep)
    n_ships = n_ships if n_ships is not None else max(3, size // 64)
    ships = []
    if len(candidates):
        for r, c in candidates[rng.choice(len(candidates), min(n_ships, len(candidates)), replace=False)]:
            length, width = rng.uniform(6, 18), rng.uniform(2, 5)
            vertical = rng.random() < 0.5
            hh, ww = (length, width) if vertical else (width, length)
            r0, r1 = int(r - hh / 2), int(r + hh / 2) + 1
            c0, c1 = int(c - ww / 2), int(c + ww / 2) + 1
            peak = 10 ** (rng.uniform(5, 15) / 10)
            sigma0[:, r0:r1, c0:c1] = np.array([peak, peak / 8])[:, None, None]
            # sidelobes: sinc^2 along range and azimuth through the ship centre
            span = np.arange(-40, 41)
            lobe = peak * np.sinc(span / 2.0) ** 2
            rr, cc = np.clip(r + span, 0, h - 1), np.clip(c + span, 0, w - 1)
            sigma0[0, rr, c] = np.maximum(sigma0[0, rr, c], lobe)
            sigma0[0, r, cc] = np.maximum(sigma0[0, r, cc], lobe)
            ships.append((float(c0), float(r0), float(c1), float(r1)))
    # speckle: intensity * Gamma(L, 1/L), independent per polarisation
    speckled = sigma0 * rng.gamma(looks, 1.0 / looks, size=sigma0.shape)
    db = (10 * np.log10(np.maximum(speckled, 1e-6))).astype(np.float32)
    transform = from_origin(500000.0, 4650000.0, pixel_m, pixel_m)
    img = out / f"{name}.tif"
    profile = dict(driver="GTiff", width=w, height=h, count=2, dtype="float32", crs=f"EPSG:{epsg}",
                   transform=transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate", nodata=None)
    with rasterio.open(img, "w", **profile) as dst:
        dst.write(db)
        dst.set_band_description(1, "VV")
        dst.set_band_description(2, "VH")
        dst.update_tags(UNITS="dB", SOURCE="sarmae synthetic scene", SEED=str(seed), LOOKS=str(looks))
    # ground truth: water polygons (large ones) and ship boxes
    labels = out / f"{name}_labels.gpkg"
    feats = []
    for geom, _ in shapes(water.astype(np.uint8), mask=water, transform=transform):
        g = shape(geom)
        if g.area >= 400 * pixel_m * pixel_m:
            feats.append({"geometry": mapping(g), "properties": {"class": "water"}})
    for c0, r0, c1, r1 in ships:
        x0, y0 = transform * (c0, r0)
        x1, y1 = transform * (c1, r1)
        feats.append({"geometry": mapping(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))),
                      "properties": {"class": "ship"}})
    if labels.exists():
        labels.unlink()
    with fiona.open(labels, "w", driver="GPKG", crs=f"EPSG:{epsg}", layer="labels",
                    schema={"geometry": "Polygon", "properties": {"class": "str"}}) as dst:
        dst.writerecords(feats)
    return Scene(img, labels, cover, ships)
