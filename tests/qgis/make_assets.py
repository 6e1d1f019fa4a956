"""Tiny data for the QGIS tests, written by the engine's Python (not QGIS's): run it as a script.

    .venv/bin/python tests/qgis/make_assets.py OUT_DIR

It runs outside the QGIS test process on purpose: the plugin (and its tests) never import the
engine, torch or rasterio (a second GDAL inside the QGIS process is a known source of crashes).
Writes into OUT_DIR (a few hundred KB, about 5 s):

- ``segment.pkg``, ``detect.pkg``, ``classify.pkg``, ``embed.pkg``, ``reconstruct.pkg``: random
  ViT-Tiny packages (``sarmae init``, 2 channels VV+VH in dB, 32 px input); ``encoder.pkg``: the
  same encoder with 2 blocks instead of 12, for fine-tuning in seconds;
- ``scene.tif``: 64 x 64 dual-pol dB raster (EPSG:32631, 20 m pixels), dark water on the left,
  bright land on the right; ``scene3.tif``: the same with a third band ("angle");
- ``train.tif`` (128 x 128, same layout) and ``labels.gpkg``: water and land polygons over it
  (field ``class``);
- ``chips/<class>/*.tif``: 32 x 32 dual-pol chips of water and land (classification and
  pretraining data).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ORIGIN = (500000.0, 4500000.0)
PIXEL_M = 20.0
CRS = "EPSG:32631"
SIZE = 64
TRAIN_SIZE = 128  # dense fine-tuning needs room for spatially separate train/validation blocks


def write_tif(path: Path, data: np.ndarray, names: list[str], geo: bool = True) -> None:
    import rasterio
    from rasterio.transform import from_origin

    c, h, w = data.shape
    profile = dict(driver="GTiff", width=w, height=h, count=c, dtype="float32")
    if geo:
        profile.update(crs=CRS, transform=from_origin(*ORIGIN, PIXEL_M, PIXEL_M))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(np.float32))
        for i, name in enumerate(names):
            dst.set_band_description(i + 1, name)
        dst.update_tags(UNITS="dB")


def scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """(2, size, size) dB: water (VV -22, VH -28) left of the middle column, land (-8, -14) right."""
    land = np.zeros((size, size), bool)
    land[:, size // 2:] = True
    vv = np.where(land, -8.0, -22.0) + rng.normal(0, 1.5, (size, size))
    vh = np.where(land, -14.0, -28.0) + rng.normal(0, 1.5, (size, size))
    return np.stack([vv, vh])


def labels(path: Path, size: int) -> None:
    """Water (left half) and land (right half) polygons over a ``size`` px scene, 2 px inside."""
    import fiona
    from shapely.geometry import box, mapping

    x0, y1 = ORIGIN
    half = size // 2 * PIXEL_M
    y0 = y1 - size * PIXEL_M
    feats = [{"geometry": mapping(box(x0 + 2 * PIXEL_M, y0 + 2 * PIXEL_M, x0 + half - 2 * PIXEL_M, y1 - 2 * PIXEL_M)),
              "properties": {"class": "water"}},
             {"geometry": mapping(box(x0 + half + 2 * PIXEL_M, y0 + 2 * PIXEL_M, x0 + 2 * half - 2 * PIXEL_M,
                                      y1 - 2 * PIXEL_M)),
              "properties": {"class": "land"}}]
    with fiona.open(path, "w", driver="GPKG", crs=CRS, layer="labels",
                    schema={"geometry": "Polygon", "properties": {"class": "str"}}) as dst:
        dst.writerecords(feats)


def shallow_encoder(dest: Path) -> None:
    """An ``embed`` package with a depth-2 ViT-Tiny encoder: fine-tuning tests in seconds."""
    import torch

    from engine.models import create_model
    from engine.package import default_input, new_card, save_package

    torch.manual_seed(0)
    enc = create_model("vit_tiny_patch16", in_chans=2, img_size=32, depth=2)
    card = new_card("tiny-encoder", "embed", {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict()},
                    default_input(2, "db"), [], {"training": "none: random initialisation, QGIS tests"})
    save_package(enc.state_dict(), card, dest, overwrite=True)


def main(out_dir: str) -> int:
    from engine.cli import main as sarmae

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task, classes in (("segment", "water,land"), ("detect", "ship"), ("classify", "water,land"),
                          ("embed", None), ("reconstruct", None)):
        args = ["init", "--task", task, "--in-chans", "2", "--img-size", "32", "--name", f"tiny-{task}",
                "--output", str(out / f"{task}.pkg"), "--overwrite"]
        if task == "reconstruct":
            args += ["--decoder-dim", "32", "--decoder-depth", "1"]
        if classes:
            args += ["--classes", classes]
        if sarmae(args) != 0:
            return 1
    shallow_encoder(out / "encoder.pkg")
    rng = np.random.default_rng(0)
    img = scene(rng, SIZE)
    write_tif(out / "scene.tif", img, ["VV", "VH"])
    write_tif(out / "scene3.tif", np.concatenate([img, np.linspace(30.0, 45.0, SIZE * SIZE).reshape(1, SIZE, SIZE)]), ["VV", "VH", "angle"])
    write_tif(out / "train.tif", scene(rng, TRAIN_SIZE), ["VV", "VH"])
    labels(out / "labels.gpkg", TRAIN_SIZE)
    for cls, (vv, vh) in {"water": (-22.0, -28.0), "land": (-8.0, -14.0)}.items():
        (out / "chips" / cls).mkdir(parents=True, exist_ok=True)
        for k in range(8):
            chip = np.stack([np.full((32, 32), vv), np.full((32, 32), vh)]) + rng.normal(0, 1.5, (2, 32, 32))
            write_tif(out / "chips" / cls / f"{cls}_{k}.tif", chip, ["VV", "VH"], geo=False)
    print(f"assets written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
