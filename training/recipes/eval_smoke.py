"""Smoke-scale checks that the label-raster and polygon paths learn, on real SAR samples
(issue: fine-tuning), for random init vs pretrained encoders. Every test area is one the model
never saw in training.

  baselines the references without deep learning, for both segmentation checks
            (``training.baselines``, as ``sarmae evaluate --baselines``): the best threshold and Otsu
            on the band, and a random forest on per-pixel features, fitted on the training labels and
            scored on the test area with the models.
  cfar      the reference without learning for ship detection: CA-CFAR (engine.cfar) with fixed
            generic windows, its false-alarm probability chosen by mAP@0.5 and its score threshold by F1 on
            the TRAINING strip, run
            over the test strip and scored like the detectors.
  floods    Sen1Floods11 (S1 VV in dB, hand labels dry / water, -1 = nodata): trained on the top
            60 % of the rows (label raster), evaluated by the engine over the scene against the
            bottom 40 % (water IoU, mean IoU).
  ships     HRSID (8-bit gray chips, ship instance masks): the bottom 60 % of each chip's rows,
            side by side, for training; the top 40 % for testing. Segmentation from a sea / ship label raster (ship IoU);
            detection from one polygon per ship instance (the engine over the whole test mosaic:
            mAP@0.5, mAP@[.5:.95], precision / recall at score 0.3).

Runs are epoch-bound (not time-bound), so machine load does not favour one encoder. Prints a table
and writes results.json (resumable: finished runs are skipped).

Usage: .venv/bin/python training/recipes/eval_smoke.py --encoders random=none sare=runs/.../encoder.pkg
       [--tasks floods ships_seg ships_det] [--epochs-seg 40] [--epochs-det 20] [--out runs/eval_smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT / ".." / "shared" / "data"


def write_raster(path: Path, a: np.ndarray, **profile) -> str:
    """``a`` ((H, W) or (C, H, W)) as a GeoTIFF, written to a temporary name and renamed; the recipes'
    mosaics of chips carry no georeferencing (rasterio's warning about it is silenced)."""
    import rasterio

    tmp = path.with_suffix(".part" + path.suffix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", driver="GTiff", width=a.shape[-1], height=a.shape[-2],
                           count=1 if a.ndim == 2 else a.shape[0], dtype=a.dtype, **profile) as dst:
            dst.write(a, 1) if a.ndim == 2 else dst.write(a)
    tmp.rename(path)
    return str(path)


def floods_data(out: Path, frac: float = 0.6) -> dict:
    """Sen1Floods11: label rasters for the top (training) and bottom (test) parts of the scene."""
    import rasterio

    d = DATA / "sen1floods11"
    s1, lab = d / "Spain_7370579_S1Hand.tif", d / "Spain_7370579_LabelHand.tif"
    out.mkdir(parents=True, exist_ok=True)
    with rasterio.open(lab) as src:
        y, prof = src.read(1), {"crs": src.crs, "transform": src.transform, "nodata": -1}
    cut = int(round(frac * y.shape[0]))
    train, test = y.copy(), y.copy()
    train[cut:], test[:cut] = -1, -1
    return {"raster": str(s1), "train_labels": str(write_raster(out / "floods_train_labels.tif", train, **prof)),
            "test_labels": str(write_raster(out / "floods_test_labels.tif", test, **prof)), "bands": [1], "units": "db",
            "classes": ["dry", "water"], "test_rows": f"{cut}-{y.shape[0]}"}


def hrsid_chips() -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """The HRSID sample: (names, 8-bit gray images, ship instance ids unique over the chips; 0 = sea)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    stems = sorted(p.name[: -len("_instance_id_RGB.png")] for p in (DATA / "hrsid").glob("*_instance_id_RGB.png"))
    if not stems:
        raise SystemExit(f"HRSID sample not found in {DATA / 'hrsid'}")
    imgs, ids = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for k, s in enumerate(stems):
            with rasterio.open(DATA / "hrsid" / f"{s}.png") as src:
                imgs.append(src.read(1))
            with rasterio.open(DATA / "hrsid" / f"{s}_instance_id_RGB.png") as src:
                rgb = src.read().astype(np.int64)
                v = rgb[0] * 65536 + rgb[1] * 256 + rgb[2]
                ids.append(np.where(v > 0, v + k * (1 << 24), 0))  # unique over chips
    return stems, imgs, ids


def ships_data(out: Path, frac: float = 0.6) -> dict:
    """HRSID: each chip's bottom ``frac`` of the rows for training, the top rows for testing, the
    parts placed side by side; each split gets a sea / ship label raster and a GeoJSON of ship polygons
    (pixel coordinates, one feature per instance part)."""
    from rasterio.features import shapes
    from shapely.geometry import mapping, shape
    from shapely.ops import unary_union

    stems, imgs, ids = hrsid_chips()
    out.mkdir(parents=True, exist_ok=True)
    res = {"bands": [1], "units": "uint8", "classes": ["sea", "ship"], "chips": len(stems), "split": f"bottom {frac:.0%} of the rows for training"}
    for split in ("train", "test"):
        rows = [slice(a.shape[0] - int(round(frac * a.shape[0])), None) if split == "train"
                else slice(0, a.shape[0] - int(round(frac * a.shape[0]))) for a in imgs]
        img = np.concatenate([a[r] for a, r in zip(imgs, rows)], 1)
        inst = np.concatenate([a[r] for a, r in zip(ids, rows)], 1)
        lab = np.unique(inst[inst > 0], return_inverse=True)[1].astype(np.int32) + 1
        inst = inst.astype(np.int32)
        inst[inst > 0] = lab
        feats: dict[int, list] = {}
        for geom, v in shapes(inst, mask=inst > 0):
            feats.setdefault(int(v), []).append(shape(geom))
        gj = {"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"class": "ship"}, "geometry": mapping(unary_union(g))}
            for g in feats.values()]}
        (out / f"ships_{split}.geojson").write_text(json.dumps(gj))
        res[f"{split}_raster"] = str(write_raster(out / f"ships_{split}.tif", img))
        res[f"{split}_labels"] = str(write_raster(out / f"ships_{split}_mask.tif", (inst > 0).astype(np.uint8)))
        res[f"{split}_vector"] = str(out / f"ships_{split}.geojson")
        res[f"{split}_ships"] = len(feats)
    return res


CFAR_BASE = {"method": "ca", "guard": 15, "background": 61, "enl": 1.0, "min_area": 4, "class_name": "ship"}


def cfar_baseline(data: dict) -> dict:
    """CFAR on the ship test strip, its pfa chosen on the training strip (never on the test strip)."""
    from engine.inference import InferenceOptions
    from training.cfar_baseline import choose_cfar, evaluate_cfar

    d = data["ships"]
    opts = InferenceOptions(bands=d["bands"], input_units=d["units"])
    best, tried = choose_cfar([d["train_raster"]], d["train_vector"], "class", ["ship"], opts, CFAR_BASE)
    ev = evaluate_cfar([d["test_raster"]], d["test_vector"], "class", ["ship"], opts, best)
    fa = ev.get("false_alarms_per_km2", ev.get("false_alarms_per_mpx"))
    return {"val_map_50": None, "test_map_50": ev["map_50"], "test_map": ev["map"], "test_boxes": ev["boxes"],
            "precision": ev["precision"], "recall": ev["recall"], "f1": ev["f1"], "pfa": best["pfa"], "score_threshold": best.get("score_threshold", 0.0),
            "false_alarms": ev["false_positives"], "false_alarms_per_unit": fa,
            "unit": ev["search_area"]["unit"], "train_tried": tried}


def run_one(task: str, name: str, pkg: str, a, out: Path, data: dict, with_baselines: bool = False) -> dict:
    from training.evaluate import evaluate_detections, evaluate_raster
    from training.finetune.config import FinetuneConfig
    from training.finetune.detect import finetune_detector
    from training.finetune.segment import finetune_segmenter

    d = data["floods" if task == "floods" else "ships"]
    cfg = FinetuneConfig(encoder="" if pkg == "none" else pkg, img_size=a.img_size, in_chans=1, seed=a.seed,
                         epochs=a.epochs_det if task == "ships_det" else a.epochs_seg, max_minutes=None,
                         batch_size=8 if task == "ships_det" else 16, warmup_epochs=1.0, patience=100,
                         bands=d["bands"], input_units=d["units"], max_chips=a.max_chips, device="cpu",
                         class_weights=a.class_weights if task == "ships_seg" else None)
    dest = out / f"{task}_{name}.pkg"
    infer = {"bands": d["bands"], "input_units": d["units"], "device": "cpu", "batch_size": 8}
    if task in ("floods", "ships_seg"):  # floods trains and tests on one raster, ships on two mosaics
        train, test = (d["raster"], d["raster"]) if task == "floods" else (d["train_raster"], d["test_raster"])
        r = finetune_segmenter(train, dest, cfg, label_raster=d["train_labels"], classes=d["classes"], overwrite=True)
        ev = evaluate_raster(str(dest), test, out / f"{task}_{name}_confusion.png", label_raster=d["test_labels"],
                             options=infer, baselines=with_baselines)
        return {"val_iou": r["val_iou"], "test_iou": ev["iou"], "test_mean_iou": ev["mean_iou"], "mode": r["mode"],
                "baselines": ev.get("baselines")}
    r = finetune_detector(d["train_raster"], dest, cfg, labels=d["train_vector"], class_field="class", overwrite=True)
    ev = evaluate_detections(str(dest), [d["test_raster"]], out / f"{task}_{name}_pr.png", labels=d["test_vector"],
                             class_field="class", options=infer)
    fa = ev.get("false_alarms_per_km2", ev.get("false_alarms_per_mpx"))
    return {"val_map_50": r["val_map_50"], "test_map_50": ev["map_50"], "test_map": ev["map"],
            "test_boxes": ev["boxes"], "train_boxes": r["train_boxes"], "precision": ev["precision"],
            "recall": ev["recall"], "f1": ev["f1"], "false_alarms": ev["false_positives"],
            "false_alarms_per_unit": fa, "unit": ev["search_area"]["unit"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", required=True, help="name=package (or name=none for random init)")
    ap.add_argument("--tasks", nargs="+", default=["floods", "ships_seg", "ships_det"],
                    choices=["floods", "ships_seg", "ships_det"])
    ap.add_argument("--epochs-seg", type=int, default=40)
    ap.add_argument("--epochs-det", type=int, default=20)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--max-chips", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--class-weights", default="none", help="ships_seg: none (the default of finetune), auto or sqrt")
    ap.add_argument("--out", default=str(ROOT / "runs" / "eval_smoke"))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(a.out)
    data = {"floods": floods_data(out / "data"), "ships": ships_data(out / "data")}
    print(f"floods: test rows {data['floods']['test_rows']}; ships: {data['ships']['train_ships']} training / "
          f"{data['ships']['test_ships']} test ship(s) from {data['ships']['chips']} chips", flush=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    done = {(r["task"], r["encoder"]) for r in results}
    for task in a.tasks:
        if task == "ships_det" and (task, "cfar") not in done:  # the reference without learning
            t0 = time.time()
            results.append({"task": task, "encoder": "cfar", **cfar_baseline(data),
                            "minutes": round((time.time() - t0) / 60, 2)})
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(json.dumps(results[-1]), flush=True)
        for spec in a.encoders:
            name, pkg = spec.split("=", 1)
            if (task, name) in done:
                continue
            t0 = time.time()
            first = task != "ships_det" and not any(r["task"] == task and r.get("baselines") for r in results)
            rec = {"task": task, "encoder": name, **run_one(task, name, pkg, a, out, data, first),
                   "minutes": round((time.time() - t0) / 60, 2)}
            results.append(rec)
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(json.dumps(rec), flush=True)
    print(f"\n{'task':<11}{'row':<22}result on the held-out area")
    for r in results:
        if r["task"] == "ships_det":
            at = (f"pfa {r['pfa']:g}, score {r.get('score_threshold', 0):.2f} (chosen on training)"
                  if r["encoder"] == "cfar" else "score 0.3")
            s = (f"mAP@0.5 {r['test_map_50']:.3f}  mAP@[.5:.95] {r['test_map']:.3f}  ({r['test_boxes']} ships); "
                 f"at {at} precision {r['precision'] or 0:.2f} recall {r['recall'] or 0:.2f}")
            if r.get("false_alarms_per_unit") is not None:
                s += f"; {r['false_alarms']} false alarms ({r['false_alarms_per_unit']:.2f} per {r['unit']})"
        else:
            k = "water" if r["task"] == "floods" else "ship"
            for b in r.get("baselines") or []:  # fitted on the same training labels, scored on the same pixels
                print(f"{r['task']:<11}{b['name']:<22}{k} IoU {b['iou'][k]:.3f}  mean IoU {b['mean_iou']:.3f}")
            s = f"{k} IoU {r['test_iou'][k]:.3f}  mean IoU {r['test_mean_iou']:.3f}"
        print(f"{r['task']:<11}{r['encoder']:<22}{s}")


if __name__ == "__main__":
    main()
