"""Helpers shared by the benchmark scripts: big test rasters and small model packages."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def big_scene(path: Path, size: int, tile: int = 1024, seed: int = 0) -> Path:
    """A size x size, 2-band float32 dB GeoTIFF made of randomly flipped synthetic scene tiles,
    written block by block (never held whole in memory)."""
    if path.exists():  # before any import: a measured process only opens the file
        return path
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from training.data.synthetic import make_scene

    src = make_scene(path.parent / "tile_src", size=tile, seed=seed).image
    with rasterio.open(src) as s:
        base = s.read()
    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", width=size, height=size, count=2, dtype="float32", crs="EPSG:32631",
                   transform=from_origin(500000, 4650000, 10, 10), tiled=True, blockxsize=512, blockysize=512,
                   compress="none", BIGTIFF="IF_SAFER")
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for r in range(0, size, tile):
            for c in range(0, size, tile):
                t = base[:, :: rng.choice([-1, 1]), :: rng.choice([-1, 1])]
                h, w = min(tile, size - r), min(tile, size - c)
                dst.write(t[:, :h, :w], window=Window(c, r, w, h))
        dst.set_band_description(1, "VV")
        dst.set_band_description(2, "VH")
        dst.update_tags(UNITS="dB")
    tmp.rename(path)
    return path


def small_package(path: Path, task: str = "segment", depth: int = 12, img: int = 224, classes=("water", "land"),
                  head_channels: int | None = None, head: dict | None = None) -> Path:
    """A ViT-Tiny package (random weights; speed and memory do not depend on the weights)."""
    if path.exists():  # before importing torch: a measured onnxruntime process must not import it
        return path
    import torch

    from engine.models import build_from_architecture, create_model
    from engine.package import default_classes, default_input, new_card, save_package

    torch.manual_seed(0)
    enc = create_model("vit_tiny_patch16", in_chans=2, img_size=img, depth=depth)
    arch = {"name": "vit_tiny_patch16" if depth == 12 else "custom", "encoder": enc.cfg.to_dict()}
    if head_channels:
        arch["head"] = {"channels": head_channels}
    if head:
        arch["head"] = dict(head)
    cls = default_classes(list(classes)) if task in ("segment", "classify", "detect") else []
    model = build_from_architecture(arch, task, len(cls))
    save_package(model.state_dict(), new_card(f"bench-{task}-d{depth}", task, arch, default_input(2), cls), path)
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM on Linux. (``ru_maxrss`` survives exec: a
    child forked from a big parent, e.g. one that imported torch to export a model, reports at
    least the parent's size there.)"""
    return rss_mb()["hwm"]


def rss_mb() -> dict[str, float]:
    """{"rss": resident now, "hwm": peak so far} in MB (Linux /proc; elsewhere the peak only)."""
    try:
        with open("/proc/self/status") as f:
            kv = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return {"rss": int(kv["VmRSS"].split()[0]) / 1024.0, "hwm": int(kv["VmHWM"].split()[0]) / 1024.0}
    except (OSError, KeyError, ValueError):
        import resource

        return {"rss": float("nan"), "hwm": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
