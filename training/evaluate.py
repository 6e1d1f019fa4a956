"""``sarmae evaluate``: a model package's metrics on data it never saw, as one JSON object.

- classify + ``--chips DIR``: class sub-folders matched to the model's classes BY NAME; folders the
  model does not know are reported (``unknown_classes``) and left out of the accuracy.
- segment + ``--raster R`` with ``--label-raster L`` or ``--labels V --class-field F``: the model runs
  over the raster with the engine (exactly as ``sarmae infer``), and its class raster is compared
  with the labels where they exist: per-class IoU, mean IoU, pixel accuracy.
- detect + ``--raster R --labels V --class-field F``: detections vs labelled boxes: mAP@0.5 and
  mAP@[.5:.95].
A confusion-matrix PNG is written next to ``--report`` (default: evaluation_confusion.png).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from engine.errors import SarmaeError
from engine.package import load_package

from .finetune.metrics import classification_metrics, confusion_png, iou_metrics


def evaluate_chips(package: str, chips_dir: str, png: Path) -> dict:
    import torch

    from .finetune.classify import class_folders, load_tensors

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
    with torch.no_grad():
        pred = torch.cat([pkg.model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]).numpy()
    m = classification_metrics(truth, pred, names)
    confusion_png(m["confusion"], names, png, "confusion matrix (evaluation)")
    return {"task": "classify", "accuracy": m["accuracy"], "per_class_accuracy": m["per_class_accuracy"],
            "n": m["n"], "unknown_classes": unknown,
            "skipped_chips": int((~keep).sum()), "confusion_matrix_png": str(png), "confusion": m["confusion"]}


def _reference_raster(raster: str, labels: str | None, class_field: str | None, label_raster: str | None,
                      names: list[str], out_shape, transform, crs) -> tuple[np.ndarray, list[str]]:
    """Labels on the raster grid: model class index, 255 where unlabelled; plus unknown class names."""
    import fiona
    import rasterio
    from rasterio.features import rasterize
    from rasterio.warp import Resampling, reproject, transform_geom

    ref = np.full(out_shape, 255, np.uint8)
    unknown: set[str] = set()
    if label_raster:
        with rasterio.open(label_raster) as src:
            lab = np.full(out_shape, -1, np.int64)
            reproject(rasterio.band(src, 1), lab, dst_transform=transform, dst_crs=crs, resampling=Resampling.nearest,
                      dst_nodata=-1)
            nod = src.nodata
        for v in np.unique(lab):
            if v < 0 or (nod is not None and v == nod):
                continue
            name = f"class_{v}"
            # a label raster holds indices: match by index when names are generic, else by 'class_<v>'
            idx = names.index(name) if name in names else (int(v) if int(v) < len(names) else None)
            if idx is None:
                unknown.add(name)
            else:
                ref[lab == v] = idx
        return ref, sorted(unknown)
    with fiona.open(labels) as src:
        if class_field not in src.schema["properties"]:
            raise SarmaeError(f"{labels}: no field '{class_field}'; fields: {', '.join(src.schema['properties'])}")
        shapes = []
        for f in src:
            name = f["properties"].get(class_field)
            if name is None or f["geometry"] is None:
                continue
            name = str(name)
            if name not in names:
                unknown.add(name)
                continue
            geom = transform_geom(src.crs, crs, f["geometry"]) if src.crs and crs else f["geometry"]
            shapes.append((geom, names.index(name)))
    if shapes:
        ref = rasterize(shapes, out_shape=out_shape, transform=transform, fill=255, dtype="uint8")
    return ref, sorted(unknown)


def evaluate_raster(package: str, raster: str, png: Path, labels: str | None = None, class_field: str | None = None,
                    label_raster: str | None = None, options: dict | None = None) -> dict:
    import rasterio

    from engine.inference import InferenceOptions, run_inference

    pkg = load_package(package)
    card = pkg.card
    if card.task != "segment":
        raise SarmaeError(f"{package} is a '{card.task}' model; raster evaluation here covers segmentation")
    if not (labels and class_field) and not label_raster:
        raise SarmaeError("give --label-raster, or --labels with --class-field")
    names = card.class_names
    with tempfile.TemporaryDirectory() as tmp:
        res = run_inference([raster], Path(tmp) / "pred.tif", pkg, InferenceOptions(**(options or {})))
        with rasterio.open(res.outputs["class"]) as src:
            pred = src.read(1)
            ref, unknown = _reference_raster(raster, labels, class_field, label_raster, names, pred.shape,
                                             src.transform, src.crs)
    ok = (ref != 255) & (pred != 255)
    if not ok.any():
        raise SarmaeError(f"no labelled pixel of {labels or label_raster} falls on valid pixels of {raster}")
    k = len(names)
    cm = np.bincount(ref[ok].astype(np.int64) * k + pred[ok], minlength=k * k).reshape(k, k)
    m = iou_metrics(cm, names)
    confusion_png(cm, names, png, "pixel confusion (evaluation)")
    return {"task": "segment", **m, "labelled_pixels": int(ok.sum()), "unknown_classes": unknown,
            "confusion_matrix_png": str(png)}
