"""fp32 vs int8 end to end on CPUs (ratios and label agreement measured in one run; not timed tests).

ViT-Tiny segmentation (light head, UPerNet head, and a light head trained briefly on the synthetic
scene's water polygons), SIZE^2 x 2 float32 raster, window 224, overlap 0.25, batch 8, onnxruntime
with 2 threads; fp32 (model.onnx) and int8 (model.int8.onnx, ``sarmae export --precision int8``
with the scene as calibration raster) passes alternate, each timed end to end and model-only on the
same windows. Label agreement: the int8 run's class raster against the fp32 run's, over all pixels.

Usage: python benchmarks/bench_precision.py [--size 4096] [--repeats 2] [--models light,upernet,trained]
       [--method dynamic|static]
Targets (issue 12): int8 end-to-end >= 1.8x fp32, agreement >= 99 %, end-to-end / model-only >= 0.95.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import ROOT, big_scene, small_package

WORK = ROOT / "benchmarks" / "_work"
HEADS = {"light": {"kind": "light"}, "upernet": {}}


def trained_package(dest: Path, tile: Path) -> Path:
    """A light head fitted (quick mode) on a frozen ViT-Tiny encoder to the synthetic tile's water polygons."""
    if dest.exists():
        return dest
    import fiona

    from training.finetune.config import FinetuneConfig
    from training.finetune.segment import finetune_segmenter

    enc = small_package(WORK / "encoder_d12", "embed", 12, classes=())
    src = tile / "synthetic_s1_labels.gpkg"
    water = WORK / "water_labels.gpkg"
    if not water.exists():
        with fiona.open(src) as s, fiona.open(water, "w", **s.meta) as d:
            d.writerecords(f for f in s if f["properties"]["class"] == "water")
    cfg = FinetuneConfig(task="segment", encoder=str(enc), mode="head", batch_size=16, device="cpu", max_chips=200)
    r = finetune_segmenter([str(tile / "synthetic_s1.tif")], dest, cfg, labels=str(water), class_field="class",
                           classes=["water", "land"], background="land")
    print(f"  trained light head: validation mean IoU {r['val_mean_iou']:.3f}", flush=True)
    return dest


def package(name: str, scene: Path, method: str) -> Path:
    """The package of ``name`` with model.onnx and model.int8.onnx (calibrated on the scene's windows)."""
    from engine.export import export_package

    path = WORK / f"prec_{name}_{method}"
    if not (path / "model.int8.onnx").exists():
        if name == "trained":
            trained_package(path, WORK / "tile_src")
        else:
            small_package(path, "segment", 12, head=HEADS[name])
        export_package(path, precision="int8", calibration=scene, method=method, force=True)
    return path


def one_pass(scene: Path, pkg_path: Path, precision: str, size: int, out: Path) -> dict:
    """End to end (run_inference) then model-only on the same windows (read first, untimed)."""
    from engine.backends import choose_backend
    from engine.inference import InferenceOptions, _read_padded, run_inference
    from engine.package import load_package
    from engine.radiometry import Radiometry
    from engine.reader import SarRaster
    from engine.tiling import Window, plan_tiles

    pkg = load_package(pkg_path, lazy=True)
    opts = InferenceOptions(batch_size=8, backend="onnxruntime", precision=precision, threads=2, overlap=0.25,
                            overwrite=True, device="cpu")
    t0 = time.perf_counter()
    be = choose_backend("onnxruntime", pkg, "cpu", (8, 2, 224, 224), 2, log=lambda m: None, precision=precision)
    res = run_inference([str(scene)], out, pkg, opts, backend=be)
    e2e = time.perf_counter() - t0
    with SarRaster.open([str(scene)]) as r:
        rad = Radiometry.for_raster(pkg.card.input, r)
        region = Window(0, 0, size, size)
        wins = list(plan_tiles(size, size, 224, 0.25).windows)
        t_model = 0.0
        for i in range(0, len(wins), 8):
            x = np.stack([rad.apply(*_read_padded(r, w, 224, region)) for w in wins[i:i + 8]])
            t1 = time.perf_counter()
            be.run(x)
            t_model += time.perf_counter() - t1
    return {"e2e_s": e2e, "model_s": t_model, "windows": len(wins), "out": res.outputs["class"]}


def agreement(a: str, b: str) -> float:
    import rasterio

    with rasterio.open(a) as x, rasterio.open(b) as y:
        same = total = 0
        for _, win in x.block_windows(1):
            u, v = x.read(1, window=win), y.read(1, window=win)
            same += int((u == v).sum())
            total += u.size
    return same / total


def run(size: int = 4096, repeats: int = 2, models: str = "light,upernet,trained", method: str = "dynamic") -> None:
    import json
    from types import SimpleNamespace

    a = SimpleNamespace(size=size, repeats=repeats, method=method)
    WORK.mkdir(parents=True, exist_ok=True)
    scene = big_scene(WORK / f"scene_{a.size}.tif", a.size)
    for name in models.split(","):
        pkg = package(name, scene, a.method)

        gate = json.loads((pkg / "model.json").read_text())["onnx"]["int8"]["gate"]
        runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
        for i in range(a.repeats):
            for prec in (("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")):
                r = one_pass(scene, pkg, prec, a.size, WORK / f"prec_out_{name}_{prec}.tif")
                runs[prec].append(r)
                print(f"  {name} pass {i + 1} {prec}: {r['windows'] / r['e2e_s']:.1f} windows/s end to end, "
                      f"{r['windows'] / r['model_s']:.1f} model-only -> efficiency {r['model_s'] / r['e2e_s']:.3f}",
                      flush=True)
        med = {p: sorted(x["e2e_s"] for x in v)[len(v) // 2] for p, v in runs.items()}
        eff = {p: sorted(x["model_s"] / x["e2e_s"] for x in v)[len(v) // 2] for p, v in runs.items()}
        agree = agreement(runs["fp32"][0]["out"], runs["int8"][0]["out"])
        print(f"{name} ({a.method}, {a.size}^2, batch 8, 2 threads): int8/fp32 end to end {med['fp32'] / med['int8']:.2f}x "
              f"(fp32 {runs['fp32'][0]['windows'] / med['fp32']:.1f}, int8 {runs['int8'][0]['windows'] / med['int8']:.1f} "
              f"windows/s); efficiency fp32 {eff['fp32']:.3f}, int8 {eff['int8']:.3f}; label agreement over the raster "
              f"{agree:.4f}; export gate {gate['value']:.4f} on {gate['windows']} windows", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096, help="raster side (the issue's set-up: 8192)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating fp32 / int8 passes per model")
    ap.add_argument("--models", default="light,upernet,trained")
    ap.add_argument("--method", default="dynamic", choices=["dynamic", "static"])
    a = ap.parse_args()
    run(a.size, a.repeats, a.models, a.method)


if __name__ == "__main__":
    main()
