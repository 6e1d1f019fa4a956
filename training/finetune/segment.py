"""Segmentation fine-tuning from labelled polygons or a class raster: ``finetune_segmenter``.

Chips come from ``labels.build_chips`` (spatially split, read through the encoder's input contract).
Models: ``LightSegmenter`` (per-pixel head on encoder maps + SAR pixel features; the quick mode fits it
on the frozen encoder, ``quick.py``) or ``ViTSegmenter`` (simple pyramid + UPerNet head + auxiliary FCN
head). Loss: cross-entropy (255 ignored, optional class weights) + Dice over the classes present in the
batch + ``aux_weight`` x auxiliary cross-entropy (SARMAE_SPEC 5; the light head has none). Flips / 90-degree rotations move image and mask
together. Selection metric: mean IoU on the validation chips. Output: a ``segment`` package that
``sarmae infer`` runs unchanged, with metrics, training curves and the confusion matrix inside.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .common import (
    FinetuneError,
    budget_spent,
    class_colours,
    fit_batch,
    gain_jitter,
    save_task_package,
    start,
    validation_report,
)
from .config import FinetuneConfig
from .labels import IGNORE, build_chips, chip_provenance
from .metrics import confusion, iou_metrics
from .quick import fit_segment_head, full_after_quick, quick_segmenter, resolve_mode

if TYPE_CHECKING:  # pragma: no cover
    from engine.models.heads import SegHeadConfig
    from engine.models.seg_light import LightSegHeadConfig

log = logging.getLogger("sarmae.finetune")


def dense_config(cfg: FinetuneConfig, task: str) -> FinetuneConfig:
    """``cfg`` for a dense task (its layer decay default, 0.9, applies unless one was given)."""
    cfg = dataclasses.replace(cfg, task=task)
    log.info("layer-wise lr decay %.2f%s", cfg.decay, "" if cfg.layer_decay is not None else f" (the {task} default)")
    return cfg


def augment_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flips / 90-degree rotation for images (N, C, H, W) and masks (N, H, W)."""
    if torch.rand(()) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if torch.rand(()) < 0.5:
        x, y = x.flip(-2), y.flip(-2)
    k = int(torch.randint(0, 4, ()))
    if k:
        x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
    return x, y


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice, averaged over the classes present in ``target`` (N, H, W; 255 ignored)."""
    k = logits.shape[1]
    valid = (target != IGNORE).unsqueeze(1).float()  # (N, 1, H, W)
    onehot = F.one_hot(torch.where(target == IGNORE, 0, target), k).permute(0, 3, 1, 2).float() * valid
    prob = logits.float().softmax(1) * valid
    inter, total = (prob * onehot).sum((0, 2, 3)), prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    if not present.any():
        return logits.sum() * 0.0
    return (1.0 - (2.0 * inter + 1.0) / (total + 1.0))[present].mean()


def seg_loss(logits: torch.Tensor, aux: torch.Tensor | None, target: torch.Tensor, weight: torch.Tensor | None,
             aux_weight: float) -> torch.Tensor:
    """CE (ignore 255, class weights) + Dice + aux_weight x aux CE; 0 (with a graph) on an all-ignored batch."""
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE) + dice_loss(logits, target)
    if aux is not None and aux_weight:
        loss = loss + aux_weight * F.cross_entropy(aux, target, weight=weight, ignore_index=IGNORE)
    return loss


def class_weights_of(masks: torch.Tensor, classes: list[str], how: str | list[float] | None) -> torch.Tensor | None:
    """None; "auto" / "inverse" (inverse pixel frequency in the training masks, mean 1 over the
    present classes, clipped to 0.1..10); "sqrt" (its square root: a softer push towards rare
    classes); or explicit weights, one per class in ``classes`` order."""
    k = len(classes)
    if how is None or how == "none":
        return None
    if not isinstance(how, str):
        if len(how) != k:
            raise FinetuneError(f"{len(how)} class weight(s) given for {k} classes ({', '.join(classes)}); "
                                "give one per class in this order, or 'auto'")
        return torch.tensor([float(w) for w in how], dtype=torch.float32)
    if how not in ("auto", "inverse", "sqrt"):
        raise FinetuneError(f"class weights '{how}': use 'auto' (inverse pixel frequency), 'sqrt' (its square "
                            "root), 'none' or one number per class")
    counts = torch.bincount(masks.flatten().long(), minlength=256)[:k].double()
    w = torch.where(counts > 0, counts.sum() / counts.clamp(min=1), torch.zeros_like(counts))
    w = w.sqrt() if how == "sqrt" else w
    w = w / w[counts > 0].mean()
    return torch.where(counts > 0, w.clamp(0.1, 10.0), torch.ones_like(w)).float()


def predict_masks(model, x: torch.Tensor, device: str, batch: int = 32) -> torch.Tensor:
    """(N, C, S, S) float16 chips -> (N, S, S) int64 predicted classes."""
    return torch.cat([model(x[i:i + batch].float().to(device)).argmax(1).cpu() for i in range(0, len(x), batch)])


def finetune_segmenter(rasters: list[str] | str, output: str | Path, cfg: FinetuneConfig, *,
                       labels: str | None = None, class_field: str | None = None, label_raster: str | None = None,
                       classes: list[str] | None = None, background: str | None = None,
                       progress: Callable[[dict], None] | None = None, overwrite: bool = False,
                       head: SegHeadConfig | LightSegHeadConfig | None = None, background_share: float = 0.25,
                       colours: dict[str, str] | list[str] | None = None) -> dict:
    """Fine-tune a segmenter on raster(s) + labels; write a ``segment`` package.

    Args:
        rasters: training raster(s), each read with the encoder's input contract.
        labels / class_field: a vector file and its class attribute; or ``label_raster``: a class
            raster (value v = classes[v], or "class_<v>"; nodata / negative values ignored).
        classes: class names in order (default: sorted values found).
        background: class name of the unlabelled pixels in chips (default: they are ignored).
        head: a ``LightSegHeadConfig`` or ``SegHeadConfig`` (UPerNet); default: ``cfg.seg_head``
            (the quick mode always uses the light head).
        colours: '#rrggbb' per class ({name: colour}, or a list in ``classes`` order).
        ``cfg.mode``: head (quick, frozen encoder), full, or auto (``quick.resolve_mode``);
        ``cfg.bands`` / ``cfg.input_units`` act as ``sarmae infer --bands / --input-units``;
        ``cfg.class_weights``: None, "auto" (inverse pixel frequency) or one weight per class.
        A batch larger than the training chips is lowered to their number.
    Returns:
        {"package", "val_mean_iou", "val_iou", "val_pixel_accuracy", "best_epoch", "mode", "validation",
        "warnings", ..., "history"}.
    """
    from engine.models.heads import SegHeadConfig, default_head_channels
    from engine.models.registry import build_segmenter
    from engine.models.seg_light import LightSegHeadConfig

    if (labels is None) == (label_raster is None) or (labels is not None and not class_field):
        raise FinetuneError("give the labels: a vector file with its class field, or a label raster (not both)")
    t0 = time.time()
    cfg = dense_config(cfg, "segment")
    device, enc, size = start(cfg)
    chips = build_chips(rasters, enc.input, size, "segment", labels=labels, class_field=class_field,
                        label_raster=label_raster, classes=classes, background=background,
                        val_fraction=cfg.val_fraction, seed=cfg.seed, bands=cfg.bands,
                        input_units=cfg.input_units, background_share=background_share, max_chips=cfg.max_chips)
    colours = class_colours(chips.classes, colours, classes)
    k = len(chips.classes)
    tr, va = np.flatnonzero(~chips.split), np.flatnonzero(chips.split)
    cfg = fit_batch(cfg, len(tr), chips.warnings)
    mode, why = resolve_mode(cfg, "segment", len(tr))
    chips.log.append(why)
    log.info(why)
    if head is None:
        kind = "light" if mode != "full" else cfg.seg_head
        if kind not in ("light", "upernet"):
            raise FinetuneError(f"segmentation head '{kind}': use light or upernet")
        head = (LightSegHeadConfig(hidden=0 if mode != "full" else 64) if kind == "light"
                else SegHeadConfig(channels=default_head_channels(enc.model.embed_dim)))
    elif mode != "full" and not isinstance(head, LightSegHeadConfig):
        raise FinetuneError("the quick mode fits the light head; use --mode full for the UPerNet head")
    weight = class_weights_of(chips.masks[tr], chips.classes, cfg.class_weights)
    weight = weight.to(device) if weight is not None else None
    bs = cfg.batch_size
    loader = torch.utils.data.DataLoader(torch.from_numpy(tr), batch_size=bs, shuffle=True, drop_last=len(tr) >= 2 * bs,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    true_va = chips.masks[va].numpy()

    def scores(pred: np.ndarray) -> dict:
        ok = true_va != IGNORE
        return iou_metrics(confusion(true_va[ok], pred[ok], k), chips.classes)

    def train_step(m, idx):
        x, y = chips.x[idx].float(), chips.masks[idx].long()
        if cfg.augment:
            x, y = augment_pair(x, y)
            x = gain_jitter(x, chips.contract, cfg.gain_db)
        logits, aux = m(x.to(device), return_aux=True)
        return seg_loss(logits, aux, y.to(device), weight, head.aux_weight)

    def evaluate(m) -> dict:
        return scores(predict_masks(m, chips.x[va], device).numpy())

    log.info("%s; %d classes, %d train / %d val chips of %d px", enc.report, k, len(tr), len(va), size)
    hist, chosen, cv = None, mode, None
    quick_loss = lambda logits, y: seg_loss(logits, None, y, weight, 0.0)  # noqa: E731
    if mode != "full" and head.hidden == 0:  # the default quick mode: linear (+ MLP) heads on one encoding
        model, head, hist, cv, notes = quick_segmenter(enc.model, k, chips, tr, va, cfg, device, quick_loss, scores,
                                                       t0, progress)
        for note in notes:
            chips.log.append(note)
            log.info(note)
    else:
        model = build_segmenter(enc.model, k, head_config_dict(head)).to(device)
        if mode != "full":  # a light head given with hidden > 0: Adam on the frozen maps
            hist = fit_segment_head(model, chips, tr, va, cfg, device, quick_loss, scores, progress)
    if hist is not None:
        chosen = "head"
    if mode in ("full", "auto") and not budget_spent(cfg, t0):
        hist, chosen, note = full_after_quick(model, hist, train_step, evaluate, loader, cfg, t0, device, "mean_iou",
                                              progress)
        if note:
            chips.log.append(note)
    model.eval()
    refit = bool(cv and cv.get("refit_chips"))  # quick mode, few chips: the head was fitted again on every chip
    with torch.no_grad():  # after a refit, the validation score is the one of the head fitted without them
        final = hist.val_metrics[hist.best_epoch] if refit else evaluate(model)
    validation = validation_report(chips.classes, true_va, len(va), cv)
    warns = chips.warnings + ([validation["note"]] if not validation["reliable"] else [])
    metrics = {"val_mean_iou": final["mean_iou"], "val_iou": final["iou"], "val_pixel_accuracy": final["pixel_accuracy"],
               "best_epoch": hist.best_epoch, "epochs_run": len(hist.epochs), "stopped": hist.stopped,
               "mode": chosen, "mode_reason": why, "validation": validation}
    sources = {"rasters": [str(r) for r in ([rasters] if isinstance(rasters, (str, Path)) else rasters)],
               "labels": str(labels) if labels else None, "class_field": class_field,
               "label_raster": str(label_raster) if label_raster else None, "background": background,
               "class_weights": weight.tolist() if weight is not None else None, **chip_provenance(chips)}
    show = np.concatenate([va[:4], tr[:max(0, 6 - min(4, len(va)))]])
    with torch.no_grad():
        preview = (chips.x[show], chips.masks[show].numpy(), predict_masks(model, chips.x[show], device).numpy(),
                   ["validation" if chips.split[i] and not refit else "training" for i in show])
    out = save_task_package(model, enc, "segment", head_config_dict(head), chips.classes, chips.contract, output, cfg, hist,
                            "mean_iou", metrics, sources, t0, cm=final["confusion"], overwrite=overwrite,
                            colours=colours, preview=preview)
    return {"package": str(out), **metrics, "classes": chips.classes, "train_chips": len(tr), "val_chips": len(va),
            "log": chips.log, "warnings": warns, "seconds": round(time.time() - t0, 1),
            "preview_png": str(Path(out) / "preview.png"),
            "history": {"val_mean_iou": hist.val_score, "train_loss": hist.train_loss}}


def head_config_dict(head) -> dict:
    """model.json's ``architecture.head`` for a LightSegHeadConfig or a (UPerNet) SegHeadConfig."""
    from engine.models.seg_light import LightSegHeadConfig

    return {"kind": "light" if isinstance(head, LightSegHeadConfig) else "upernet", **head.to_dict()}
