"""Segmentation against the classical baselines (issue: models that beat the baselines): flood /
water on Sen1Floods11, OMBRIA and ETCI 2021, ship pixels on HRSID; each split into a training area
and a test area the model never sees; every table row is scored on the same test pixels.

  sen1floods11  one 512 x 512 scene, VV + VH in dB: the top 60 % of the rows train, the rest test.
  ombria        bi-temporal 8-bit VV chips (before, after) as two bands, flood masks: seeded disjoint
                sets of chips (``--ombria-chips`` each) placed side by side in a training and a test
                mosaic (chips are from different events and places, so the test chips are new places).
  etci          one scene's VV + VH tiles (8-bit) placed on the scene grid; water = flood or
                permanent water; tiles in the top 60 % of the scene's rows train, the rest test.
  hrsid         the four 800 x 800 HRSID images (8-bit, ship instance masks -> sea / ship), split BY
                IMAGE, leave one out: fold ``hrsid:<image>`` trains on the other three (side by side)
                and tests on that image; the table adds the mean +- std of the four folds per row.

Rows: the baselines (``training.baselines``: best single threshold per band, Otsu per band on the
test scene, random forest on per-pixel features; fitted on the training labels) and, per encoder,
the quick mode (light head on the frozen encoder) and ``--mode auto`` (quick, then a full fine-tune
when labels allow; the better validation score kept). Runs are epoch-bound (not time-bound), so
machine load does not favour one row. Prints a table and writes results.json (resumable).

Usage: .venv/bin/python training/recipes/eval_floods.py --encoders random=none mae=runs/.../encoder.pkg
       [--sets sen1floods11 ombria etci hrsid] [--modes head auto] [--epochs 20] [--out runs/eval_floods]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT / ".." / "shared" / "data"

from training.recipes.eval_smoke import floods_data, hrsid_chips, write_raster  # noqa: E402  (repo on sys.path above)


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    a = np.asarray(Image.open(path))
    return a[..., 0] if a.ndim == 3 else a


def sen1floods11(out: Path) -> dict:
    """eval_smoke's split of the scene (top 60 % of the rows train), with both bands (VV, VH)."""
    d = floods_data(out)
    return {"train_raster": d["raster"], "test_raster": d["raster"], "bands": [1, 2], "units": "db",
            "train_labels": d["train_labels"], "test_labels": d["test_labels"]}


def ombria(out: Path, n: int, seed: int = 0) -> dict:
    """Two mosaics of n chips each (before + after bands, flood mask), from disjoint seeded chip sets."""
    s1 = DATA / "ombria" / "OmbriaS1" / "train"
    idx = sorted(int(re.search(r"_(\d+)\.png$", p.name).group(1)) for p in (s1 / "MASK").glob("S1_mask_*.png"))
    if len(set(idx)) != len(idx) or len(idx) < 2 * n:
        raise SystemExit(f"OMBRIA chip indices are not unique or too few ({len(set(idx))} of {len(idx)}); need {2 * n}")
    pick = np.random.default_rng(seed).permutation(idx)
    res = {"bands": [1, 2], "units": "uint8", "chips_each": n}
    for split, ids in (("train", pick[:n]), ("test", pick[n:2 * n])):
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        img = np.zeros((2, rows * 256, cols * 256), np.uint8)
        lab = np.full((rows * 256, cols * 256), -1, np.int16)
        for k, i in enumerate(ids):
            r, c = divmod(k, cols)
            sl = (slice(r * 256, r * 256 + 256), slice(c * 256, c * 256 + 256))
            img[0][sl] = _png(s1 / "BEFORE" / f"S1_before_{i:04d}.png")
            img[1][sl] = _png(s1 / "AFTER" / f"S1_after_{i:04d}.png")
            lab[sl] = (_png(s1 / "MASK" / f"S1_mask_{i:04d}.png") > 127).astype(np.int16)
        res[f"{split}_raster"] = write_raster(out / f"ombria_{split}.tif", img)
        res[f"{split}_labels"] = write_raster(out / f"ombria_{split}_labels.tif", lab, nodata=-1)
    return res


