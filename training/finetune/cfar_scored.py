"""Training the CFAR proposal scorer (``detect.cfar_scored``) from rasters + labelled polygons:
``finetune_cfar_scored`` (``sarmae finetune --task detect --method cfar_scored``).

1. Proposals: CA-CFAR with the extra levels ``LEVELS_DB`` (``engine.cfar.objects.objects_at_levels``:
   tighter boxes of the same objects, touching pixels only); of its generic ``WINDOWS`` x
   false-alarm probabilities ``PFAS``, the settings with the fewest proposals among those covering
   at least ``COVER`` of the best coverage of the TRAINING labels (a target is covered by a
   proposal with IoU >= 0.5), with at most ``MAX_PER_TARGET`` proposals per target. Every object
   is kept (score threshold 0).
2. Samples: each proposal, its score target ``quality`` of its IoU with the best-overlapping
   target (0 below 0.5: pieces of a ship and boxes around more are negatives; of two boxes of one
   ship the better-fitting scores higher); plus ``JITTER`` jittered copies of every labelled box
   (so targets CFAR misses in training still teach the scorer). Chips from ``engine.cfar.chips``
   (with the box channel when ``box_channel``: off by default, it lost on validation), exactly as
   inference reads them.
3. The scorer (``engine.models.chip_scorer``): BCE on the logit (+ smooth-L1 on the box deltas
   when ``regress``); flips / quarter turns (width and height swap with the chip, the deltas
   follow), contrast jitter; an epoch is at least ``EPOCH_SAMPLES`` samples. AdamW, one-cycle
   schedule, ``cfg.epochs`` epochs or ``cfg.max_minutes``, whichever ends first.
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
LEVELS_DB = [3.0, 6.0, 10.0]  # proposals also above the threshold x 2, 4, 10 (and touching pixels only)
WINDOWS = ((9, 41), (15, 61))  # CFAR (guard, background) full sides in px tried for the proposals
PFAS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
COVER, MAX_PER_TARGET = 0.97, 60
JITTER = 4
FULL_IOU = 0.8  # boxes fitting their target this well are full positives (score target 1)
REG_IOU = 0.3  # proposals overlapping a target this much teach the box branch
EPOCH_SAMPLES = 1024  # an epoch is at least this many samples (the data repeated, augmented afresh)


def _overlaps(props: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU of every proposal with every target, whether each proposal's centre lies in each target's box)."""
    from torchvision.ops import box_iou

    iou = box_iou(torch.as_tensor(props, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64)).numpy()
    cx, cy = (props[:, 0] + props[:, 2]) / 2, (props[:, 1] + props[:, 3]) / 2
    inside = ((cx[:, None] >= truth[None, :, 0]) & (cx[:, None] < truth[None, :, 2])
              & (cy[:, None] >= truth[None, :, 1]) & (cy[:, None] < truth[None, :, 3]))
    return iou, inside


def _labels(iou: np.ndarray, inside: np.ndarray) -> np.ndarray:
    return np.where((iou >= 0.5).any(1), 1, np.where(inside.any(1), -1, 0))


