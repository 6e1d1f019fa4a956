"""Quick mode (``--mode head``): a light head fitted on FROZEN encoder features, the default when
labels are few; and the choice between it and a full fine-tune (``--mode auto``).

- Segmentation (``quick_segmenter``): ``LightSegmenter`` (engine/models/seg_light.py). The encoder
  runs ONCE per chip (its block maps are cached as float16, shared by every head fitted on them):
  a linear head by logistic regression on labelled cells (features and strength cross-validated by
  chip), and from ``QUICK_MLP_MIN_CHIPS`` training chips also a per-pixel MLP head (Adam, early
  stopping on the validation mean IoU); the better validation score stays.
- Classification: the ``ViTClassifier``'s pooled embedding (``--pool``) of every training chip in
  its 8 flips / 90-degree rotations (each with a random gain, ``cfg.gain_db``), standardised, into a class-balanced multinomial logistic
  regression (scikit-learn; its strength chosen on the validation chips); the fitted scaler and
  coefficients are folded into the classifier's linear head.
Either way the result is an ordinary package (same model classes) that ``sarmae infer``, ONNX
export and the plugin run unchanged; a full fine-tune may start from it (linear probe, then
fine-tune).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

from .common import FinetuneError, History, chip_jitter, fit, model_input, validation_report
from .config import FinetuneConfig

log = logging.getLogger("sarmae.finetune")

HEAD_LR = 1e-3  # the head starts from random weights: AdamW at 1e-3 (no layer decay: the encoder is frozen)
HEAD_STEPS = 400  # optimiser steps the head mode aims for (early stopping may end sooner)
# auto: with fewer training chips than this, a full fine-tune is not tried (it overfits a handful of
# chips and costs minutes); above it, both run and the better validation score is kept
AUTO_FULL_MIN_CHIPS = {"segment": 48, "classify": 200}
QUICK_MLP_MIN_CHIPS = 24  # segmentation: from this many training chips, an MLP head is fitted beside the linear one
# segmentation: with fewer training chips than this, the validation chips hold labels training cannot
# spare (4 polygons: 2 of 5 labelled blocks held out, a class left in one chip); once scored, the
# linear head is fitted again on every labelled chip (the chips of the Sen1Floods11 few-polygon case)
QUICK_REFIT_MAX_CHIPS = 12


def resolve_mode(cfg: FinetuneConfig, task: str, n_train: int) -> tuple[str, str]:
    """("head" | "full" | "auto", why) for ``cfg.mode`` and the number of training chips."""
    if cfg.mode not in ("auto", "head", "full"):
        raise FinetuneError(f"--mode '{cfg.mode}': use head (quick: a light head on the frozen encoder), full "
                            "(fine-tune the whole model) or auto (chosen by the number of labels)")
    if cfg.linear_probe and cfg.mode == "auto":
        return "full", "--linear-probe trains the task head by gradient descent on the frozen encoder"
    if cfg.mode != "auto":
        return cfg.mode, f"mode {cfg.mode} as asked"
    need = AUTO_FULL_MIN_CHIPS[task]
    if n_train < need:
        return "head", (f"{n_train} training chips (< {need}): quick mode on the frozen encoder; a full fine-tune "
                        "would overfit so few labels")
    return "auto", (f"{n_train} training chips (>= {need}): quick mode first, then a full fine-tune from it; the "
                    "better validation score is kept")


def head_config(cfg: FinetuneConfig, steps_per_epoch: int) -> FinetuneConfig:
    """``cfg`` for fitting a head on cached features: frozen encoder, HEAD_LR, about HEAD_STEPS steps."""
    epochs = int(min(200, max(10, math.ceil(HEAD_STEPS / max(1, steps_per_epoch)))))
    return dataclasses.replace(cfg, linear_probe=True, freeze_epochs=0, lr=cfg.lr or HEAD_LR, layer_decay=1.0,
                               epochs=epochs, warmup_epochs=min(cfg.warmup_epochs, 0.05 * epochs),
                               patience=max(cfg.patience, epochs // 4), weight_decay=1e-4)


@torch.no_grad()
def encode(model, x: torch.Tensor, device: str, batch: int = 32) -> list[torch.Tensor]:
    """The frozen encoder's block maps of every chip, float16 on the CPU: one tensor per block."""
    model.eval()
    parts = [model.features(x[i:i + batch].float().to(device)) for i in range(0, len(x), batch)]
    return [torch.cat([p[j].half().cpu() for p in parts]) for j in range(len(parts[0]))]


