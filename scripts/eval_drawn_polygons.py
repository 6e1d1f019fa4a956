#!/usr/bin/env python3
"""Score a model made from polygons drawn in QGIS on the REST of a labelled raster, beside the
single-threshold (and other classical) baselines fitted on the same polygons.

The QGIS scenario of issue 16: 4 polygons (2 water, 2 land) drawn on the Sen1Floods11 raster with
the plugin's New label layer, fine-tuned from the dock panel with its defaults. The polygons are
kept in ``docs/scenario/polygons_4.geojson``. The test pixels are every hand-labelled pixel
outside a margin of one chip (128 px) around the polygons' bounding boxes, as in
``training/recipes/eval_few_polygons.py``.

    # the package the desktop made (Fine-tune tab, defaults):
    PYTHONPATH=. .venv/bin/python scripts/eval_drawn_polygons.py --package <models folder>/segment_..._labels
    # or re-make it from the polygons with the dialog's defaults (the sarmae CLI), per seed:
    PYTHONPATH=. .venv/bin/python scripts/eval_drawn_polygons.py --encoder <models folder>/demo_encoder --seeds 0 1 2

The dialog's defaults: mode automatic, time budget 5 min, at most 50 epochs, batch size 16,
device cpu. The hand label is 0 dry, 1 water (negative: nodata); the polygons' classes are
``--water`` and ``--land``. Prints one JSON line per package and a summary table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / ".." / "shared" / "data" / "sen1floods11"


def test_labels(label_path: str, polygons: str, classes: list[str], margin: int, out: Path) -> int:
    """Write the test label raster (class index of ``classes``, 255 elsewhere) and return its pixel count."""
    import fiona
    import rasterio
    from rasterio.warp import transform_geom

    with rasterio.open(label_path) as src:
        label, prof, crs = src.read(1), src.profile.copy(), src.crs
        inv = ~src.transform
    test = np.full(label.shape, 255, np.uint8)
    test[label == 1] = classes.index("water")
    test[label == 0] = classes.index("land")
    with fiona.open(polygons) as shapes:
        for f in shapes:
            geom = transform_geom(shapes.crs, crs, f["geometry"])
            pts = np.array([inv * tuple(p[:2]) for ring in _rings(geom) for p in ring])
            c0, r0 = np.floor(pts.min(0)).astype(int)
            c1, r1 = np.ceil(pts.max(0)).astype(int)
            test[max(0, r0 - margin):r1 + margin, max(0, c0 - margin):c1 + margin] = 255
    prof.update(dtype="uint8", nodata=255, count=1)
    with rasterio.open(out, "w", **prof) as dst:
        dst.write(test, 1)
    return int((test != 255).sum())


def _rings(geom: dict):
    if geom["type"] == "Polygon":
        yield from geom["coordinates"]
    else:
        for poly in geom["coordinates"]:
            yield from poly


def finetune(encoder: str, raster: str, polygons: str, seed: int, out: Path, minutes: float, epochs: int) -> float:
    """The dialog's defaults through the CLI; returns the seconds it took."""
    cmd = [sys.executable, "-m", "engine.cli", "finetune", "--task", "segment", "--encoder", encoder,
           "--raster", raster, "--labels", polygons, "--class-field", "class", "--classes", "water,land",
           "--max-minutes", str(minutes), "--epochs", str(epochs), "--batch-size", "16", "--seed", str(seed),
           "--device", "cpu", "--output", str(out), "--overwrite", "--quiet"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", action="append", default=[], help="a package to score (repeat)")
    ap.add_argument("--encoder", help="re-make the model from the polygons with this encoder package")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--polygons", default=str(ROOT / "docs" / "scenario" / "polygons_4.geojson"))
    ap.add_argument("--raster", default=str(DATA / "Spain_7370579_S1Hand.tif"))
    ap.add_argument("--labels", default=str(DATA / "Spain_7370579_LabelHand.tif"))
    ap.add_argument("--margin", type=int, default=128, help="test pixels start this far (px) from the polygons")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "runs" / "eval_drawn_polygons"))
    a = ap.parse_args()
    from training.evaluate import evaluate_raster

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(p, None, None) for p in a.package]
    if a.encoder:
        for seed in a.seeds:
            pkg = out / f"model_s{seed}"
            runs.append((str(pkg), seed, finetune(a.encoder, a.raster, a.polygons, seed, pkg, a.minutes, a.epochs)))
    if not runs:
        ap.error("give --package or --encoder")
    rows: dict[str, list[float]] = {}
    for pkg, seed, seconds in runs:
        classes = [c["name"] for c in json.loads((Path(pkg) / "model.json").read_text())["classes"]]
        with tempfile.TemporaryDirectory() as tmp:
            test = Path(tmp) / "test.tif"
            n = test_labels(a.labels, a.polygons, classes, a.margin, test)
            ev = evaluate_raster(pkg, a.raster, out / f"{Path(pkg).name}_cm.png", label_raster=str(test),
                                 baselines=True, options={"bands": [1, 2], "input_units": "db", "device": "cpu"})
        meta = json.loads((Path(pkg) / "model.json").read_text()).get("provenance", {})
        rec = {"package": pkg, "seed": seed, "train_seconds": None if seconds is None else round(seconds, 1),
               "mode": meta.get("mode"), "test_pixels": n, "water_iou": round(ev["iou"]["water"], 3),
               "mean_iou": round(ev["mean_iou"], 3),
               "baselines": {b["name"]: round(b["iou"]["water"], 3) for b in ev["baselines"]}}
        print(json.dumps(rec), flush=True)
        rows.setdefault("model", []).append(rec["water_iou"])
        for name, v in rec["baselines"].items():
            rows.setdefault(name, []).append(v)
    print(f"\n{'row':<32}{'water IoU (mean +- std)':>26}  n")
    for name, v in rows.items():
        print(f"{name:<32}{np.mean(v):>15.3f} +- {np.std(v):.3f}  {len(v)}")


if __name__ == "__main__":
    main()
