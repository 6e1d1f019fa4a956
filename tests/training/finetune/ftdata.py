"""Tiny data for the fine-tuning tests (segment / detect), made inside each test's tmp_path.

- ``build_encoder``: a random-weight encoder package (ViT-Tiny width, depth 2, 32-64 px).
- ``build_task_package``: the same as a random-weight classify / segment / detect package.
- ``water_land``: a dual-pol dB raster, dark speckled water and bright land split by a wavy
  diagonal, with its truth map (0 water, 1 land) and the labels as polygons.
- ``ship_scene``: dark sea with bright square "ships" on a jittered grid, and their boxes.
- ``chip_folders``: ImageFolder-style 8-bit PNG chips, one sub-folder per class (mean grey level).
Import as ``from ftdata import ...`` (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

CRS = "EPSG:32631"
PIXEL_M = 20.0
ORIGIN = (500000.0, 4500000.0)


def build_encoder(dest: Path, in_chans: int = 2, img_size: int = 32, units: str = "db",
                  bands: list[str] | None = None) -> Path:
    """An ``embed`` package with a depth-2 ViT-Tiny encoder (random weights, seed 0)."""
    import torch

    from engine.models import create_model
    from engine.package import default_input, new_card, save_package

    torch.manual_seed(0)
    enc = create_model("vit_tiny_patch16", in_chans=in_chans, img_size=img_size, depth=2)
    arch = {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict()}
    card = new_card("tiny-encoder", "embed", arch, default_input(in_chans, units, bands), [],
                    {"training": "none: random initialisation, fine-tuning tests"})
    return save_package(enc.state_dict(), card, dest)


def build_task_package(dest: Path, task: str, classes: list[str], in_chans: int = 2, img_size: int = 32) -> Path:
    """A random-weight ``task`` package (depth-2 ViT-Tiny encoder, small heads) for evaluation tests."""
    import torch

    from engine.models import build_from_architecture, create_model
    from engine.package import default_classes, default_input, new_card, save_package

    torch.manual_seed(0)
    enc = create_model("vit_tiny_patch16", in_chans=in_chans, img_size=img_size, depth=2)
    head = {"segment": {"channels": 32}, "detect": {"fpn_channels": 32, "anchor_sizes": [4, 8, 16, 32, 64]}}
    arch = {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict(), "head": head.get(task, {})}
    model = build_from_architecture(arch, task, len(classes))
    card = new_card(f"random-{task}", task, arch, default_input(in_chans), default_classes(classes),
                    {"training": "none: random initialisation, evaluation tests"})
    return save_package(model.state_dict(), card, dest)


def transform():
    from rasterio.transform import from_origin

    return from_origin(*ORIGIN, PIXEL_M, PIXEL_M)


def write_db(path: Path, db: np.ndarray, descriptions=("VV", "VH"), crs: str | None = CRS, tf=None) -> Path:
    """(C, H, W) dB values -> float32 GeoTIFF with band descriptions."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    c, h, w = db.shape
    prof = dict(driver="GTiff", width=w, height=h, count=c, dtype="float32")
    if crs:
        prof.update(crs=crs, transform=tf or transform())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **prof) as dst:
            dst.write(db.astype(np.float32))
            for i, d in enumerate(descriptions[:c]):
                dst.set_band_description(i + 1, d)
    return path


def speckled(mean_db: np.ndarray, rng: np.random.Generator, looks: float = 4.0) -> np.ndarray:
    """Mean backscatter in dB -> one speckled realisation in dB (Gamma(L, 1/L) on intensity)."""
    lin = 10 ** (mean_db / 10) * rng.gamma(looks, 1 / looks, mean_db.shape)
    return 10 * np.log10(np.maximum(lin, 1e-6))


def water_land(path: Path, size: int = 192, seed: int = 0, bands: int = 2,
               descriptions=("VV", "VH")) -> tuple[Path, np.ndarray]:
    """Water (-21 dB) where row + col < size + wave, land (-6 dB) elsewhere; truth 0 water / 1 land."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[:size, :size]
    truth = (r + c >= size + 12 * np.sin(r / 9.0)).astype(np.uint8)
    mean = np.where(truth == 1, -6.0, -21.0)
    db = np.stack([speckled(mean - 6 * k, rng) for k in range(bands)])
    return write_db(path, db, descriptions), truth


def class_polygons(truth: np.ndarray, names: dict[int, str], tf=None) -> list[tuple[object, str]]:
    """Polygons (map coordinates) of each truth value named in ``names``."""
    from rasterio.features import shapes
    from shapely.geometry import shape

    tf = tf or transform()
    return [(shape(g), names[int(v)]) for g, v in shapes(truth, transform=tf) if int(v) in names]


def write_labels(path: Path, feats: list[tuple[object, object]], crs: str | None = CRS, field: str = "class",
                 driver: str | None = None, ftype: str = "str") -> Path:
    """(shapely geometry, value) pairs -> vector file (driver from the suffix: .gpkg/.geojson/.shp)."""
    import fiona
    from shapely.geometry import mapping

    driver = driver or {".gpkg": "GPKG", ".geojson": "GeoJSON", ".shp": "ESRI Shapefile"}[Path(path).suffix]
    schema = {"geometry": "Polygon", "properties": {field: ftype}}
    with fiona.open(path, "w", driver=driver, crs=crs, schema=schema) as dst:
        dst.writerecords([{"geometry": mapping(g), "properties": {field: v}} for g, v in feats])
    return path


def ship_scene(path: Path, size: int = 192, step: int = 24, seed: int = 0) -> tuple[Path, list[tuple]]:
    """Sea (-22 dB) with a bright square ship (+5 dB, 5-9 px) in each step x step cell, jittered;
    returns the raster and the ships' pixel boxes (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    mean = np.full((size, size), -22.0)
    boxes = []
    for r0 in range(0, size - step + 1, step):
        for c0 in range(0, size - step + 1, step):
            s = int(rng.integers(5, 10))
            r, c = r0 + int(rng.integers(3, step - s - 2)), c0 + int(rng.integers(3, step - s - 2))
            mean[r:r + s, c:c + s] = 5.0
            boxes.append((c, r, c + s, r + s))
    db = np.stack([speckled(mean, rng), speckled(mean - 7, rng)])
    return write_db(path, db), boxes


def boxes_to_polygons(boxes: list[tuple], name: str = "ship", tf=None) -> list[tuple[object, str]]:
    """Pixel boxes -> map-coordinate rectangles."""
    from shapely.geometry import box

    tf = tf or transform()
    out = []
    for x0, y0, x1, y1 in boxes:
        (a, b), (c, d) = tf * (x0, y0), tf * (x1, y1)
        out.append((box(min(a, c), min(b, d), max(a, c), max(b, d)), name))
    return out


def chip_folders(root: Path, levels: dict[str, int], n: int = 12, size: int = 32, seed: int = 0) -> Path:
    """``n`` speckled 8-bit PNG chips per class under root/<class>/, class k around grey level levels[k]
    with 4^k looks: classes differ in texture as well as in brightness, so that a classifier that
    standardises each chip (``--standardise``, brightness removed) still tells them apart."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    rng = np.random.default_rng(seed)
    for k, (name, level) in enumerate(levels.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        looks = 4.0 ** k
        for i in range(n):
            img = np.clip(level * rng.gamma(looks, 1 / looks, (size, size)), 0, 255).astype(np.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(root / name / f"{name}_{i:02d}.png", "w", driver="PNG", width=size, height=size,
                                   count=1, dtype="uint8") as dst:
                    dst.write(img, 1)
    return root