def covers(props: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per proposal: 1 when its IoU with a target is >= 0.5 (positive), -1 when it only has its centre
    in a target's box (a piece of it, or a box around more: left out of the loss), else 0; and per
    target whether a proposal has IoU >= 0.5 with it."""
    if not len(props) or not len(truth):
        return np.zeros(len(props), np.int64), np.zeros(len(truth), bool)
    iou, inside = _overlaps(props, truth)
    return _labels(iou, inside), (iou >= 0.5).any(0)


PROPOSAL_RULES = ("fewest", "richest")


def choose_proposals(rasters: list[str], truth: list, names: list[str], opts, base: dict,
                     pfas: tuple[float, ...] = PFAS, rule: str = "fewest") -> tuple[dict, list[dict]]:
    """The CFAR settings whose proposals cover the training targets (see the module docstring):
    each of ``WINDOWS`` x ``pfas`` within the budget of ``MAX_PER_TARGET`` proposals per target;
    ``rule`` fewest: among those within ``COVER`` of the best coverage, the fewest proposals;
    richest: among those with the best coverage, the most proposals (the highest pfa within the
    budget: a margin for targets the training area does not show, e.g. ships touching)."""
    if rule not in PROPOSAL_RULES:
        raise FinetuneError(f"proposal rule '{rule}': use one of {', '.join(PROPOSAL_RULES)}")
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
    chosen = pick_setting(tried, n_true, rule)
    return {**base, **{k: chosen[k] for k in ("guard", "background", "pfa")}, "k_sigma": None,
            "score_threshold": 0.0}, tried


def pick_setting(tried: list[dict], n_true: int, rule: str) -> dict:
    """Of the ``tried`` settings (coverage, proposals, pfa), the one ``rule`` picks (``choose_proposals``)."""
    fine = [t for t in tried if t["proposals"] <= MAX_PER_TARGET * max(n_true, 1)] or tried[-1:]
    best = max(t["coverage"] for t in fine)
    if rule == "fewest":
        return min((t for t in fine if t["coverage"] >= COVER * best), key=lambda t: (t["proposals"], t["pfa"]))
    return max((t for t in fine if t["coverage"] >= best), key=lambda t: (t["proposals"], t["pfa"]))


def jittered(truth: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` copies of each box (n, 4): centre moved by N(0, 0.1 size), sides scaled by exp(N(0, 0.2))."""
    b = np.repeat(truth, k, 0)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx = (b[:, 0] + b[:, 2]) / 2 + rng.normal(0, 0.1, len(b)) * w
    cy = (b[:, 1] + b[:, 3]) / 2 + rng.normal(0, 0.1, len(b)) * h
    w, h = w * np.exp(rng.normal(0, 0.2, len(b))), h * np.exp(rng.normal(0, 0.2, len(b)))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def build_samples(rasters: list[str], truth: list, props: list, head, opts, seed: int,
                  floor: float | None = None) -> dict:
    """Chips, geometry, score targets (``quality`` of a box's IoU with its target: 0 below 0.5, so
    pieces of a target and boxes around more are negatives, and of two boxes of one target the
    better-fitting scores higher, which NMS keeps) and box deltas to the best-overlapping target (``reg`` 1 where
    the IoU is >= ``REG_IOU``), of the proposals and the jittered labelled boxes."""
    from engine.cfar import CfarConfig
    from engine.cfar.chips import chip_geometry, chip_sides, scorer_chips
    from engine.cfar.scene import source_units
    from engine.models.chip_scorer import box_deltas
    from engine.reader import SarRaster
    from engine.tasks.cfar_scored import pairwise_iou

    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"chips": [], "geometry": [], "y": [], "deltas": [], "reg": []}
    cfg = CfarConfig(input_units=opts.input_units)
    for r, (tb, _), (pb, _, _) in zip(rasters, truth, props):
        label, match, q = matches(pb, tb)
        jit = jittered(tb, JITTER, rng)
        boxes = np.concatenate([pb, jit])
        target = np.concatenate([tb[np.maximum(match, 0)] if len(tb) else np.zeros((len(pb), 4)),
                                 np.repeat(tb, JITTER, 0)])
        qj = pairwise_iou(jit, np.repeat(tb, JITTER, 0)) if len(jit) else np.zeros(0)
        reg = np.concatenate([q >= REG_IOU, np.ones(len(jit), bool)])
        sides = chip_sides(boxes)
        with SarRaster.open(r, opts.bands, opts.complex_mode) as src:
            units = source_units(src, cfg, [])
            chips = scorer_chips(src, units, boxes, head, Path(r).name, bool(opts.input_units))
        parts["chips"].append(chips)
        parts["geometry"].append(chip_geometry(boxes, sides))
        parts["y"].append(np.concatenate([quality(np.where(label > 0, q, 0.0), floor),
                                          quality(qj, floor)]).astype(np.float32))
        parts["deltas"].append(box_deltas(boxes, target, sides))
        parts["reg"].append(reg.astype(np.float32))
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}