@torch.no_grad()
def predict_cached(model, cache: list[torch.Tensor], x: torch.Tensor, idx: np.ndarray, device: str,
                   batch: int = 32) -> np.ndarray:
    """(len(idx), S, S) int64 classes of chips ``idx`` from their cached encoder maps (no encoder run)."""
    model.eval()
    out = [model.decode([c[idx[i:i + batch]].to(device) for c in cache], x[idx[i:i + batch]].float().to(device))
           .argmax(1).cpu() for i in range(0, len(idx), batch)]
    return torch.cat(out).numpy()


def fit_segment_head(model, chips, tr: np.ndarray, va: np.ndarray, cfg: FinetuneConfig, device: str, loss_fn,
                     evaluate_pred, progress=None, cache: list[torch.Tensor] | None = None) -> History:
    """Fit ``model``'s light head by Adam on the encoder maps of the chips, ``cache`` (``encode`` of
    every chip; made here when not given).

    loss_fn(logits, target) -> loss; evaluate_pred(pred (N, S, S) int64 numpy) -> metrics of the val chips."""
    model.fit_pixel_standardisation(chips.x[tr[: min(len(tr), 256)]])
    cache = cache if cache is not None else encode(model, chips.x, device)
    bs = min(cfg.batch_size, len(tr))
    loader = torch.utils.data.DataLoader(torch.from_numpy(tr), batch_size=bs, shuffle=True,
                                         drop_last=len(tr) >= 2 * bs, generator=torch.Generator().manual_seed(cfg.seed))
    hcfg = head_config(cfg, len(loader))

    def decode(m, idx) -> torch.Tensor:
        return m.decode([c[idx].to(device) for c in cache], chips.x[idx].float().to(device))

    def train_step(m, idx):
        return loss_fn(decode(m, idx), chips.masks[idx].long().to(device))

    def evaluate(m) -> dict:
        return evaluate_pred(predict_cached(m, cache, chips.x, va, device))

    log.info("quick mode: %d chips encoded once; fitting the light head (%d epochs at most, lr %.0e)",
             len(chips.x), hcfg.epochs, hcfg.peak_lr)
    return fit(model, train_step, evaluate, loader, hcfg, device, "mean_iou", progress)


def fold_logistic(lr, scaler, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted scikit-learn ``LogisticRegression`` on ``StandardScaler``-ed features as the weights
    (k, F) and biases (k,) of one linear layer on the RAW features, with the same softmax: a binary
    model's one logit difference becomes two logits; classes it never saw get a -1e4 bias (never
    predicted)."""
    coef, icpt = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:
        coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, icpt[0]])
    w, b = np.zeros((k, coef.shape[1])), np.full(k, -1e4)
    w[lr.classes_], b[lr.classes_] = coef, icpt
    w = w / scaler.scale_
    return w, b - w @ scaler.mean_


MAX_PIXELS = 40_000  # labelled cells sampled for the logistic fit (per chip evenly, seeded)
CV_CELLS = 8_000  # cells the cross-validated choice is made on
TIE = 0.005  # cross-validated scores this close count as a tie: the simpler candidate is kept


@torch.no_grad()
def _cell_samples(model, cache: list[torch.Tensor], chips, idx: np.ndarray, device: str, per_chip: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (n, D x blocks + F), labels and chip index of labelled stride cells of chips ``idx``."""
    import torch.nn.functional as F

    from .labels import IGNORE

    s = model.cfg.stride
    xs, ys, gs = [], [], []
    for i in idx:
        sel = torch.tensor([int(i)])  # one chip at a time: its cells at full feature width fit in memory
        t, f = model.cell_features([c[sel].to(device) for c in cache], chips.x[sel].float().to(device))
        t = F.interpolate(t, size=f.shape[-2:], mode="bilinear", align_corners=False)
        y = chips.masks[int(i)][s // 2::s, s // 2::s][: f.shape[-2], : f.shape[-1]].numpy()
        ok = np.flatnonzero(y.ravel() != IGNORE)
        if not len(ok):
            continue
        ok = rng.permutation(ok)[:per_chip]
        feats = torch.cat([t, f], 1)[0].flatten(1).T.cpu().numpy()
        xs.append(feats[ok])
        ys.append(y.ravel()[ok].astype(np.int64))
        gs.append(np.full(len(ok), int(i)))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)


