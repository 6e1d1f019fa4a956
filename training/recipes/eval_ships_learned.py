"""The learned CPU ship detector (``detect.cfar_scored``: CFAR proposals + chip scorer) against
CFAR alone, on held-out areas, for several seeds (issue 14, item 2).

  hrsid  the HRSID chips of ../shared/data/hrsid split as eval_smoke.py splits them (bottom 60 % of
         each chip's rows for training, top 40 % for testing, side by side). CFAR: its pfa chosen by
         mAP@0.5 and its score threshold by F1 on the TRAINING strip (``choose_cfar``, as eval_smoke).
  demo   the demo's synthetic scene (training.data.synthetic.make_scene, 1024 px, 48 ships; VV band):
         the top 60 % of the rows for training, the bottom 40 % held out. CFAR with the demo's settings.

Both rows come from ``evaluate_detections(..., cfar=...)`` on the same test raster (mAP@0.5,
mAP@[.5:.95], precision / recall at each one's threshold), plus false alarms per ship found at
equal recall: each detector's boxes are taken in score order down to CFAR's recall at its operating
point (or the learned one's best recall when it never gets there), FP / TP there.

``--validate``: the same on the TRAINING part only (its top 60 % of the rows to train, the rest to
score), for choosing the detector's design without the test area; ``--regress`` / ``--box-channel`` / ``--levels``
(none to turn the extra proposal levels off) train the variants compared there.

Usage: OMP_NUM_THREADS=1 .venv/bin/python training/recipes/eval_ships_learned.py [--seeds 0 1 2]
       [--datasets hrsid demo] [--epochs 25] [--max-minutes 2] [--out runs/eval_ships_learned]
       [--validate] [--regress] [--box-channel] [--levels [DB ...]] [--proposals fewest|richest]
       .venv/bin/python training/recipes/eval_ships_learned.py --summary DIR [DIR ...]   (mean +- std per folder)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEMO_CFAR = {"method": "ca", "pfa": 1e-6, "guard": 9, "background": 41, "class_name": "ship"}  # scripts/demo.py


def demo_data(out: Path, seed: int, frac: float = 0.6) -> dict:
    """The demo scene's VV band, split by rows into a training and a test raster; its ship boxes."""
    import fiona
    import rasterio
    from rasterio.windows import Window, transform

    from training.data.synthetic import make_scene

    scene = make_scene(out / f"scene{seed}", size=1024, seed=seed, n_ships=48)
    res = {"bands": [1], "units": "db"}
    with rasterio.open(scene.image) as src:
        cut = int(round(frac * src.height))
        for split, (r0, r1) in (("train", (0, cut)), ("test", (cut, src.height))):
            win = Window(0, r0, src.width, r1 - r0)
            prof = {**src.profile, "count": 1, "height": r1 - r0, "transform": transform(win, src.transform)}
            path = out / f"scene{seed}_{split}.tif"
            with rasterio.open(path, "w", **prof) as dst:
                dst.write(src.read(1, window=win), 1)
            res[f"{split}_raster"] = str(path)
    ships = out / f"scene{seed}_ships.gpkg"
    with fiona.open(scene.labels) as src:
        feats = [f for f in src if f["properties"]["class"] == "ship"]
        ships.unlink(missing_ok=True)
        with fiona.open(ships, "w", driver="GPKG", crs=src.crs, schema=src.schema) as dst:
            dst.writerecords(feats)
    res["train_vector"] = res["test_vector"] = str(ships)
    return res


def inner_split(d: dict, out: Path, frac: float = 0.6) -> dict:
    """The training raster's top ``frac`` of the rows as 'train', the rest as 'test' (validation),
    with the labels of each (pixel-coordinate GeoJSON of a raster without georeferencing is moved
    with its rows)."""
    import fiona
    import rasterio
    from rasterio.windows import Window, transform
    from shapely.affinity import translate
    from shapely.geometry import mapping, shape

    out.mkdir(parents=True, exist_ok=True)
    res = {k: d[k] for k in ("bands", "units")}
    with rasterio.open(d["train_raster"]) as src:
        cut = int(round(frac * src.height))
        geo = src.crs is not None
        for split, (r0, r1) in (("train", (0, cut)), ("test", (cut, src.height))):
            win = Window(0, r0, src.width, r1 - r0)
            prof = {**src.profile, "height": r1 - r0}
            if geo:
                prof["transform"] = transform(win, src.transform)
            path = out / f"val_{split}.tif"
            with rasterio.open(path, "w", **prof) as dst:
                dst.write(src.read(window=win))
            res[f"{split}_raster"] = str(path)
            if geo:
                res[f"{split}_vector"] = d["train_vector"]
                continue
            with fiona.open(d["train_vector"]) as vec:
                feats = [{"type": "Feature", "properties": dict(f["properties"]),
                          "geometry": mapping(translate(shape(f["geometry"]), 0, -r0))} for f in vec]
            vpath = out / f"val_{split}.geojson"
            vpath.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
            res[f"{split}_vector"] = str(vpath)
    return res


