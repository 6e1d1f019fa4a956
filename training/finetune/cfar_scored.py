"""Training the CFAR proposal scorer (``detect.cfar_scored``) from rasters + labelled polygons:
``finetune_cfar_scored`` (``sarmae finetune --task detect --method cfar_scored``).

1. Proposals: CA-CFAR; of its generic ``WINDOWS`` x false-alarm probabilities ``PFAS``, the
   settings with the fewest proposals among those covering at least ``COVER`` of the best coverage
   of the TRAINING labels (a target is covered by a proposal with IoU >= 0.5), with at most
   ``MAX_PER_TARGET`` proposals per target. Every object is kept (score threshold 0).
2. Samples: each proposal, positive when its IoU with a target is >= 0.5, left out when only its
   centre lies in a target (a piece of a ship), else negative; plus ``JITTER`` jittered copies of
   every labelled box as extra positives (so targets CFAR misses in training still teach the
   scorer). Chips from ``engine.cfar.chips``, exactly as inference reads them.
3. The scorer (``engine.models.chip_scorer``): BCE on the logit; flips / quarter turns (width and
   height swap with the chip), contrast jitter. AdamW, one-cycle schedule, ``cfg.epochs`` epochs or
   ``cfg.max_minutes``, whichever ends first.
4. The package: CFAR settings + weights + model.onnx; the score threshold with the best F1 of the
   whole detector on the training rasters (within [0.05, 0.95]).
   Training-area mAP@0.5 of the whole detector is reported (not a held-out score).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import FinetuneError
from .config import FinetuneConfig

CFAR_BASE = {"method": "ca", "enl": 1.0, "min_area": 4}
WINDOWS = ((9, 41), (15, 61))  # CFAR (guard, background) full sides in px tried for the proposals
PFAS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
COVER, MAX_PER_TARGET = 0.97, 60
JITTER = 4


def covers(props: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per proposal: 1 when its IoU with a target is >= 0.5 (positive), -1 when it only has its centre
    in a target's box (a piece of it, or a box around more: left out of the loss), else 0; and per
    target whether a proposal has IoU >= 0.5 with it."""
    from torchvision.ops import box_iou

    if not len(props) or not len(truth):
        return np.zeros(len(props), np.int64), np.zeros(len(truth), bool)
    iou = box_iou(torch.as_tensor(props, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64)).numpy()
    cx, cy = (props[:, 0] + props[:, 2]) / 2, (props[:, 1] + props[:, 3]) / 2
    inside = ((cx[:, None] >= truth[None, :, 0]) & (cx[:, None] < truth[None, :, 2])
              & (cy[:, None] >= truth[None, :, 1]) & (cy[:, None] < truth[None, :, 3]))
    hit = iou >= 0.5
    return np.where(hit.any(1), 1, np.where(inside.any(1), -1, 0)), hit.any(0)


def choose_proposals(rasters: list[str], truth: list, names: list[str], opts, base: dict,
                     pfas: tuple[float, ...] = PFAS) -> tuple[dict, list[dict]]:
    """The CFAR settings whose proposals cover the training targets (see the module docstring):
    each of ``WINDOWS`` x ``pfas``; among those within ``COVER`` of the best coverage, the fewest proposals."""
    from ..cfar_baseline import cfar_boxes

    n_true = sum(len(t[0]) for t in truth)
    tried = []
    for guard, background in WINDOWS:
        for pfa in pfas:
            s = {**base, "guard": guard, "background": background, "pfa": pfa, "k_sigma": None}
            _, preds, _ = cfar_boxes(rasters, s, opts, names)
            covered = sum(int(covers(p[0], t[0])[1].sum()) for p, t in zip(preds, truth))
            tried.append({"guard": guard, "background": background, "pfa": pfa,
                          "coverage": covered / max(n_true, 1), "proposals": sum(len(p[0]) for p in preds)})
    fine = [t for t in tried if t["proposals"] <= MAX_PER_TARGET * max(n_true, 1)] or tried[-1:]
    best = max(t["coverage"] for t in fine)
    chosen = min((t for t in fine if t["coverage"] >= COVER * best), key=lambda t: (t["proposals"], t["pfa"]))
    return {**base, **{k: chosen[k] for k in ("guard", "background", "pfa")}, "k_sigma": None,
            "score_threshold": 0.0}, tried


