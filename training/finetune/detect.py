"""Detection fine-tuning from labelled polygons: ``finetune_detector``.

Chips come from ``labels.build_chips`` (task "detect"): boxes are the polygons' bounds in chip
pixels (clipped; boxes under 2 px or less than half inside are dropped), labels 1..K, and a share
of chips placed anywhere serve as negatives (empty targets). Model: ``ViTDetector`` (ViTDet simple
pyramid + FPN + torchvision Faster R-CNN). Flips / 90-degree rotations move boxes with the image.
Selection metric: mAP@0.5 on the validation chips, which tile the held-out blocks edge to edge
(torchmetrics MeanAveragePrecision, COCO rules); mAP@[.5:.95] is reported too. Output: a
``detect`` package that ``sarmae infer`` runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .common import (
    FinetuneError,
    class_colours,
    fit,
    fit_batch,
    save_task_package,
    start,
    validation_report,
)
from .config import FinetuneConfig
from .labels import build_chips, chip_provenance
from .segment import dense_config

if TYPE_CHECKING:  # pragma: no cover
    from engine.models.heads import DetHeadConfig

log = logging.getLogger("sarmae.finetune")


def flip_boxes(b: torch.Tensor, size: int, axis: str) -> torch.Tensor:
    """(n, 4) x0, y0, x1, y1 after flipping an S x S image left-right ("x") or up-down ("y")."""
    x0, y0, x1, y1 = b.unbind(1)
    if axis == "x":
        return torch.stack([size - x1, y0, size - x0, y1], 1)
    return torch.stack([x0, size - y1, x1, size - y0], 1)


def rot90_boxes(b: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """(n, 4) boxes after ``torch.rot90(image, k, (-2, -1))``: each quarter turn maps a point
    (x, y) to (y, S - x), so a box (x0, y0, x1, y1) becomes (y0, S - x1, y1, S - x0)."""
    for _ in range(k % 4):
        x0, y0, x1, y1 = b.unbind(1)
        b = torch.stack([y0, size - x1, y1, size - x0], 1)
    return b


def augment_boxes(x: torch.Tensor, boxes: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same random flips / quarter turns for a batch (N, C, S, S) and its per-image boxes."""
    s = x.shape[-1]
    if torch.rand(()) < 0.5:
        x, boxes = x.flip(-1), [flip_boxes(b, s, "x") for b in boxes]
    if torch.rand(()) < 0.5:
        x, boxes = x.flip(-2), [flip_boxes(b, s, "y") for b in boxes]
    k = int(torch.randint(0, 4, ()))
    if k:
        x, boxes = torch.rot90(x, k, (-2, -1)), [rot90_boxes(b, s, k) for b in boxes]
    return x, boxes


def detection_metrics(preds: list[dict], targets: list[dict], classes: list[str], max_detections: int = 100) -> dict:
    """mAP@0.5, mAP@[.5:.95] (COCO) and AP@[.5:.95] per class; labels are 1..K. ``max_detections``:
    the best-scored boxes counted per image (COCO: 100; a whole scene needs more)."""
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise FinetuneError("detection metrics need torchmetrics and pycocotools: "
                            "pip install torchmetrics pycocotools") from e
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", extended_summary=True,
                                  max_detection_thresholds=[1, 10, max(100, max_detections)])
    metric.warn_on_many_detections = False  # COCO rules: only the best-scored boxes per image count
    metric.update(preds, targets)
    r = metric.compute()
    # COCO's summary reads its headline mAP at 100 boxes per image (-1 when 100 is not a threshold),
    # so every number is taken from the precision table at the largest threshold instead:
    # (IoU thresholds, recall points, classes, area ranges, max detections); -1 = no such class
    prec = r["precision"][:, :, :, 0, -1].double()
    ids = r["classes"].reshape(-1).tolist()
    per, ap = {c: None for c in classes}, []
    for k, cid in enumerate(ids):
        p = prec[:, :, k]
        if (p > -1).any():
            a = torch.where(p > -1, p, torch.zeros_like(p)).mean(1)  # AP per IoU threshold
            ap.append(a)
            if 1 <= cid <= len(classes):
                per[classes[cid - 1]] = float(a.mean())
    ap = torch.stack(ap) if ap else torch.zeros(1, prec.shape[0], dtype=torch.float64)
    per = {c: None if v is None else round(v, 6) for c, v in per.items()}
    return {"map_50": round(float(ap[:, 0].mean()), 6), "map": round(float(ap.mean()), 6), "ap_per_class": per,
            "boxes": int(sum(len(t["boxes"]) for t in targets)),
            "detections": int(sum(len(p["boxes"]) for p in preds))}


