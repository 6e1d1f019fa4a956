"""``sarmae evaluate``: a model package's metrics on data it never saw, as one JSON object.

- classify + ``--chips DIR``: class sub-folders matched to the model's classes BY NAME; folders the
  model does not know are reported (``unknown_classes``) and left out of the accuracy.
- segment + ``--raster R`` with ``--label-raster L`` or ``--labels V --class-field F``: the model runs
  over the raster with the engine (exactly as ``sarmae infer``), and its class raster is compared
  with the labels where they exist: per-class IoU, mean IoU, pixel accuracy. Polygons are read and
  rasterized exactly as fine-tuning reads them (``finetune.labels``: repaired, reprojected, pixel
  centres inside); classes the model does not know are reported (``unknown_classes``) and left out.
- detect + ``--raster R`` (repeatable) with ``--labels V --class-field F``: the model runs over each
  whole raster with the engine (windows, NMS across windows, exactly as ``sarmae infer``) and its
  boxes are compared with one box per polygon: mAP@0.5, mAP@[.5:.95] (COCO rules), and the
  operating point at ``--score-threshold``: true / false positives, missed objects, precision,
  recall, F1; precision-recall curves as the PNG. (``evaluate_chips_from_rasters`` scores a
  detector on sampled chips instead, as fine-tuning's validation does.)
- classify + ``--raster R`` with ``--labels V --class-field F`` or ``--label-raster L``: chips
  sampled from the labels exactly as fine-tuning samples them (``finetune.labels.build_chips``,
  centred, no split), read through the package's input contract: accuracy, per-class accuracy,
  confusion matrix. Label classes are matched to the
  model's BY NAME; the others are reported (``unknown_classes``) and left out.
A confusion-matrix PNG is written to ``--report`` (default: evaluation_confusion.png).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from engine.errors import SarmaeError
from engine.package import load_package

from .finetune.metrics import classification_metrics, confusion_png, iou_metrics
from .reference import reference_raster, vector_reference


def evaluate_chips(package: str, chips_dir: str, png: Path) -> dict:
    import torch

    from .finetune.classify import class_folders, load_tensors
    from .finetune.common import model_input

    pkg = load_package(package)
    card = pkg.card
    if card.task != "classify":
        raise SarmaeError(f"{package} is a '{card.task}' model; --chips evaluates classification models")
    data = class_folders(chips_dir)
    names = card.class_names
    unknown = [c for c in data.classes if c not in names]
    keep = np.array([data.classes[k] in names for k in data.labels])
    if not keep.any():
        raise SarmaeError(f"{chips_dir}: none of its classes ({', '.join(data.classes)}) is known to the model "
                          f"({', '.join(names)}); class folders are matched by name")
    files = [f for f, k in zip(data.files, keep) if k]
    truth = np.array([names.index(data.classes[k]) for k in data.labels[keep]])
    inp = card.input
    clip_db = inp["clip"] if inp["units"] == "db" else (-35.0, 10.0)
    x, _ = load_tensors(files, card.input_size[0], card.in_chans, inp["mean"], inp["std"], clip_db=clip_db)
    x = model_input(x, inp)  # the contract's per-chip standardisation, when it has one (as the engine)
    with torch.no_grad():
        pred = torch.cat([pkg.model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]).numpy()
    m = classification_metrics(truth, pred, names)
    confusion_png(m["confusion"], names, png, "confusion matrix (evaluation)")
    return {"task": "classify", "accuracy": m["accuracy"], "per_class_accuracy": m["per_class_accuracy"],
            "n": m["n"], "unknown_classes": unknown,
            "skipped_chips": int((~keep).sum()), "confusion_matrix_png": str(png), "confusion": m["confusion"]}


def evaluate_chips_from_rasters(package: str, rasters: list[str], png: Path, labels: str | None = None,
                                class_field: str | None = None, label_raster: str | None = None,
                                bands: list | None = None, input_units: str | None = None,
                                background: str | None = None, max_chips: int = 2000) -> dict:
    """A classify / detect package on chips sampled from raster(s) + labels (see the module docstring);
    ``background``: classify, the model's class for chips touching no polygon (else none are made);
    ``max_chips``: at most this many chips (seeded, balanced over classes for classify)."""
    import torch

    from .finetune.labels import build_chips
    from .finetune.metrics import classification_metrics

    pkg = load_package(package)
    card = pkg.card
    if card.task not in ("classify", "detect"):
        raise SarmaeError(f"{package} is a '{card.task}' model; chips from rasters evaluate classify and detect models")
    if card.task == "detect" and not (labels and class_field):
        raise SarmaeError("detection evaluation needs --labels VECTOR --class-field NAME (one box per polygon)")
    if not (labels and class_field) and not label_raster:
        raise SarmaeError("give --labels VECTOR with --class-field NAME, or --label-raster RASTER")
    names = card.class_names
    if background and background not in names:
        raise SarmaeError(f"--background '{background}' is not a class of {package} ({', '.join(names)})")
    chips = build_chips(rasters, card.input, card.input_size[0], card.task, labels=labels, class_field=class_field,
                        label_raster=None if labels else label_raster, classes=names, bands=bands,
                        input_units=input_units, background=background if card.task == "classify" else None,
                        evaluation=True, max_chips=max_chips)
    out = {"task": card.task, "chips": len(chips.x), "unknown_classes": sorted(chips.unknown_classes),
           "skipped_features": sum(chips.unknown_classes.values()), "log": chips.log, "warnings": chips.warnings}
    with torch.no_grad():
        if card.task == "classify":
            pred = torch.cat([pkg.model(chips.x[i:i + 64].float()).argmax(1) for i in range(0, len(chips.x), 64)])
            m = classification_metrics(chips.labels, pred.numpy(), names)
            confusion_png(m["confusion"], names, png, "confusion matrix (evaluation)")
            return {**out, "accuracy": m["accuracy"], "per_class_accuracy": m["per_class_accuracy"], "n": m["n"],
                    "confusion_matrix_png": str(png), "confusion": m["confusion"]}
        from .finetune.detect import detection_metrics

        preds = []
        for i in range(0, len(chips.x), 16):
            preds += [{k: v.cpu() for k, v in o.items()} for o in pkg.model(list(chips.x[i:i + 16].float()))]
    targets = [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(lb)}
               for b, lb in zip(chips.boxes, chips.box_labels)]
    m = detection_metrics(preds, targets, names)
    return {**out, "map_50": m["map_50"], "map": m["map"], "ap_per_class": m["ap_per_class"], "boxes": m["boxes"],
            "detections": m["detections"]}


def evaluate_raster(package: str, raster: str, png: Path, labels: str | None = None, class_field: str | None = None,
                    label_raster: str | None = None, options: dict | None = None, baselines: bool = False) -> dict:
    """A segment package run over ``raster`` by the engine, against the labels (pixel metrics);
    ``baselines``: also the classical rows (``baselines.segment_rows``: threshold, Otsu, random
    forest, fitted on the package's training labels) on the same pixels, under "baselines"."""
    import rasterio

    from engine.inference import InferenceOptions, run_inference

    from .finetune.labels import rasterize_polygons

    pkg = load_package(package)
    card = pkg.card
    if card.task != "segment":
        raise SarmaeError(f"{package} is a '{card.task}' model; raster evaluation here covers segmentation "
                          "(classify: evaluate_chips_from_rasters, detect: evaluate_detections)")
    if not (labels and class_field) and not label_raster:
        raise SarmaeError("give --label-raster, or --labels with --class-field")
    names = card.class_names
    opts = InferenceOptions(**(options or {}))
    vector = bool(labels and class_field) and not label_raster  # a label raster, when given, wins (as before)
    if vector:  # before the model runs: bad labels fail at once
        (shapes,), skipped, notes, warns = vector_reference([raster], labels, class_field, names, opts)
    else:
        full, unknown = reference_raster(raster, label_raster, names, opts)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_inference([raster], Path(tmp) / "pred.tif", pkg, opts)
        with rasterio.open(res.outputs["class"]) as src:
            pred = src.read(1)
    # the references on the processed region's pixel grid (all of the raster unless an extent is given)
    r0, c0 = (0, 0) if opts.extent is None else (max(int(opts.extent[0]), 0), max(int(opts.extent[1]), 0))
    if vector:
        ref, unknown = rasterize_polygons(*shapes, pred.shape, r0, c0), sorted(skipped)
    else:
        ref = full[r0:r0 + pred.shape[0], c0:c0 + pred.shape[1]]
    ok = (ref != 255) & (pred != 255)
    if not ok.any():
        raise SarmaeError(f"no labelled pixel of {labels or label_raster} falls on valid pixels of {raster}")
    k = len(names)
    cm = np.bincount(ref[ok].astype(np.int64) * k + pred[ok], minlength=k * k).reshape(k, k)
    m = iou_metrics(cm, names)
    confusion_png(cm, names, png, "pixel confusion (evaluation)")
    out = {"task": "segment", **m, "labelled_pixels": int(ok.sum()), "unknown_classes": unknown,
           "confusion_matrix_png": str(png)}
    if vector:
        out.update(skipped_features=sum(skipped.values()), log=notes, warnings=warns)
    if baselines:
        from .baselines import segment_rows

        out["baselines"], out["baseline_notes"] = segment_rows(card, raster, ref, ok, opts)
    return out


def match_boxes(det: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """COCO-style greedy matching of one class in one image: detections in descending score order
    each take the still-unmatched reference box they overlap most (IoU >= ``iou``). Returns a
    true-positive flag per detection, in the given order."""
    import torch
    from torchvision.ops import box_iou

    tp = np.zeros(len(det), bool)
    if not len(det) or not len(truth):
        return tp
    ious = box_iou(torch.as_tensor(det, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64)).numpy()
    free = np.ones(len(truth), bool)
    for i in np.argsort(-scores, kind="stable"):
        cand = np.where(free, ious[i], -1.0)
        j = int(cand.argmax())
        if cand[j] >= iou:
            tp[i], free[j] = True, False
    return tp


def _read_detections(gpkg: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (x0, y0, x1, y1 in raster pixels), scores and class indexes of an engine detections file."""
    import fiona

    rows = []
    with fiona.open(gpkg, layer="detections") as src:
        for f in src:
            p = f["properties"]
            rows.append((p["px_col"], p["px_row"], p["px_col"] + p["px_width"], p["px_row"] + p["px_height"],
                         p["score"], p["class_id"]))
    a = np.asarray(rows, np.float64).reshape(-1, 6)
    return a[:, :4], a[:, 4], a[:, 5].astype(np.int64)


def evaluate_detections(package: str, rasters: list[str], png: Path, labels: str | None = None,
                        class_field: str | None = None, options: dict | None = None,
                        cfar: dict | None = None) -> dict:
    """A detect package run over whole rasters by the engine (as ``sarmae infer``: windows, boxes
    merged across windows by NMS), against one box per labelled polygon (its pixel-space bounds,
    polygons read exactly as fine-tuning reads them). Each raster counts as one image.

    Returns mAP@0.5 and mAP@[.5:.95] (COCO rules, torchmetrics, every detection down to score 0.05
    counted), AP per class, and the analyst's operating point at ``score_threshold`` (default 0.3,
    as ``infer``): true / false positives, missed boxes, precision, recall, F1 per class and overall
    (IoU >= 0.5), false alarms per km^2 (per megapixel when a raster is not georeferenced in metres).
    ``png``: precision-recall curves at IoU 0.5.

    ``cfar``: also run the CFAR detector (``engine.cfar.CfarConfig`` settings as a dict) over the same
    rasters and return its row under ``"cfar"``: the same metrics, its boxes ranked by CFAR score and
    its operating point at the CFAR ``score_threshold`` (0: every box at the pfa).
    """
    import dataclasses

    from engine.inference import InferenceOptions, run_inference
    from engine.tasks import task_for

    from .cfar_baseline import cfar_boxes, search_area

    pkg = load_package(package)
    card = pkg.card
    if card.task != "detect":
        raise SarmaeError(f"{package} is a '{card.task}' model; detection evaluation needs a 'detect' package")
    if not (labels and class_field):
        raise SarmaeError("detection evaluation needs --labels VECTOR --class-field NAME (one box per polygon)")
    if not rasters:
        raise SarmaeError("give at least one --raster to evaluate on")
    names = card.class_names
    opts = InferenceOptions(**(options or {}))
    threshold = task_for(card).score_threshold(card, opts)  # the run's, else the package's default
    run = dataclasses.replace(opts, score_threshold=min(threshold, 0.05), overwrite=True)
    # every raster's labels first (read once): bad labels fail before any model runs
    shapes, skipped, notes, warns = vector_reference(rasters, labels, class_field, names, opts)
    truth = []
    for (polys, cls), r in zip(shapes, rasters):
        if not polys:
            notes.append(f"{Path(r).name}: no labelled polygon on it")
        b = np.asarray([g.bounds for g in polys], np.float64).reshape(-1, 4)
        cls = np.asarray(cls, np.int64)
        if opts.extent is not None:  # the boxes whose centre lies in the processed region
            keep = _in_extent(b, opts.extent)
            b, cls = b[keep], cls[keep]
        truth.append((b, cls))
    if not sum(len(t[0]) for t in truth):
        raise SarmaeError(f"no polygon of {labels} with a class of {package} ({', '.join(names)}) lies on the "
                          f"raster(s){' inside --extent' if opts.extent is not None else ''}")
    area = search_area(rasters, opts)
    preds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, r in enumerate(rasters):
            res = run_inference([r], Path(tmp) / f"det{i}.gpkg", pkg, run)
            preds.append(_read_detections(res.outputs["detections"]))
    scores, curves = score_detections(preds, truth, names, threshold, area)
    _pr_png(curves, threshold, png)
    out = {"task": "detect", "rasters": len(rasters), **scores, "unknown_classes": sorted(skipped),
           "skipped_features": sum(skipped.values()), "log": notes, "warnings": warns, "pr_curve_png": str(png)}
    if cfar is not None:
        cfg, cpreds, clog = cfar_boxes(rasters, cfar, opts, names)
        if opts.extent is not None:
            cpreds = [(b[k], s[k], c[k]) for b, s, c in cpreds for k in [_in_extent(b, opts.extent)]]
        cscores, _ = score_detections(cpreds, truth, names, cfg.score_threshold, area)
        out["cfar"] = {**cscores, "config": cfg.to_dict(), "log": clog}
    return out


def _in_extent(b: np.ndarray, extent) -> np.ndarray:
    """Which boxes (n, 4) have their centre in ``extent`` (row_off, col_off, height, width)."""
    r0, c0, h, wd = extent
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    keep = (cx >= c0) & (cx < c0 + wd) & (cy >= r0) & (cy < r0 + h)
    return keep


def score_detections(preds: list[tuple], truth: list[tuple], names: list[str], threshold: float,
                     area: tuple[float, str]) -> tuple[dict, dict]:
    """Detections (boxes, scores, class index) per image against reference (boxes, class index):
    mAP@0.5, mAP@[.5:.95], AP per class, the operating point at ``threshold`` per class and overall,
    false alarms per unit of ``area`` = (size, "km2" | "Mpx"); plus the PR curves per class."""
    import torch

    from .finetune.detect import detection_metrics

    most = max([100] + [len(p[0]) for p in preds])
    m = detection_metrics([{"boxes": torch.from_numpy(b).float(), "scores": torch.from_numpy(s).float(),
                            "labels": torch.from_numpy(c + 1)} for b, s, c in preds],
                          [{"boxes": torch.from_numpy(b).float(), "labels": torch.from_numpy(c + 1)} for b, c in truth],
                          names, max_detections=most)
    per_class, curves = {}, {}
    for k, name in enumerate(names):
        scores, flags, n_true = [], [], 0
        for (db, ds, dc), (tb, tc) in zip(preds, truth):
            sel = dc == k
            flags.append(match_boxes(db[sel], ds[sel], tb[tc == k]))
            scores.append(ds[sel])
            n_true += int((tc == k).sum())
        s, f = np.concatenate(scores), np.concatenate(flags)
        at = s >= threshold
        tp, fp = int(f[at].sum()), int((~f[at]).sum())
        per_class[name] = _operating_point(tp, fp, n_true - tp)
        order = np.argsort(-s, kind="stable")
        ctp = np.cumsum(f[order])
        curves[name] = (ctp / max(n_true, 1), ctp / np.arange(1, len(order) + 1), s[order], n_true)
    tot = {k: sum(p[k] for p in per_class.values()) for k in ("true_positives", "false_positives", "missed")}
    overall = _operating_point(tot["true_positives"], tot["false_positives"], tot["missed"])
    size, unit = area
    return {"map_50": m["map_50"], "map": m["map"], "ap_per_class": m["ap_per_class"], "boxes": m["boxes"],
            "detections": int(sum(int((p[1] >= threshold).sum()) for p in preds)),
            "score_threshold": threshold, **{k: overall[k] for k in ("precision", "recall", "f1")}, **tot,
            f"false_alarms_per_{unit.lower()}": tot["false_positives"] / size if size else None,
            "search_area": {"size": size, "unit": unit}, "per_class": per_class}, curves


def _operating_point(tp: int, fp: int, missed: int) -> dict:
    """Counts -> precision, recall, F1 (None where undefined: no detection / no reference box)."""
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + missed) if tp + missed else None
    f1 = None if p is None or r is None else (2 * p * r / (p + r) if p + r else 0.0)
    return {"true_positives": tp, "false_positives": fp, "missed": missed, "precision": p, "recall": r, "f1": f1}


def _pr_png(curves: dict, threshold: float, png: Path) -> None:
    """Precision-recall curve per class (IoU 0.5), the operating point at ``threshold`` marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    for name, (rec, prec, s, n) in curves.items():
        if not len(rec):
            continue
        line, = ax.plot(rec, prec, label=f"{name} ({n} boxes)")
        at = np.flatnonzero(s >= threshold)
        if len(at):
            ax.plot(rec[at[-1]], prec[at[-1]], "o", color=line.get_color())
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title=f"precision-recall at IoU 0.5 (dot: score {threshold:g})")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower left", fontsize=8)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.stem + ".part.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