def simplest_within_noise(cands: list, cv: dict, fold_scores: dict):
    """The first (simplest, most regularised) candidate whose cross-validated score is within the
    noise of the best one's: its mean deficit on the same folds is at most one standard error of the
    per-fold differences (the one-standard-error rule, paired by fold), or ``TIE``. With a handful of
    labelled chips the folds disagree, and a richer candidate must win on more than noise: shifting one
    of 4 drawn polygons by 0.65 px gave the encoder's features with C=1 a lead of 0.015 (1.000 against
    0.985 over 4 folds) and the plain choice of the best took them: the map lost 0.18 water IoU."""
    top = max(cands, key=lambda k: cv[k])
    for k in cands:
        diff = np.asarray(fold_scores[top]) - np.asarray(fold_scores[k])
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
        if cv[k] >= cv[top] - max(TIE, se):
            return k
    return top


def fit_segment_linear(model, chips, tr: np.ndarray, cfg: FinetuneConfig, device: str, k: int,
                       cache: list[torch.Tensor]) -> dict:
    """Fit a linear light head (``hidden`` 0) by class-balanced logistic regression on labelled cells
    of the training chips. The features (the SAR pixel features alone, or with the frozen encoder's
    maps) and the strength are chosen by cross-validation grouped by chip (each fold scored on chips
    it never saw; ties go to the simpler candidate, so an encoder whose maps do not help on these
    labels is left out, e.g. a random one); the scaler and coefficients are folded into
    ``token_proj`` / ``pixel_proj``. ``cache``: ``encode`` of every chip. Returns the choice and its CV score."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler

    model.fit_pixel_standardisation(chips.x[tr[: min(len(tr), 256)]])
    rng = np.random.default_rng(cfg.seed)
    X, y, g = _cell_samples(model, cache, chips, tr, device, max(200, MAX_PIXELS // len(tr)), rng)
    classes = np.unique(y)
    if len(classes) < 2:
        raise FinetuneError(f"the training chips hold labelled pixels of one class only ({classes.tolist()}): the "
                            "quick mode needs two; label another class")
    n_tok = model.token_proj.in_channels
    folds = min(4, len(np.unique(g)))
    # candidates, simplest first: the SAR pixel features alone, then with the encoder's maps; each
    # with a strength C; ties (within the folds' noise: simplest_within_noise) go to the simpler, more
    # regularised candidate
    cands = [(feats, c) for feats in ("pixel", "pixel+encoder") for c in (0.001, 0.01, 0.1, 1.0)]
    cv: dict[tuple[str, float], float] = {}
    fold_scores: dict[tuple[str, float], list[float]] = {}

    def cols(feats: str) -> slice:
        return slice(n_tok, None) if feats == "pixel" else slice(0, None)

    sub = rng.permutation(len(y))[:CV_CELLS]  # the choice is made on a sample; the final fit uses every cell
    Xs, ys, gs = X[sub], y[sub], g[sub]
    if folds >= 2:
        for feats, c in cands:
            accs = []
            for a, b in GroupKFold(n_splits=folds).split(Xs, ys, gs):
                if len(np.unique(ys[a])) < 2:
                    continue
                sc = StandardScaler().fit(Xs[a][:, cols(feats)])
                with warnings.catch_warnings():  # a fold's fit may stop short of full convergence: fine for ranking
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=300).fit(
                        sc.transform(Xs[a][:, cols(feats)]), ys[a])
                    pred = lr.predict(sc.transform(Xs[b][:, cols(feats)]))  # balanced accuracy on the held-out chips
                    warnings.simplefilter("ignore", UserWarning)  # a class predicted that the held-out chips lack
                    accs.append(balanced_accuracy_score(ys[b], pred))
            cv[(feats, c)] = float(np.mean(accs)) if accs else float("nan")
            fold_scores[(feats, c)] = accs
    scored = [k for k in cands if np.isfinite(cv.get(k, np.nan))]
    feats, best = simplest_within_noise(scored, cv, fold_scores) if scored else ("pixel", 0.01)
    use = cols(feats)
    scaler = StandardScaler().fit(X[:, use])
    lr = LogisticRegression(C=best, class_weight="balanced", max_iter=1000).fit(scaler.transform(X[:, use]), y)
    w, b = fold_logistic(lr, scaler, k)
    if feats == "pixel":  # the encoder's maps get zero weight
        w = np.concatenate([np.zeros((k, n_tok)), w], 1)
    with torch.no_grad():
        model.token_proj.weight.copy_(torch.from_numpy(w[:, :n_tok]).float().view(k, n_tok, 1, 1))
        model.token_proj.bias.copy_(torch.from_numpy(b).float())
        model.pixel_proj.weight.copy_(torch.from_numpy(w[:, n_tok:]).float().view(k, -1, 1, 1))
        model.pixel_proj.bias.zero_()
    log.info("quick mode: logistic regression on %d labelled cells of %d chips, features %s, C=%g (cross-validated "
             "by chip, balanced accuracy %s)", len(y), len(tr), feats, best,
             ", ".join(f"{f} C={c:g}: {v:.3f}" for (f, c), v in cv.items()) or "n/a: fewer than 2 chips")
    return {"C": best, "features": feats, "cv_balanced_accuracy": cv.get((feats, best)), "cv_folds": folds,
            "cells": int(len(y))}


@torch.no_grad()
def pooled_features(model, x: torch.Tensor, device: str, views: bool, contract: dict,
                    cfg: FinetuneConfig | None = None, batch: int = 64) -> np.ndarray:
    """(N, C, S, S) chips -> (N * V, D) pooled embeddings (one view each: ``view_features``): V = 8
    dihedral views (flips and 90-degree rotations, view-major, ``engine.models.heads.dihedral``) when
    ``views``, each with a random gain (``chip_jitter``: ``cfg.gain_db``, or random acquisition shifts
    with ``cfg.acquisition``) when ``cfg`` is given; else 1 view as it is; then the contract's
    standardisation (``model_input``)."""
    from engine.models.heads import dihedral

    model.eval()
    out = []
    for k in range(8 if views else 1):
        for i in range(0, len(x), batch):
            xb = dihedral(x[i:i + batch].float(), k)
            if views and cfg is not None:
                xb = chip_jitter(xb, contract, cfg)
            out.append(model.view_features(model_input(xb, contract).to(device)).cpu())
    return torch.cat(out).numpy().astype(np.float64)


def fit_classify_head(model, x: torch.Tensor, y: np.ndarray, tr: np.ndarray, va: np.ndarray, cfg: FinetuneConfig,
                      device: str, classes: list[str], contract: dict) -> dict:
    """Fit ``model.head`` (a ViTClassifier's linear layer) by logistic regression on frozen pooled
    embeddings (see the module docstring); returns {"C", "val_accuracy", "train_accuracy"}, and when the
    validation chips are too few to trust (``validation_report``) the cross-validation by chip
    (``classify_cv``: "cv_balanced_accuracy", "cv_folds")."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    views = cfg.augment
    f_tr = pooled_features(model, x[tr], device, views, contract, cfg)
    y_tr = np.tile(y[tr], 8 if views else 1)
    f_va = pooled_features(model, x[va], device, False, contract)
    # with views, the head is also scored on the mean of each validation chip's 8 views (no jitter):
    # the classifier's ``views`` 8, kept when validation says so (see ``choose_views``)
    f_va8 = pooled_features(model, x[va], device, True, contract).reshape(8, len(va), -1).mean(0) if views else None
    scaler = StandardScaler().fit(f_tr)
    z_tr, z_va = scaler.transform(f_tr), scaler.transform(f_va)
    z_va8 = None if f_va8 is None else scaler.transform(f_va8)
    best = None
    for c in (0.01, 0.03, 0.1, 0.3, 1.0):  # inverse regularisation strength, chosen on the validation chips
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=cfg.seed).fit(z_tr, y_tr)
        acc = float((lr.predict(z_va) == y[va]).mean()) if len(va) else float(lr.score(z_tr, y_tr))
        acc8 = float((lr.predict(z_va8) == y[va]).mean()) if z_va8 is not None and len(va) else None
        n_views, why = choose_views(acc, acc8, views, len(va))
        score = acc8 if n_views == 8 and acc8 is not None else acc
        if best is None or score > best[0]:
            best = (score, c, lr, n_views, why, acc, acc8)
    score, c, lr, n_views, why, acc1, acc8 = best
    w, b = fold_logistic(lr, scaler, len(classes))
    head: nn.Linear = model.head
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w).float())
        head.bias.copy_(torch.from_numpy(b).float())
    model.views = n_views
    log.info("quick mode: logistic regression on %d frozen embeddings (%s), C=%g: validation accuracy %.3f; %s",
             len(f_tr), "8 views per chip" if views else "1 view", c, score, why)
    out = {"C": c, "val_accuracy": score, "train_accuracy": float(lr.score(z_tr, y_tr)), "views": n_views,
           "views_reason": why, "val_accuracy_1_view": acc1,
           **({"val_accuracy_8_views": acc8} if acc8 is not None else {})}
    if not validation_report(classes, y[va], len(va), unit="chip")["reliable"]:  # a weak split: CV says more
        out.update(classify_cv(z_tr, y_tr, len(tr), c, cfg.seed))
    return out


