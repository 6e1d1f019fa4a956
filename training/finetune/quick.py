"""Quick mode (``--mode head``): a light head fitted on FROZEN encoder features, the default when
labels are few; and the choice between it and a full fine-tune (``--mode auto``).

- Segmentation: ``LightSegmenter`` (engine/models/seg_light.py). The encoder runs ONCE per chip
  (its block maps are cached as float16); only the per-pixel head trains (Adam, a few hundred
  steps, early stopping on the validation mean IoU), so a few polygons give a package in seconds.
- Classification: the ``ViTClassifier``'s pooled, normalised embedding of every training chip in
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
import warnings

import numpy as np
import torch
import torch.nn as nn

from .common import FinetuneError, History, fit, gain_jitter
from .config import FinetuneConfig

log = logging.getLogger("sarmae.finetune")

HEAD_LR = 1e-3  # the head starts from random weights: AdamW at 1e-3 (no layer decay: the encoder is frozen)
HEAD_STEPS = 400  # optimiser steps the head mode aims for (early stopping may end sooner)
# auto: with fewer training chips than this, a full fine-tune is not tried (it overfits a handful of
# chips and costs minutes); above it, both run and the better validation score is kept
AUTO_FULL_MIN_CHIPS = {"segment": 48, "classify": 200}


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


def fit_segment_head(model, chips, tr: np.ndarray, va: np.ndarray, cfg: FinetuneConfig, device: str, loss_fn,
                     evaluate_pred, progress=None) -> History:
    """Fit ``model``'s light head on cached encoder maps of the chips (see the module docstring).

    loss_fn(logits, target) -> loss; evaluate_pred(pred (N, S, S) int64 numpy) -> metrics of the val chips."""
    model.fit_pixel_standardisation(chips.x[tr[: min(len(tr), 256)]])
    cache = encode(model, chips.x, device)
    bs = min(cfg.batch_size, len(tr))
    loader = torch.utils.data.DataLoader(torch.from_numpy(tr), batch_size=bs, shuffle=True,
                                         drop_last=len(tr) >= 2 * bs, generator=torch.Generator().manual_seed(cfg.seed))
    hcfg = head_config(cfg, len(loader))

    def decode(m, idx) -> torch.Tensor:
        return m.decode([c[idx].to(device) for c in cache], chips.x[idx].float().to(device))

    def train_step(m, idx):
        return loss_fn(decode(m, idx), chips.masks[idx].long().to(device))

    def evaluate(m) -> dict:
        pred = torch.cat([decode(m, torch.from_numpy(va[i:i + 32])).argmax(1).cpu() for i in range(0, len(va), 32)])
        return evaluate_pred(pred.numpy())

    log.info("quick mode: %d chips encoded once; fitting the light head (%d epochs at most, lr %.0e)",
             len(chips.x), hcfg.epochs, hcfg.peak_lr)
    return fit(model, train_step, evaluate, loader, hcfg, device, "mean_iou", progress)


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
        sel = torch.tensor([int(i)])
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


def fit_segment_linear(model, chips, tr: np.ndarray, cfg: FinetuneConfig, device: str, k: int) -> dict:
    """Fit a linear light head (``hidden`` 0) by class-balanced logistic regression on labelled cells
    of the training chips. The features (the SAR pixel features alone, or with the frozen encoder's
    maps) and the strength are chosen by cross-validation grouped by chip (each fold scored on chips
    it never saw; ties go to the simpler candidate, so an encoder whose maps do not help on these
    labels is left out, e.g. a random one); the scaler and coefficients are folded into
    ``token_proj`` / ``pixel_proj``. Returns the choice and its CV score."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler

    model.fit_pixel_standardisation(chips.x[tr[: min(len(tr), 256)]])
    cache = encode(model, chips.x[tr], device)
    rng = np.random.default_rng(cfg.seed)
    local = type("Sub", (), {"x": chips.x[tr], "masks": chips.masks[tr]})
    X, y, g = _cell_samples(model, cache, local, np.arange(len(tr)), device, max(200, MAX_PIXELS // len(tr)), rng)
    classes = np.unique(y)
    if len(classes) < 2:
        raise FinetuneError(f"the training chips hold labelled pixels of one class only ({classes.tolist()}): the "
                            "quick mode needs two; label another class")
    n_tok = model.token_proj.in_channels
    folds = min(4, len(np.unique(g)))
    # candidates, simplest first: the SAR pixel features alone, then with the encoder's maps; each
    # with a strength C; ties (within TIE) go to the simpler, more regularised candidate
    cands = [(feats, c) for feats in ("pixel", "pixel+encoder") for c in (0.001, 0.01, 0.1, 1.0)]
    cv: dict[tuple[str, float], float] = {}

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
                accs.append(np.mean([(pred[ys[b] == j] == j).mean() for j in np.unique(ys[b])]))
            cv[(feats, c)] = float(np.mean(accs)) if accs else float("nan")
    scored = [k for k in cands if np.isfinite(cv.get(k, np.nan))]
    top = max((cv[k] for k in scored), default=None)
    feats, best = next((k for k in scored if cv[k] >= top - TIE), ("pixel", 0.01))
    use = cols(feats)
    scaler = StandardScaler().fit(X[:, use])
    lr = LogisticRegression(C=best, class_weight="balanced", max_iter=1000).fit(scaler.transform(X[:, use]), y)
    coef, icpt = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # binary: one logit difference -> two logits with the same softmax
        coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, icpt[0]])
    w, b = np.zeros((k, coef.shape[1])), np.full(k, -1e4)  # classes never labelled: never predicted
    w[lr.classes_], b[lr.classes_] = coef, icpt
    w = w / scaler.scale_
    b = b - w @ scaler.mean_
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
def pooled_features(model, x: torch.Tensor, device: str, views: bool, contract: dict | None = None,
                    gain_db: float = 0.0, batch: int = 64) -> np.ndarray:
    """(N, C, S, S) chips -> (N * V, D) pooled embeddings: V = 8 dihedral views (flips and 90-degree
    rotations, view-major), each with a random gain within +-``gain_db`` dB (``gain_jitter``), when
    ``views``, else 1 view as it is."""
    model.eval()
    out = []
    for k in range(8 if views else 1):
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].float()
            if views:
                xb = gain_jitter(torch.rot90(xb.flip(-1) if k >= 4 else xb, k % 4, (-2, -1)), contract, gain_db)
            out.append(model.forward_features(xb.to(device)).cpu())
    return torch.cat(out).numpy().astype(np.float64)


