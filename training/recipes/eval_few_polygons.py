"""The analyst's few-polygon case (issue: the analyst's loop): N small polygons per class drawn on a
labelled raster, a model from them with the default settings (quick mode below a few dozen chips),
and its map scored on the REST of the raster beside the baselines fitted on the same polygons.

Polygons are squares of ``--side`` px placed (seeded) where the hand label is pure; the test pixels
are every labelled pixel outside a margin of one chip around the polygons. Defaults: Sen1Floods11
(VV + VH in dB, dry / water), 2 polygons per class, 3 seeds. Prints a table (water IoU, mean IoU,
training seconds) and writes results.json.

Usage: .venv/bin/python training/recipes/eval_few_polygons.py --encoders random=none [mae=PKG]
       [--per-class 2] [--seeds 0 1 2] [--out runs/eval_few_polygons]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT / ".." / "shared" / "data"


def draw_polygons(label: np.ndarray, per_class: int, side: int, rng: np.random.Generator) -> list[tuple]:
    """(row, col, class) of pure ``side`` px squares, ``per_class`` per class value (0, 1), seeded."""
    from scipy.ndimage import minimum_filter

    picks = []
    for k in (0, 1):
        pure = minimum_filter((label == k).astype(np.uint8), size=side, mode="constant") > 0
        rr, cc = np.nonzero(pure)
        for i in rng.permutation(len(rr))[:per_class]:
            picks.append((int(rr[i]) - side // 2, int(cc[i]) - side // 2, k))
    return picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", required=True, help="name=package (or name=none for random init)")
    ap.add_argument("--raster", default=str(DATA / "sen1floods11" / "Spain_7370579_S1Hand.tif"))
    ap.add_argument("--labels", default=str(DATA / "sen1floods11" / "Spain_7370579_LabelHand.tif"),
                    help="hand label raster: 0 dry, 1 water, negative = nodata")
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--side", type=int, default=24)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "runs" / "eval_few_polygons"))
    a = ap.parse_args()
    import fiona
    import rasterio
    import torch
    from shapely.geometry import box, mapping

    from training.evaluate import evaluate_raster
    from training.finetune.config import FinetuneConfig
    from training.finetune.segment import finetune_segmenter
    from training.recipes.eval_smoke import write_raster

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with rasterio.open(a.labels) as src:
        label, prof = src.read(1), {"crs": src.crs, "transform": src.transform}
    tf = prof["transform"]
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    done = {(r["encoder"], r["seed"]) for r in results}
    for seed in a.seeds:
        squares = draw_polygons(label, a.per_class, a.side, np.random.default_rng(seed))
        gpkg = out / f"polygons_s{seed}.gpkg"
        if not gpkg.exists():
            schema = {"geometry": "Polygon", "properties": {"class": "str"}}
            with fiona.open(gpkg, "w", driver="GPKG", crs=prof["crs"], schema=schema) as dst:
                for r, c, k in squares:
                    (x0, y0), (x1, y1) = tf * (c, r), tf * (c + a.side, r + a.side)
                    dst.write({"geometry": mapping(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))),
                               "properties": {"class": ["dry", "water"][k]}})
        test = label.astype(np.int16).copy()
        for r, c, _ in squares:  # the test area: everything labelled away from the polygons
            m = a.img_size
            test[max(0, r - m):r + a.side + m, max(0, c - m):c + a.side + m] = -1
        test_path = out / f"test_labels_s{seed}.tif"
        write_raster(test_path, test, nodata=-1, **prof)
        for spec in a.encoders:
            name, pkg = spec.split("=", 1)
            if (name, seed) in done:
                continue
            cfg = FinetuneConfig(encoder="" if pkg == "none" else pkg, img_size=a.img_size, seed=seed, device="cpu",
                                 bands=[1, 2], input_units="db", in_chans=2)
            t0 = time.time()
            r = finetune_segmenter(a.raster, out / f"{name}_s{seed}.pkg", cfg, labels=str(gpkg), class_field="class",
                                   classes=["dry", "water"], overwrite=True)
            seconds = time.time() - t0
            ev = evaluate_raster(str(out / f"{name}_s{seed}.pkg"), a.raster, out / f"{name}_s{seed}_cm.png",
                                 label_raster=str(test_path), baselines=True,
                                 options={"bands": [1, 2], "input_units": "db", "device": "cpu"})
            rec = {"encoder": name, "seed": seed, "mode": r["mode"], "train_seconds": round(seconds, 1),
                   "validation": r["validation"], "test_iou": ev["iou"], "test_mean_iou": ev["mean_iou"],
                   "test_pixels": ev["labelled_pixels"], "baselines": ev["baselines"]}
            results.append(rec)
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(json.dumps(rec), flush=True)
    rows: dict[str, list] = {}
    for r in results:
        rows.setdefault(f"{r['encoder']} ({r['mode']})", []).append((r["test_iou"]["water"], r["test_mean_iou"],
                                                                     r["train_seconds"]))
        for b in r["baselines"]:
            rows.setdefault(b["name"], []).append((b["iou"]["water"], b["mean_iou"], 0.0))
    print(f"\n{'row':<28}{'water IoU':>18}{'mean IoU':>18}{'train s':>10}   (mean +- std over seeds)")
    for k, v in rows.items():
        v = np.array(v, dtype=float)
        print(f"{k:<28}{v[:, 0].mean():>11.3f} +- {v[:, 0].std():.3f}{v[:, 1].mean():>11.3f} +- {v[:, 1].std():.3f}"
              f"{v[:, 2].mean():>10.1f}   (n={len(v)})")


if __name__ == "__main__":
    main()
