"""``sarmae evaluate``: a model package's metrics on data it never saw, as one JSON object.

- classify + ``--chips DIR``: class sub-folders matched to the model's classes BY NAME; folders the
  model does not know are reported (``unknown_classes``) and left out of the accuracy.
- segment + ``--raster R`` with ``--label-raster L`` or ``--labels V --class-field F``: the model runs
  over the raster with the engine (exactly as ``sarmae infer``), and its class raster is compared
  with the labels where they exist: per-class IoU, mean IoU, pixel accuracy. Polygons are read and
  rasterized exactly as fine-tuning reads them (``finetune.labels``: repaired, reprojected, pixel
  centres inside); classes the model does not know are reported (``unknown_classes``) and left out.
- classify / detect + ``--raster R`` with ``--labels V --class-field F`` (classify also
  ``--label-raster L``): chips sampled from the labels exactly as fine-tuning samples them
  (``finetune.labels.build_chips``, centred, no split), read through the package's input contract;
  classify: accuracy, per-class accuracy, confusion matrix; detect: mAP@0.5 and mAP@[.5:.95] of
  the detections on those chips against the labelled boxes. Label classes are matched to the
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


def _reference_raster(label_raster: str, names: list[str], out_shape, transform, crs) -> tuple[np.ndarray, list[str]]:
    """A class raster on the predicted grid: model class index, 255 where unlabelled; plus unknown class names."""
    import rasterio
    from rasterio.warp import Resampling, reproject

    ref = np.full(out_shape, 255, np.uint8)
    unknown: set[str] = set()
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


def _vector_labels(raster: str, labels: str, class_field: str, names: list[str],
                   opts) -> tuple[tuple[list, list[int]], dict[str, int], list[str], list[str]]:
    """The polygons of ``labels`` in ``raster``'s pixel space, read exactly as fine-tuning reads them
    (``finetune.labels.vector_labels``: invalid geometries repaired or skipped and counted, reprojected
    to the raster's CRS, GCPs, or pixel coordinates without georeferencing), classes matched to the
    model's by name: (polygons, model class index), features per unknown class, notes, warnings."""
    from engine.reader import SarRaster

    from .finetune.labels import vector_labels

    notes: list[str] = []
    warns: list[str] = []
    with SarRaster.open(raster, opts.bands, opts.complex_mode) as r:
        (shapes,), _, unknown = vector_labels(labels, class_field, names, None, [r], notes, warns)
    return shapes, unknown, notes, warns


def evaluate_raster(package: str, raster: str, png: Path, labels: str | None = None, class_field: str | None = None,
                    label_raster: str | None = None, options: dict | None = None) -> dict:
    """A segment package run over ``raster`` by the engine, against the labels (pixel metrics)."""
    import rasterio

    from engine.inference import InferenceOptions, run_inference

    from .finetune.labels import rasterize_polygons

    pkg = load_package(package)
    card = pkg.card
    if card.task != "segment":
        raise SarmaeError(f"{package} is a '{card.task}' model; raster evaluation here covers segmentation "
                          "(classify and detect: evaluate_chips_from_rasters)")
    if not (labels and class_field) and not label_raster:
        raise SarmaeError("give --label-raster, or --labels with --class-field")
    names = card.class_names
    opts = InferenceOptions(**(options or {}))
    vector = bool(labels and class_field) and not label_raster  # a label raster, when given, wins (as before)
    if vector:  # before the model runs: bad labels fail at once
        shapes, skipped, notes, warns = _vector_labels(raster, labels, class_field, names, opts)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_inference([raster], Path(tmp) / "pred.tif", pkg, opts)
        with rasterio.open(res.outputs["class"]) as src:
            pred = src.read(1)
            if vector:  # on the processed region's pixel grid (all of the raster unless an extent is given)
                r0, c0 = (0, 0) if opts.extent is None else (max(int(opts.extent[0]), 0), max(int(opts.extent[1]), 0))
                ref, unknown = rasterize_polygons(*shapes, pred.shape, r0, c0), sorted(skipped)
            else:
                ref, unknown = _reference_raster(label_raster, names, pred.shape, src.transform, src.crs)
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
    return out