def fa_per_found(preds: tuple, truth: np.ndarray, recall: float) -> dict:
    """Boxes in score order down to ``recall`` (or the best reached): false alarms per ship found there."""
    from training.evaluate import match_boxes

    b, s, _ = preds
    tp = match_boxes(b, s, truth)[np.argsort(-s, kind="stable")]
    ctp, n = np.cumsum(tp), max(len(truth), 1)
    reach = np.flatnonzero(ctp >= recall * n - 1e-9)
    k = int(reach[0]) if len(reach) else int(np.argmax(ctp)) if len(ctp) else 0
    found = int(ctp[k]) if len(ctp) else 0
    on_ships = 0  # false alarms there that overlap a ship (pieces, duplicates), the rest being clutter
    if len(ctp) and len(truth):
        import torch
        from torchvision.ops import box_iou

        top = np.argsort(-s, kind="stable")[:k + 1]
        fp = top[~tp[:k + 1]]
        on_ships = int((box_iou(torch.as_tensor(b[fp]), torch.as_tensor(truth)).numpy().max(1) > 0).sum())
    return {"recall": found / n, "false_alarms": int(k + 1 - found) if len(ctp) else 0,
            "fa_per_found": (k + 1 - found) / found if found else None, "false_alarms_on_ships": on_ships}


def run(name: str, d: dict, seed: int, a, out: Path) -> dict:
    import tempfile

    from engine.inference import InferenceOptions, run_inference
    from training.cfar_baseline import cfar_boxes, choose_cfar, truth_boxes
    from training.evaluate import _read_detections, evaluate_detections
    from training.finetune.cfar_scored import finetune_cfar_scored
    from training.finetune.config import FinetuneConfig
    from training.recipes.eval_smoke import CFAR_BASE

    opts = InferenceOptions(bands=d["bands"], input_units=d["units"])
    if name == "hrsid":  # the baseline tuned on the training strip, as a learned model is
        cfar, _ = choose_cfar([d["train_raster"]], d["train_vector"], "class", ["ship"], opts, CFAR_BASE)
    else:
        cfar = dict(DEMO_CFAR)
    t0 = time.time()
    cfg = FinetuneConfig(task="detect", epochs=a.epochs, batch_size=128, seed=seed, bands=d["bands"],
                         input_units=d["units"], device="cpu", max_minutes=a.max_minutes)
    pkg = out / f"{name}_s{seed}.pkg"
    base = None if a.levels is None else {"levels_db": list(a.levels)}
    tr = finetune_cfar_scored([d["train_raster"]], pkg, cfg, labels=d["train_vector"], class_field="class",
                              classes=["ship"], overwrite=True, regress=a.regress, box_channel=a.box_channel,
                              quality_floor=a.quality_floor, cfar_base=base, proposal_rule=a.proposals)
    minutes = (time.time() - t0) / 60
    infer = {"bands": d["bands"], "input_units": d["units"]}
    ev = evaluate_detections(str(pkg), [d["test_raster"]], out / f"{name}_s{seed}_pr.png", labels=d["test_vector"],
                             class_field="class", options=infer, cfar=cfar)
    truth = truth_boxes([d["test_raster"]], d["test_vector"], "class", ["ship"], opts)[0][0]
    with tempfile.TemporaryDirectory() as tmp:  # every box of each, for the comparison at equal recall
        res = run_inference([d["test_raster"]], Path(tmp) / "d.gpkg", str(pkg),
                            InferenceOptions(**infer, score_threshold=0.0))
        learned = _read_detections(res.outputs["detections"])
    _, (cpreds,), _ = cfar_boxes([d["test_raster"]], cfar, opts, ["ship"])
    at = ev["cfar"]["recall"] or 0.0
    row = lambda e: {k: e.get(k) for k in ("map_50", "map", "precision", "recall", "f1", "false_positives",  # noqa: E731
                                           "score_threshold", "false_alarms_per_km2", "false_alarms_per_mpx")}
    variant = {"proposals": a.proposals, "box_channel": a.box_channel, "regress": a.regress,
               "validate": a.validate}
    return {"dataset": name, "seed": seed, "variant": variant, "train_minutes": round(minutes, 2), "epochs": tr["epochs"],
            "proposals_pfa": tr["cfar"]["pfa"], "learned": row(ev), "cfar": {**row(ev["cfar"]), "pfa": cfar["pfa"]},
            "test_ships": int(len(truth)), "equal_recall": {"recall": at, "learned": fa_per_found(learned, truth, at),
                                                            "cfar": fa_per_found(cpreds, truth, at)}}