def etci(out: Path, frac: float = 0.6) -> dict:
    """The scene's tiles on their grid, split by tile row: the top ``frac`` of the rows train."""
    base = next((DATA / "etci2021").iterdir()) / "tiles"
    tiles = {}
    for p in (base / "vv").glob("*_vv.png"):
        m = re.search(r"_x-(\d+)_y-(\d+)_vv", p.name)
        tiles[(int(m.group(2)), int(m.group(1)))] = p.name[: -len("_vv.png")]
    ys = sorted({y for y, _ in tiles})
    cut = ys[int(round(frac * len(ys)))]
    res = {"bands": [1, 2], "units": "uint8", "tiles": len(tiles)}
    for split, keep in (("train", lambda y: y < cut), ("test", lambda y: y >= cut)):
        mine = {k: v for k, v in tiles.items() if keep(k[0])}
        y0, x0 = min(y for y, _ in mine), min(x for _, x in mine)
        h, w = (max(y for y, _ in mine) - y0 + 1) * 256, (max(x for _, x in mine) - x0 + 1) * 256
        img = np.zeros((2, h, w), np.uint8)
        lab = np.full((h, w), -1, np.int16)
        for (y, x), stem in mine.items():
            sl = (slice((y - y0) * 256, (y - y0 + 1) * 256), slice((x - x0) * 256, (x - x0 + 1) * 256))
            img[0][sl], img[1][sl] = _png(base / "vv" / f"{stem}_vv.png"), _png(base / "vh" / f"{stem}_vh.png")
            water = (_png(base / "flood_label" / f"{stem}.png") > 127) | (_png(base / "water_body_label" / f"{stem}.png") > 127)
            lab[sl] = water.astype(np.int16)
        res[f"{split}_raster"] = write_raster(out / f"etci_{split}.tif", img)
        res[f"{split}_labels"] = write_raster(out / f"etci_{split}_labels.tif", lab, nodata=-1)
        res[f"{split}_tiles"] = len(mine)
    return res


def hrsid_folds(out: Path) -> list[dict]:
    """Leave one image out: per HRSID image, a training mosaic of the other three side by side and
    the image itself as the test raster, each with a sea (0) / ship (1) label raster."""
    stems, imgs, ids = hrsid_chips()
    folds = []
    for k, stem in enumerate(stems):
        rest = [i for i in range(len(stems)) if i != k]
        d = {"set": f"hrsid:{stem.split('_')[0]}", "bands": [1], "units": "uint8", "classes": ["sea", "ship"],
             "test_image": stem}
        for split, keep in (("train", rest), ("test", [k])):
            img = np.concatenate([imgs[i] for i in keep], 1)
            lab = np.concatenate([(ids[i] > 0).astype(np.uint8) for i in keep], 1)
            d[f"{split}_raster"] = write_raster(out / f"hrsid_{k}_{split}.tif", img)
            d[f"{split}_labels"] = write_raster(out / f"hrsid_{k}_{split}_labels.tif", lab)
        folds.append(d)
    return folds