def quality(iou: np.ndarray, floor: float | None = None) -> np.ndarray:
    """The score target of a box of IoU ``iou`` with its target: 0 below 0.5; from 0.5 up, IoU /
    ``FULL_IOU`` capped at 1, or with ``floor`` a line from ``floor`` at IoU 0.5 to 1 at ``FULL_IOU``."""
    if floor is None:
        return np.where(iou >= 0.5, np.minimum(iou / FULL_IOU, 1.0), 0.0)
    return np.where(iou >= 0.5, floor + (1 - floor) * np.clip((iou - 0.5) / (FULL_IOU - 0.5), 0, 1), 0.0)


def matches(props: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per proposal: ``covers``' label, the index of its target (the best IoU when >= 0.1, else the
    target holding its centre; -1: none) and its best IoU."""
    if not len(props) or not len(truth):
        return np.zeros(len(props), np.int64), np.full(len(props), -1, np.int64), np.zeros(len(props))
    iou, inside = _overlaps(props, truth)
    match = np.where(iou.max(1) >= 0.1, iou.argmax(1), np.where(inside.any(1), inside.argmax(1), -1))
    return _labels(iou, inside), match, iou.max(1)


def augment(chips: torch.Tensor, geometry: torch.Tensor, deltas: torch.Tensor):
    """One random flip / quarter turn for the batch (a quarter turn swaps width and height), contrast
    jitter; the box deltas (dx, dy, log w, log h) follow the chip."""
    if torch.rand(()) < 0.5:
        chips, deltas = chips.flip(-1), deltas * torch.tensor([-1.0, 1.0, 1.0, 1.0])
    if torch.rand(()) < 0.5:
        chips, deltas = chips.flip(-2), deltas * torch.tensor([1.0, -1.0, 1.0, 1.0])
    if torch.rand(()) < 0.5:  # counter-clockwise: a point at column offset dx moves to row offset -dx
        chips, geometry = torch.rot90(chips, 1, (-2, -1)), geometry[:, [1, 0, 2]]
        deltas = torch.stack([deltas[:, 1], -deltas[:, 0], deltas[:, 3], deltas[:, 2]], 1)
    gain = torch.ones(len(chips), chips.shape[1], 1, 1)
    gain[:, :1].uniform_(0.8, 1.25)  # the intensity channel only (not a box channel)
    return chips * gain, geometry, deltas


DELTA_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the deltas' scale in the box loss (torchvision's Faster R-CNN's)


def losses(model, c, g, d, y, reg):
    """BCE on the logit, plus smooth-L1 on the weighted deltas of the rows with a target."""
    out = model(c, g)
    logit, pred = out if isinstance(out, tuple) else (out, None)
    loss = F.binary_cross_entropy_with_logits(logit[:, 0], y)
    if pred is not None and reg.sum() > 0:
        w = torch.tensor(DELTA_WEIGHTS)
        per = F.smooth_l1_loss(pred * w, d * w, beta=1 / 9, reduction="none").sum(1)
        loss = loss + (per * reg).sum() / reg.sum()
    return loss


def train_scorer(data: dict, cfg: FinetuneConfig, head, progress: Callable[[dict], None] | None, t0: float):
    """The chip scorer fitted on ``data`` (see the module docstring); its loss history."""
    from engine.models.chip_scorer import ChipScorer

    model = ChipScorer(head)
    n = len(data["y"])
    bs = max(1, min(cfg.batch_size, n))
    reps = -(-EPOCH_SAMPLES // n) if n < EPOCH_SAMPLES else 1
    steps = max(1, cfg.epochs * ((n * reps) // bs))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr or 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr or 2e-3, total_steps=steps, pct_start=0.1)
    history, step = [], 0
    for epoch in range(cfg.epochs):
        model.train()
        order, total = torch.cat([torch.randperm(n) for _ in range(reps)]), 0.0
        for i in range(0, n * reps - bs + 1, bs):
            idx = order[i:i + bs]
            c, g, d = data["chips"][idx], data["geometry"][idx], data["deltas"][idx]
            if cfg.augment:
                c, g, d = augment(c, g, d)
            loss = losses(model, c, g, d, data["y"][idx], data["reg"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step() if step < steps - 1 else None
            step, total = step + 1, total + loss.item() * len(idx)
        elapsed = time.time() - t0
        history.append({"epoch": epoch + 1, "loss": total / max(n * reps, 1), "seconds": round(elapsed, 1)})
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


def training_threshold(model, rasters: list[str], truth: list, props: list, head, opts) -> float:
    """The probability with the best F1 (IoU >= 0.5) of the whole detector on the training rasters
    (every proposal scored, NMS as inference): the operating point, not 0.5, because the jittered
    positives shift the scorer's prior."""
    from engine.cfar import CfarConfig
    from engine.cfar.chips import scorer_chips
    from engine.cfar.objects import nms
    from engine.cfar.scene import source_units
    from engine.reader import SarRaster

    from ..cfar_baseline import best_f1_threshold

    preds = []
    for r, (pb, _, pc) in zip(rasters, props):
        with SarRaster.open(r, opts.bands, opts.complex_mode) as src:
            units = source_units(src, CfarConfig(input_units=opts.input_units), [])
            chips = scorer_chips(src, units, pb, head, Path(r).name, bool(opts.input_units))
            width, height = src.width, src.height
        pb, p = scored(model, pb, chips, width, height)
        k = np.sort(nms(pb, p, 0.5))
        preds.append((pb[k], p[k], pc[k]))
    return float(min(max(best_f1_threshold(preds, truth), 0.05), 0.95))