def summary(dirs: list[str]) -> None:
    """Per results.json of ``dirs`` and dataset: the learned and CFAR rows' mean +- std over seeds."""
    def ms(v: list) -> str:
        v = [x for x in v if x is not None]
        return f"{np.mean(v):.3f} +- {np.std(v):.3f}" if v else "-"

    print(f"{'results':<34}{'data':<7}{'seeds':<10}{'learned mAP@0.5':>18}{'mAP':>16}{'FA/found':>16}"
          f"{'CFAR mAP@0.5':>18}{'FA/found':>16}")
    for d in dirs:
        results = json.loads((Path(d) / "results.json").read_text())
        for name in sorted({r["dataset"] for r in results}):
            rs = [r for r in results if r["dataset"] == name]
            eq = {k: [r["equal_recall"][k]["fa_per_found"] for r in rs] for k in ("learned", "cfar")}
            print(f"{Path(d).name:<34}{name:<7}{','.join(str(r['seed']) for r in rs):<10}"
                  f"{ms([r['learned']['map_50'] for r in rs]):>18}{ms([r['learned']['map'] for r in rs]):>16}"
                  f"{ms(eq['learned']):>16}{ms([r['cfar']['map_50'] for r in rs]):>18}{ms(eq['cfar']):>16}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["hrsid", "demo"], choices=["hrsid", "demo"])
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--max-minutes", type=float, default=2.0, help="training budget per run (the demo's: 2)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "eval_ships_learned"))
    ap.add_argument("--validate", action="store_true", help="train and score on the training part only (see above)")
    ap.add_argument("--regress", action="store_true", help="train the box branch too (off by default: it lost on validation)")
    ap.add_argument("--box-channel", action=argparse.BooleanOptionalAction, default=False,
                    help="chips with the proposal's box drawn in (off by default: it lost on validation)")
    ap.add_argument("--quality-floor", type=float, default=None,
                    help="score target at IoU 0.5 (rising to 1 at IoU 0.8); default: IoU / 0.8")
    ap.add_argument("--proposals", default="fewest", choices=["fewest", "richest"],
                    help="how the proposals' CFAR settings are chosen on the training area (see choose_proposals)")
    ap.add_argument("--levels", type=float, nargs="*", default=None,
                    help="extra proposal levels in dB (none: off; default: training's LEVELS_DB)")
    ap.add_argument("--summary", nargs="+", metavar="DIR", help="only print the mean +- std of these --out folders")
    a = ap.parse_args()
    if a.summary:
        return summary(a.summary)
    from training.recipes.eval_smoke import ships_data

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    done = {(r["dataset"], r["seed"]) for r in results}
    hrsid = ships_data(out / "hrsid") if "hrsid" in a.datasets else None
    if hrsid is not None and a.validate:
        hrsid = inner_split(hrsid, out / "hrsid_val")
    for name in a.datasets:
        for seed in a.seeds:
            if (name, seed) in done:
                continue
            d = hrsid if name == "hrsid" else demo_data(out / "demo", seed)
            if name == "demo" and a.validate:
                d = inner_split(d, out / f"demo_val{seed}")
            results.append(run(name, d, seed, a, out))
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'data':<7}{'seed':<5}{'row':<13}{'mAP@0.5':>8}{'mAP':>7}{'P':>6}{'R':>6}{'F1':>6}{'FA/area':>9}  FA per "
          "ship found at CFAR's recall")
    for r in results:
        eq = r["equal_recall"]
        for k in ("learned", "cfar"):
            m, f = r[k], eq[k]
            fa = "-" if f["fa_per_found"] is None else f"{f['fa_per_found']:.2f} (recall {f['recall']:.2f})"
            area = m.get("false_alarms_per_km2") if m.get("false_alarms_per_km2") is not None else m.get(
                "false_alarms_per_mpx")
            area = "-" if area is None else f"{area:.2f}" + ("/km2" if m.get("false_alarms_per_km2") is not None else "/Mpx")
            print(f"{r['dataset']:<7}{r['seed']:<5}{k:<13}{m['map_50']:>8.3f}{m['map']:>7.3f}"
                  f"{m['precision'] or 0:>6.2f}{m['recall'] or 0:>6.2f}{m.get('f1') or 0:>6.2f}{area:>13}  {fa}")
    for name in a.datasets:
        rs = [r for r in results if r["dataset"] == name]
        if rs:
            gap = [r["learned"]["map_50"] - r["cfar"]["map_50"] for r in rs]
            print(f"{name}: learned mAP@0.5 {np.mean([r['learned']['map_50'] for r in rs]):.3f} "
                  f"+- {np.std([r['learned']['map_50'] for r in rs]):.3f}, CFAR {np.mean([r['cfar']['map_50'] for r in rs]):.3f}"
                  f"; gain {np.mean(gap):+.3f} (min {min(gap):+.3f}) over {len(rs)} seed(s); training "
                  f"{np.mean([r['train_minutes'] for r in rs]):.2f} min")


if __name__ == "__main__":
    main()