def finetune_detector(rasters: list[str] | str, output: str | Path, cfg: FinetuneConfig, *, labels: str,
                      class_field: str, classes: list[str] | None = None,
                      progress: Callable[[dict], None] | None = None, overwrite: bool = False,
                      head: DetHeadConfig | None = None, background_share: float = 0.25,
                      colours: dict[str, str] | list[str] | None = None) -> dict:
    """Fine-tune a box detector on raster(s) + labelled polygons; write a ``detect`` package.

    Args:
        rasters: training raster(s), each read with the encoder's input contract.
        labels / class_field: a vector file and its class attribute (one box per polygon).
        classes: class names in order (default: sorted values found); labels 1..K = classes[0..K-1].
        background_share: share of chips placed anywhere (negatives, or objects met by chance).
        head: a ``DetHeadConfig`` (default: the CPU-sized head, FPN 128; see its docstring).
        colours: '#rrggbb' per class ({name: colour}, or a list in ``classes`` order).
        ``cfg.bands`` / ``cfg.input_units`` act as ``sarmae infer --bands / --input-units``.
    Returns:
        {"package", "val_map_50", "val_map", "val_ap_per_class", "best_epoch", "validation", "warnings", ...,
        "history"}; a batch larger than the training chips is lowered to their number (a warning).
    """
    from engine.models.heads import DetHeadConfig, ViTDetector

    if not labels or not class_field:
        raise FinetuneError("detection needs labelled polygons: a vector file and its class field")
    t0 = time.time()
    cfg = dense_config(cfg, "detect")
    device, enc, size = start(cfg)
    chips = build_chips(rasters, enc.input, size, "detect", labels=labels, class_field=class_field, classes=classes,
                        val_fraction=cfg.val_fraction, seed=cfg.seed, bands=cfg.bands, input_units=cfg.input_units,
                        background_share=background_share, max_chips=cfg.max_chips)
    colours = class_colours(chips.classes, colours, classes)
    tr, va = np.flatnonzero(~chips.split), np.flatnonzero(chips.split)
    cfg = fit_batch(cfg, len(tr), chips.warnings)  # a few boxes train at the default batch
    n_tr, n_va = (sum(len(chips.boxes[i]) for i in s) for s in (tr, va))
    if not n_tr or not n_va:
        raise FinetuneError(f"{n_tr} training and {n_va} validation box(es) in the chips: both splits need objects; "
                            "label more objects, spread over a wider area")
    head = head or DetHeadConfig()
    model = ViTDetector(enc.model, len(chips.classes), head).to(device)
    boxes = [torch.from_numpy(b) for b in chips.boxes]
    blabels = [torch.from_numpy(b) for b in chips.box_labels]
    bs = cfg.batch_size
    loader = torch.utils.data.DataLoader(torch.from_numpy(tr), batch_size=bs, shuffle=True, drop_last=len(tr) >= 2 * bs,
                                         generator=torch.Generator().manual_seed(cfg.seed))

    def train_step(m, idx):
        x, bx = chips.x[idx].float(), [boxes[i] for i in idx.tolist()]
        if cfg.augment:
            x, bx = augment_boxes(x, bx)
        targets = [{"boxes": b.to(device), "labels": blabels[i].to(device)} for b, i in zip(bx, idx.tolist())]
        losses = m(list(x.to(device)), targets)
        return sum(losses.values())

    def evaluate(m) -> dict:
        preds = []
        for j in range(0, len(va), 16):
            out = m(list(chips.x[va[j:j + 16]].float().to(device)))
            preds += [{k: v.cpu() for k, v in o.items()} for o in out]
        targets = [{"boxes": boxes[i], "labels": blabels[i]} for i in va]
        return detection_metrics(preds, targets, chips.classes)

    log.info("%s; %d classes, %d train / %d val chips of %d px, %d / %d boxes", enc.report, len(chips.classes),
             len(tr), len(va), size, n_tr, n_va)
    hist = fit(model, train_step, evaluate, loader, cfg, device, "map_50", progress)
    model.eval()
    with torch.no_grad():
        final = evaluate(model)
    held = np.concatenate([np.asarray(chips.box_labels[i]).reshape(-1) for i in va]) - 1  # classes of held-out boxes
    validation = validation_report(chips.classes, held, len(va), unit="box")
    warns = chips.warnings + ([validation["note"]] if not validation["reliable"] else [])
    metrics = {"val_map_50": final["map_50"], "val_map": final["map"], "val_ap_per_class": final["ap_per_class"],
               "val_boxes": n_va, "train_boxes": n_tr, "best_epoch": hist.best_epoch, "epochs_run": len(hist.epochs),
               "stopped": hist.stopped, "validation": validation}
    sources = {"rasters": [str(r) for r in ([rasters] if isinstance(rasters, (str, Path)) else rasters)],
               "labels": str(labels), "class_field": class_field, **chip_provenance(chips)}
    out = save_task_package(model, enc, "detect", head.to_dict(), chips.classes, chips.contract, output, cfg, hist,
                            "map_50", metrics, sources, t0, overwrite=overwrite, colours=colours)
    return {"package": str(out), **metrics, "classes": chips.classes, "train_chips": len(tr), "val_chips": len(va),
            "log": chips.log, "warnings": warns, "seconds": round(time.time() - t0, 1),
            "history": {"val_map_50": hist.val_score, "train_loss": hist.train_loss}}