def fit_classify_head(model, x: torch.Tensor, y: np.ndarray, tr: np.ndarray, va: np.ndarray, cfg: FinetuneConfig,
                      device: str, classes: list[str], contract: dict) -> dict:
    """Fit ``model.head`` (a ViTClassifier's linear layer) by logistic regression on frozen pooled
    embeddings (see the module docstring); returns {"C", "val_accuracy", "train_accuracy"}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    views = cfg.augment
    f_tr = pooled_features(model, x[tr], device, views, contract, cfg.gain_db)
    y_tr = np.tile(y[tr], 8 if views else 1)
    f_va = pooled_features(model, x[va], device, False)
    scaler = StandardScaler().fit(f_tr)
    z_tr, z_va = scaler.transform(f_tr), scaler.transform(f_va)
    best = None
    for c in (0.01, 0.03, 0.1, 0.3, 1.0):  # inverse regularisation strength, chosen on the validation chips
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=cfg.seed).fit(z_tr, y_tr)
        acc = float((lr.predict(z_va) == y[va]).mean()) if len(va) else float(lr.score(z_tr, y_tr))
        if best is None or acc > best[0]:
            best = (acc, c, lr)
    acc, c, lr = best
    k = len(classes)
    coef, icpt = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # binary: one logit difference -> two logits with the same softmax
        coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, icpt[0]])
    full_w, full_b = np.zeros((k, coef.shape[1])), np.full(k, -1e4)  # classes never seen in training: never predicted
    full_w[lr.classes_], full_b[lr.classes_] = coef, icpt
    scale = scaler.scale_
    w = full_w / scale
    b = full_b - full_w @ (scaler.mean_ / scale)
    head: nn.Linear = model.head
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w).float())
        head.bias.copy_(torch.from_numpy(b).float())
    log.info("quick mode: logistic regression on %d frozen embeddings (%s), C=%g: validation accuracy %.3f",
             len(f_tr), "8 views per chip" if views else "1 view", c, acc)
    return {"C": c, "val_accuracy": acc, "train_accuracy": float(lr.score(z_tr, y_tr))}
