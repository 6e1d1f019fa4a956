"""Segmentation fine-tuning from labelled polygons or a class raster: ``finetune_segmenter``.

Chips come from ``labels.build_chips`` (spatially split, read through the encoder's input contract).
Model: ``ViTSegmenter`` (simple pyramid + UPerNet head + auxiliary FCN head). Loss: cross-entropy
(255 ignored, optional class weights) + Dice over the classes present in the batch + ``aux_weight``
x auxiliary cross-entropy (SARMAE_SPEC 5). Flips / 90-degree rotations move image and mask
together. Selection metric: mean IoU on the validation chips. Output: a ``segment`` package that
``sarmae infer`` runs unchanged, with metrics, training curves and the confusion matrix inside.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .common import Encoder, FinetuneError, History, fit, plot_history, start
from .config import FinetuneConfig
from .labels import IGNORE, ChipSet, build_chips
from .metrics import confusion, confusion_png, iou_metrics

if TYPE_CHECKING:  # pragma: no cover
    from engine.models.heads import SegHeadConfig

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


def class_weights_of(masks: torch.Tensor, k: int, how: str | list[float] | None) -> torch.Tensor | None:
    """None; "inverse" (inverse pixel frequency in the training masks, mean 1 over the present
    classes, clipped to 0.1..10); or explicit per-class weights."""
    if how is None or how == "none":
        return None
    if not isinstance(how, str):
        if len(how) != k:
            raise FinetuneError(f"{len(how)} class weights given for {k} classes")
        return torch.tensor(how, dtype=torch.float32)
    if how != "inverse":
        raise FinetuneError(f"class weights '{how}': use 'inverse', 'none' or one number per class")
    counts = torch.bincount(masks.flatten().long(), minlength=256)[:k].double()
    w = torch.where(counts > 0, counts.sum() / counts.clamp(min=1), torch.zeros_like(counts))
    w = w / w[counts > 0].mean()
    return torch.where(counts > 0, w.clamp(0.1, 10.0), torch.ones_like(w)).float()


def predict_masks(model, x: torch.Tensor, device: str, batch: int = 32) -> torch.Tensor:
    """(N, C, S, S) float16 chips -> (N, S, S) int64 predicted classes."""
    return torch.cat([model(x[i:i + batch].float().to(device)).argmax(1).cpu() for i in range(0, len(x), batch)])


def arch_name(vit) -> str:
    """'vit_<size>_patch<p>' for a named encoder size, else 'custom'."""
    from engine.models.registry import size_of

    size = size_of(vit.cfg)
    return f"vit_{size}_patch{vit.cfg.patch_size}" if size else "custom"


def save_task_package(model, enc: Encoder, task: str, head: dict, chips: ChipSet, output: str | Path,
                      cfg: FinetuneConfig, hist: History, metric: str, metrics: dict, sources: dict,
                      t0: float, cm=None, overwrite: bool = False) -> Path:
    """Write a task package: encoder contract, classes + colours, provenance (metrics, data, log),
    training_curves.png and (when ``cm``) confusion_matrix.png inside."""
    from engine.package import default_classes, new_card, save_package

    out = Path(output)
    arch = {"name": arch_name(enc.model), "encoder": {**enc.model.cfg.to_dict(), "drop_path_rate": 0.0}, "head": head}
    val = chips.split
    prov = {"encoder": enc.source, "encoder_load": enc.report, **sources, "inputs": chips.inputs,
            "train_chips": int((~val).sum()), "val_chips": int(val.sum()),
            "val_blocks": sum(b[-1] for b in chips.blocks), "blocks": len(chips.blocks),
            "split": "spatial blocks (whole blocks held out for validation)", "seed": cfg.seed,
            "mode": "linear probe" if cfg.linear_probe else "fine-tune", "metrics": metrics,
            "log": chips.log, "warnings": chips.warnings, "config": cfg.to_dict(),
            "minutes": round((time.time() - t0) / 60, 2)}
    card = new_card(out.stem, task, arch, dict(enc.input), default_classes(chips.classes), prov)
    with tempfile.TemporaryDirectory() as tmp:
        plot_history(hist, metric, Path(tmp) / "training_curves.png")
        if cm is not None:
            confusion_png(cm, chips.classes, Path(tmp) / "confusion_matrix.png")
        pngs = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    return save_package(model.cpu().state_dict(), card, out, extra_files=pngs, overwrite=overwrite)


def finetune_segmenter(rasters: list[str] | str, output: str | Path, cfg: FinetuneConfig, *,
                       labels: str | None = None, class_field: str | None = None, label_raster: str | None = None,
                       classes: list[str] | None = None, background: str | None = None,
                       progress: Callable[[dict], None] | None = None, overwrite: bool = False,
                       bands: list | None = None, input_units: str | None = None,
                       class_weights: str | list[float] | None = None, head: SegHeadConfig | None = None,
                       background_share: float = 0.25, max_chips: int = 2000) -> dict:
    """Fine-tune a segmenter on raster(s) + labels; write a ``segment`` package.

    Args:
        rasters: training raster(s), each read with the encoder's input contract.
        labels / class_field: a vector file and its class attribute; or ``label_raster``: a class
            raster (value v = classes[v], or "class_<v>"; nodata / negative values ignored).
        classes: class names in order (default: sorted values found).
        background: class name of the unlabelled pixels in chips (default: they are ignored).
        bands / input_units: as ``sarmae infer --bands / --input-units``.
        class_weights: None, "inverse" (pixel frequency) or one weight per class.
        head: a ``SegHeadConfig`` (default: width from the encoder).
    Returns:
        {"package", "val_mean_iou", "val_iou", "val_pixel_accuracy", "best_epoch", ..., "history"}.
    """
    from engine.models.heads import SegHeadConfig, ViTSegmenter, default_head_channels

    if (labels is None) == (label_raster is None) or (labels is not None and not class_field):
        raise FinetuneError("give the labels: a vector file with its class field, or a label raster (not both)")
    t0 = time.time()
    cfg = dense_config(cfg, "segment")
    device, enc, size = start(cfg)
    chips = build_chips(rasters, enc.input, size, "segment", labels=labels, class_field=class_field,
                        label_raster=label_raster, classes=classes, background=background,
                        val_fraction=cfg.val_fraction, seed=cfg.seed, batch_size=cfg.batch_size, bands=bands,
                        input_units=input_units, background_share=background_share, max_chips=max_chips)
    k = len(chips.classes)
    head = head or SegHeadConfig(channels=default_head_channels(enc.model.embed_dim))
    model = ViTSegmenter(enc.model, k, head).to(device)
    tr, va = np.flatnonzero(~chips.split), np.flatnonzero(chips.split)
    weight = class_weights_of(chips.masks[tr], k, class_weights)
    weight = weight.to(device) if weight is not None else None
    bs = cfg.batch_size
    loader = torch.utils.data.DataLoader(torch.from_numpy(tr), batch_size=bs, shuffle=True, drop_last=len(tr) >= 2 * bs,
                                         generator=torch.Generator().manual_seed(cfg.seed))

    def train_step(m, idx):
        x, y = chips.x[idx].float(), chips.masks[idx].long()
        if cfg.augment:
            x, y = augment_pair(x, y)
        logits, aux = m(x.to(device), return_aux=True)
        return seg_loss(logits, aux, y.to(device), weight, head.aux_weight)

    def evaluate(m) -> dict:
        pred, true = predict_masks(m, chips.x[va], device).numpy(), chips.masks[va].numpy()
        ok = true != IGNORE
        return iou_metrics(confusion(true[ok], pred[ok], k), chips.classes)

    log.info("%s; %d classes, %d train / %d val chips of %d px", enc.report, k, len(tr), len(va), size)
    hist = fit(model, train_step, evaluate, loader, cfg, device, "mean_iou", progress)
    model.eval()
    with torch.no_grad():
        final = evaluate(model)
    metrics = {"val_mean_iou": final["mean_iou"], "val_iou": final["iou"], "val_pixel_accuracy": final["pixel_accuracy"],
               "best_epoch": hist.best_epoch, "epochs_run": len(hist.epochs), "stopped": hist.stopped}
    sources = {"rasters": [str(r) for r in ([rasters] if isinstance(rasters, (str, Path)) else rasters)],
               "labels": str(labels) if labels else None, "class_field": class_field,
               "label_raster": str(label_raster) if label_raster else None, "background": background,
               "class_weights": class_weights}
    out = save_task_package(model, enc, "segment", head.to_dict(), chips, output, cfg, hist, "mean_iou", metrics,
                            sources, t0, cm=final["confusion"], overwrite=overwrite)
    return {"package": str(out), **metrics, "classes": chips.classes, "train_chips": len(tr), "val_chips": len(va),
            "log": chips.log, "warnings": chips.warnings, "seconds": round(time.time() - t0, 1),
            "history": {"val_mean_iou": hist.val_score, "train_loss": hist.train_loss}}