def run(d: dict, name: str, pkg: str, mode: str, a, out: Path, with_baselines: bool) -> dict:
    from training.evaluate import evaluate_raster
    from training.finetune.config import FinetuneConfig
    from training.finetune.segment import finetune_segmenter

    cfg = FinetuneConfig(encoder="" if pkg == "none" else pkg, img_size=a.img_size, seed=a.seed, epochs=a.epochs,
                         batch_size=16, warmup_epochs=1.0, patience=100, bands=d["bands"], input_units=d["units"],
                         max_chips=a.max_chips, device="cpu", mode=mode, in_chans=len(d["bands"]))
    tag = d["set"].replace(":", "_")
    dest = out / f"{tag}_{name}_{mode}.pkg"
    t0, c0 = time.time(), time.process_time()
    r = finetune_segmenter(d["train_raster"], dest, cfg, label_raster=d["train_labels"],
                           classes=d.get("classes", ["dry", "water"]), overwrite=True)
    train_min, train_cpu = (time.time() - t0) / 60, (time.process_time() - c0) / 60
    ev = evaluate_raster(str(dest), d["test_raster"], out / f"{tag}_{name}_{mode}_confusion.png",
                         label_raster=d["test_labels"],
                         options={"bands": d["bands"], "input_units": d["units"], "device": "cpu", "batch_size": 8},
                         baselines=with_baselines)
    return {"val_iou": r["val_iou"], "test_iou": ev["iou"], "test_mean_iou": ev["mean_iou"], "mode_kept": r["mode"],
            "train_chips": r["train_chips"], "train_minutes": round(train_min, 2), "train_cpu_minutes": round(train_cpu, 2),
            "baselines": ev.get("baselines"), "positive": d.get("classes", ["dry", "water"])[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", required=True, help="name=package (or name=none for random init)")
    ap.add_argument("--sets", nargs="+", default=["sen1floods11", "ombria", "etci"])
    ap.add_argument("--modes", nargs="+", default=["head", "auto"], choices=["head", "auto", "full"])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--max-chips", type=int, default=400)
    ap.add_argument("--ombria-chips", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "eval_floods"))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    out = Path(a.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    makers = {"sen1floods11": lambda: [{"set": "sen1floods11", **sen1floods11(out / "data")}],
              "ombria": lambda: [{"set": "ombria", **ombria(out / "data", a.ombria_chips)}],
              "etci": lambda: [{"set": "etci", **etci(out / "data")}], "hrsid": lambda: hrsid_folds(out / "data")}
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    done = {(r["set"], r["encoder"], r["mode"]) for r in results}
    sets = [d for s in a.sets for d in makers[s]()]
    for d in sets:
        s = d["set"]
        for spec in a.encoders:
            name, pkg = spec.split("=", 1)
            for mode in a.modes:
                if (s, name, mode) in done:
                    continue
                first = not any(r["set"] == s and r.get("baselines") for r in results)
                rec = {"set": s, "encoder": name, "mode": mode, **run(d, name, pkg, mode, a, out, first)}
                results.append(rec)
                (out / "results.json").write_text(json.dumps(results, indent=1))
                print(json.dumps(rec), flush=True)
    print(f"\n{'set':<14}{'row':<34}{'IoU':>10}{'mean IoU':>10}  (test area; IoU of water, or of ship)")
    folds: dict[str, list[float]] = {}
    for s in [d["set"] for d in sets]:
        rows = [r for r in results if r["set"] == s]
        for r in rows:
            pos = r.get("positive", "water")
            for b in r.get("baselines") or []:
                print(f"{s:<14}{b['name']:<34}{b['iou'][pos] or 0:>10.3f}{b['mean_iou']:>10.3f}")
                folds.setdefault(s.split(":")[0] + " | " + b["name"], []).append(b["iou"][pos] or 0)
        for r in rows:
            pos = r.get("positive", "water")
            label = f"{r['encoder']} {r['mode']}" + (f" (kept {r['mode_kept']})" if r.get("mode_kept") else "")
            print(f"{s:<14}{label:<34}{r['test_iou'][pos] or 0:>10.3f}{r['test_mean_iou']:>10.3f}"
                  f"  {r['train_minutes']:.1f} min ({r.get('train_cpu_minutes', float('nan')):.1f} CPU), "
                  f"{r['train_chips']} chips")
            folds.setdefault(s.split(":")[0] + " | " + f"{r['encoder']} {r['mode']}", []).append(r["test_iou"][pos] or 0)
    for key, v in folds.items():  # data sets split into folds (hrsid: leave one image out)
        if key.startswith("hrsid |"):
            print(f"{key}: ship IoU {np.mean(v):.3f} +- {np.std(v):.3f} over {len(v)} held-out image(s)")


if __name__ == "__main__":
    main()