def jittered(truth: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` copies of each box (n, 4): centre moved by N(0, 0.1 size), sides scaled by exp(N(0, 0.2))."""
    b = np.repeat(truth, k, 0)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx = (b[:, 0] + b[:, 2]) / 2 + rng.normal(0, 0.1, len(b)) * w
    cy = (b[:, 1] + b[:, 3]) / 2 + rng.normal(0, 0.1, len(b)) * h
    w, h = w * np.exp(rng.normal(0, 0.2, len(b))), h * np.exp(rng.normal(0, 0.2, len(b)))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def build_samples(rasters: list[str], truth: list, props: list, size: int, opts, seed: int) -> dict:
    """Chips, geometry and labels (1 target, 0 not) of the proposals and the jittered labelled boxes."""
    from engine.cfar import CfarConfig
    from engine.cfar.chips import chip_geometry, chip_sides, read_chips
    from engine.cfar.scene import source_units
    from engine.reader import SarRaster

    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"chips": [], "geometry": [], "y": []}
    cfg = CfarConfig(input_units=opts.input_units)
    for r, (tb, _), (pb, _, _) in zip(rasters, truth, props):
        label, _ = covers(pb, tb)
        keep = label >= 0  # pieces of targets are neither
        boxes = np.concatenate([pb[keep], jittered(tb, JITTER, rng)])
        y = np.concatenate([label[keep], np.ones(len(tb) * JITTER, np.int64)])
        with SarRaster.open(r, opts.bands, opts.complex_mode) as src:
            units = source_units(src, cfg, [])
            chips = read_chips(src, units, boxes, size, Path(r).name, bool(opts.input_units))
        parts["chips"].append(chips)
        parts["geometry"].append(chip_geometry(boxes, chip_sides(boxes)))
        parts["y"].append(y.astype(np.float32))
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}


def augment(chips: torch.Tensor, geometry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One random flip / quarter turn for the batch (a quarter turn swaps width and height), contrast jitter."""
    if torch.rand(()) < 0.5:
        chips = chips.flip(-1)
    if torch.rand(()) < 0.5:
        chips = chips.flip(-2)
    if torch.rand(()) < 0.5:
        chips, geometry = torch.rot90(chips, 1, (-2, -1)), geometry[:, [1, 0, 2]]
    return chips * torch.empty(len(chips), 1, 1, 1).uniform_(0.8, 1.25), geometry


def train_scorer(data: dict, cfg: FinetuneConfig, head, progress: Callable[[dict], None] | None, t0: float):
    """The chip scorer fitted on ``data`` (see the module docstring); its loss history."""
    from engine.models.chip_scorer import ChipScorer

    model = ChipScorer(head)
    n = len(data["y"])
    bs = max(1, min(cfg.batch_size, n))
    steps = max(1, cfg.epochs * (n // bs))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr or 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr or 2e-3, total_steps=steps, pct_start=0.1)
    history, step = [], 0
    for epoch in range(cfg.epochs):
        model.train()
        order, total = torch.randperm(n), 0.0
        for i in range(0, n - bs + 1, bs):
            idx = order[i:i + bs]
            c, g = data["chips"][idx], data["geometry"][idx]
            if cfg.augment:
                c, g = augment(c, g)
            loss = F.binary_cross_entropy_with_logits(model(c, g)[:, 0], data["y"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step() if step < steps - 1 else None
            step, total = step + 1, total + loss.item() * len(idx)
        elapsed = time.time() - t0
        history.append({"epoch": epoch + 1, "loss": total / max(n, 1), "seconds": round(elapsed, 1)})
        spent = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
        if progress is not None:  # as fine-tuning's rows (common.progress_line), without a validation metric
            eta = 0.0 if spent else elapsed / (epoch + 1) * (cfg.epochs - epoch - 1)
            if cfg.max_minutes is not None:
                eta = min(eta, max(0.0, 60 * cfg.max_minutes - elapsed))
            progress({"epoch": epoch, "epochs": cfg.epochs, "train_loss": history[-1]["loss"], "metric": None,
                      "elapsed_s": elapsed, "eta_s": eta})
        if spent:
            break
    return model.eval(), history


def training_threshold(model, rasters: list[str], truth: list, props: list, size: int, opts) -> float:
    """The probability with the best F1 (IoU >= 0.5) of the whole detector on the training rasters
    (every proposal scored, NMS as inference): the operating point, not 0.5, because the jittered
    positives shift the scorer's prior."""
    from engine.cfar import CfarConfig
    from engine.cfar.chips import chip_geometry, chip_sides, read_chips
    from engine.cfar.objects import nms
    from engine.cfar.scene import source_units
    from engine.reader import SarRaster
    from engine.tasks.cfar_scored import probabilities

    from ..cfar_baseline import best_f1_threshold

    preds = []
    for r, (pb, _, pc) in zip(rasters, props):
        with SarRaster.open(r, opts.bands, opts.complex_mode) as src:
            units = source_units(src, CfarConfig(input_units=opts.input_units), [])
            chips = read_chips(src, units, pb, size, Path(r).name, bool(opts.input_units))
        with torch.no_grad():
            p = probabilities(model(torch.from_numpy(chips), torch.from_numpy(chip_geometry(pb, chip_sides(pb))))
                              .numpy()) if len(pb) else np.zeros(0)
        k = np.sort(nms(pb, p, 0.5))
        preds.append((pb[k], p[k], pc[k]))
    return float(min(max(best_f1_threshold(preds, truth), 0.05), 0.95))


def finetune_cfar_scored(rasters: list[str] | str, output: str | Path, cfg: FinetuneConfig, *, labels: str,
                         class_field: str, classes: list[str] | None = None,
                         progress: Callable[[dict], None] | None = None, overwrite: bool = False,
                         cfar_base: dict | None = None, pfas: tuple[float, ...] = PFAS, **_ignored) -> dict:
    """Train a CFAR + chip scorer detector on raster(s) + labelled polygons of ONE class and write
    its package (see the module docstring). Returns the chosen CFAR settings, sample counts, the
    loss history and the detector's mAP@0.5 on the training rasters."""
    from engine.inference import InferenceOptions
    from engine.models.chip_scorer import ChipScorerConfig, export_chip_scorer
    from engine.package import save_package
    from engine.tasks.cfar_scored import cfar_scored_card

    from ..cfar_baseline import cfar_boxes, truth_boxes
    from .labels import read_vector

    t0 = time.time()
    rasters = [str(r) for r in ([rasters] if isinstance(rasters, (str, Path)) else rasters)]
    if not labels or not class_field:
        raise FinetuneError("the CFAR scorer learns from labelled polygons: give --labels VECTOR --class-field NAME")
    names = classes or read_vector(labels, class_field, None, None, [], [])[2]
    if len(names) != 1:
        raise FinetuneError(f"{labels}: the CFAR scorer finds one class of objects, but field '{class_field}' holds "
                            f"{len(names)} ({', '.join(names)}): give --classes with the one to learn")
    torch.manual_seed(cfg.seed)
    opts = InferenceOptions(bands=cfg.bands[:1] if cfg.bands else None, input_units=cfg.input_units)
    truth = truth_boxes(rasters, labels, class_field, names, opts)
    if not sum(len(t[0]) for t in truth):
        raise FinetuneError(f"{labels}: no polygon of class '{names[0]}' lies on the training raster(s)")
    base = {**CFAR_BASE, **(cfar_base or {}), "class_name": names[0]}
    settings, tried = choose_proposals(rasters, truth, names, opts, base, pfas)
    _, props, _ = cfar_boxes(rasters, settings, opts, names)
    head = ChipScorerConfig()
    data = build_samples(rasters, truth, props, head.chip, opts, cfg.seed)
    model, history = train_scorer(data, cfg, head, progress, t0)
    threshold = training_threshold(model, rasters, truth, props, head.chip, opts)
    card = cfar_scored_card(settings, head.to_dict(), names[0], threshold, Path(output).stem, provenance={
        "training": "CFAR proposals + chip scorer (training.finetune.cfar_scored)",
        "training_rasters": [Path(r).name for r in rasters], "labels": Path(labels).name,
        "cfar_pfa": settings["pfa"], "samples": int(len(data["y"])), "positives": int(data["y"].sum()),
        "epochs": len(history), "seed": cfg.seed})
    sd = {k: v for k, v in model.state_dict().items()}
    dest = save_package(sd, card, output, onnx_bytes=export_chip_scorer(model), overwrite=overwrite)
    return {"package": str(dest), "cfar": {k: settings[k] for k in ("pfa", "guard", "background", "min_area")},
            "cfar_tried": tried, "targets": int(sum(len(t[0]) for t in truth)),
            "proposals": int(sum(len(p[0]) for p in props)), "samples": int(len(data["y"])),
            "positives": int(data["y"].sum()), "epochs": len(history), "score_threshold": threshold,
            "final_loss": history[-1]["loss"] if history else None,
            "minutes": round((time.time() - t0) / 60, 3), "history": history}