def choose_views(acc1: float, acc8: float | None, augmented: bool, n_val: int) -> tuple[int, str]:
    """The quick classifier's ``views`` (1, or 8: the mean over each chip's flips / rotations) and why.
    With the head fitted on 8 views of each chip (``augmented``), validation decides: 8 when it scores
    higher than 1 view (a tie keeps 1, 8 times cheaper); without validation chips, 8 (MSTAR 40-shot
    validation, 3 seeds: 90.4 / 91.2 / 89.4 against 85.0 / 82.6 / 83.9 %%, README). Without augmentation
    (the plain probe), 1."""
    if not augmented:
        return 1, "1 view (no flipped / rotated views in training)"
    if acc8 is None or not n_val:
        return 8, ("the mean over 8 views (flips / 90-degree rotations) of each chip: no validation chips to "
                   "choose by; it is the better on MSTAR validation")
    if acc8 > acc1:
        return 8, (f"the mean over 8 views (flips / 90-degree rotations) of each chip: validation accuracy "
                   f"{acc8:.3f} against {acc1:.3f} for 1 view")
    return 1, f"1 view: validation accuracy {acc1:.3f}, not below the 8 views' mean ({acc8:.3f}), at 1/8 the cost"


def classify_cv(z: np.ndarray, y: np.ndarray, n_chips: int, c: float, seed: int) -> dict:
    """Cross-validation of the quick classification head over the training chips, grouped by chip
    (a chip's views stay in one fold; ``z`` is view-major, as ``pooled_features`` gives it):
    balanced accuracy of the out-of-fold predictions at strength ``c``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    folds = min(5, n_chips)
    pred = np.full(len(y), -1)
    if folds >= 2:
        groups = np.tile(np.arange(n_chips), len(y) // n_chips)
        for a, b in GroupKFold(n_splits=folds).split(z, y, groups):
            if len(np.unique(y[a])) >= 2:
                lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
                pred[b] = lr.fit(z[a], y[a]).predict(z[b])
    from sklearn.metrics import balanced_accuracy_score

    done = pred >= 0
    score = float(balanced_accuracy_score(y[done], pred[done])) if done.any() else None
    log.info("quick mode: cross-validation over %d training chips (%d folds by chip): balanced accuracy %s",
             n_chips, folds, "n/a" if score is None else f"{score:.3f}")
    return {"cv_balanced_accuracy": score, "cv_folds": folds}


def full_after_quick(model, quick: History | None, train_step, evaluate, loader, cfg: FinetuneConfig, t0: float,
                     device: str, metric: str, progress=None) -> tuple[History, str, str]:
    """The full fine-tune (whole model, from the quick head when there is one: linear probe, then
    fine-tune), within what is left of ``cfg.max_minutes`` since ``t0``; when a quick head came first
    and the full fine-tune does not beat its validation score, the quick weights are put back.
    Returns (history kept, "head" | "full", a sentence saying what was kept, or "")."""
    import copy

    from .common import remaining

    saved = (quick.best_score, copy.deepcopy(model.state_dict())) if quick is not None else None
    model.encoder.requires_grad_(True)
    full = fit(model, train_step, evaluate, loader, remaining(cfg, t0), device, metric, progress)
    if saved is not None and full.best_score <= saved[0]:
        model.load_state_dict(saved[1])
        return quick, "head", (f"kept the quick head: validation {metric} {saved[0]:.3f} against {full.best_score:.3f} "
                               "after the full fine-tune")
    return full, "full", ""


def quick_segmenter(encoder, k: int, chips, tr: np.ndarray, va: np.ndarray, cfg: FinetuneConfig, device: str,
                    loss_fn, scores, t0: float, progress=None):
    """The quick segmentation mode (module docstring): the encoder runs once over every chip, then the
    linear head and (from ``QUICK_MLP_MIN_CHIPS`` training chips, with validation chips) the MLP head
    are fitted on those maps and scored on the cached validation maps.
    Returns (model, its LightSegHeadConfig, History, cross-validation record or None, log notes)."""
    from engine.models.registry import build_segmenter
    from engine.models.seg_light import LightSegHeadConfig

    from .common import budget_spent

    head = LightSegHeadConfig(hidden=0)
    model = build_segmenter(encoder, k, {"kind": "light", **head.to_dict()}).to(device)
    cache = encode(model, chips.x, device)
    cv = fit_segment_linear(model, chips, tr, cfg, device, k, cache)
    got = scores(predict_cached(model, cache, chips.x, va, device))
    hist = History(epochs=[0], train_loss=[float("nan")], val_score=[got["mean_iou"]], val_metrics=[got],
                   best_epoch=0, best_score=got["mean_iou"], stopped="quick mode: one logistic-regression fit")
    if progress is not None:
        progress({"epoch": 0, "epochs": 1, "train_loss": float("nan"), "mean_iou": got["mean_iou"],
                  "metric": "mean_iou", "best": got["mean_iou"], "elapsed_s": time.time() - t0, "eta_s": 0.0})
    notes = []
    if len(va) and len(tr) < QUICK_REFIT_MAX_CHIPS:  # a handful of polygons: none to spare
        every = np.concatenate([tr, va])
        cv = {**fit_segment_linear(model, chips, every, cfg, device, k, cache), "refit_chips": len(every)}
        notes.append(f"quick mode: {len(tr)} training chips: after validation, the linear head was fitted again on "
                     f"all {len(every)} labelled chips (the validation score is the head's fitted without the "
                     "validation chips; the cross-validation covers all of them)")
        return model, head, hist, cv, notes
    if len(tr) >= QUICK_MLP_MIN_CHIPS and len(va) and not budget_spent(cfg, t0):
        mlp_head = LightSegHeadConfig(hidden=64)
        mlp = build_segmenter(encoder, k, {"kind": "light", **mlp_head.to_dict()}).to(device)
        h2 = fit_segment_head(mlp, chips, tr, va, cfg, device, loss_fn, scores, progress, cache)  # same blocks
        keep = h2.best_score > hist.best_score
        notes.append(f"quick mode: the per-pixel MLP head scored validation mean IoU {h2.best_score:.3f}, the linear "
                     f"head {hist.best_score:.3f}: kept the {'MLP' if keep else 'linear'}")
        if keep:
            model, head, hist, cv = mlp, mlp_head, h2, None
    return model, head, hist, cv, notes