def scored(model, boxes: np.ndarray, chips: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The boxes (refined when the model has a box branch) and their probabilities, as inference."""
    from engine.cfar.chips import chip_geometry, chip_sides
    from engine.tasks.cfar_scored import probabilities, refine_boxes

    if not len(boxes):
        return boxes, np.zeros(0)
    sides = chip_sides(boxes)
    with torch.no_grad():
        out = model(torch.from_numpy(chips), torch.from_numpy(chip_geometry(boxes, sides)))
    logit, deltas = out if isinstance(out, tuple) else (out, None)
    if deltas is not None:
        boxes = refine_boxes(boxes, deltas.numpy(), sides, width, height)
    return boxes, probabilities(logit.numpy())


def finetune_cfar_scored(rasters: list[str] | str, output: str | Path, cfg: FinetuneConfig, *, labels: str,
                         class_field: str, classes: list[str] | None = None,
                         progress: Callable[[dict], None] | None = None, overwrite: bool = False,
                         cfar_base: dict | None = None, pfas: tuple[float, ...] = PFAS, regress: bool = False,
                         box_channel: bool = False, quality_floor: float | None = None,
                         proposal_rule: str = "fewest", **_ignored) -> dict:
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
    base = {**CFAR_BASE, "levels_db": list(LEVELS_DB), **(cfar_base or {}), "class_name": names[0]}
    settings, tried = choose_proposals(rasters, truth, names, opts, base, pfas, proposal_rule)
    _, props, _ = cfar_boxes(rasters, settings, opts, names)
    head = ChipScorerConfig(regress=regress, box_channel=box_channel)
    data = build_samples(rasters, truth, props, head, opts, cfg.seed, quality_floor)
    model, history = train_scorer(data, cfg, head, progress, t0)
    threshold = training_threshold(model, rasters, truth, props, head, opts)
    card = cfar_scored_card(settings, head.to_dict(), names[0], threshold, Path(output).stem, provenance={
        "training": "CFAR proposals + chip scorer (training.finetune.cfar_scored)",
        "training_rasters": [Path(r).name for r in rasters], "labels": Path(labels).name,
        "cfar_pfa": settings["pfa"], "samples": int(len(data["y"])), "positives": int((data["y"] > 0).sum()),
        "epochs": len(history), "seed": cfg.seed})
    sd = {k: v for k, v in model.state_dict().items()}
    dest = save_package(sd, card, output, onnx_bytes=export_chip_scorer(model), overwrite=overwrite)
    return {"package": str(dest), "cfar": {k: settings[k] for k in ("pfa", "guard", "background", "min_area")},
            "cfar_tried": tried, "targets": int(sum(len(t[0]) for t in truth)),
            "proposals": int(sum(len(p[0]) for p in props)), "samples": int(len(data["y"])),
            "positives": int((data["y"] > 0).sum()), "epochs": len(history), "score_threshold": threshold,
            "final_loss": history[-1]["loss"] if history else None,
            "minutes": round((time.time() - t0) / 60, 3), "history": history}
