"""The small CNN as a classification model of its own (``--arch cnn``), and the choice between it and
the ViT route that ``--mode auto`` makes on validation chips.

- ``train_cnn``: ``engine.models.small_cnn.SmallCNN`` from scratch on the chips (the same flips /
  rotations, gain jitter and per-chip standardisation as the ViT route; ``training.baselines.
  train_small_cnn``, the same function that trains the baseline row), its best validation epoch kept;
  its optimiser is that function's (AdamW 2e-3, one cycle, label smoothing 0.1): ``--lr``,
  ``--layer-decay`` and ``--warmup-epochs`` set the ViT route.
- ``robust_validation``: a model's validation accuracy on the chips as they are and under the
  simulated acquisition shifts of ``training.acquisition`` (gain, stretch, speckle, resolution,
  pose): what ``--mode auto`` compares, so that the model kept is the one that also holds on another
  sensor's or acquisition's chips, not only on more chips of the training collection.
- ``choose``: the candidate with the better score (the mean of the two accuracies); a tie within
  ``TIE`` goes to the smaller, faster network (the CNN).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .common import FinetuneError, History, chip_jitter, model_input
from .config import FinetuneConfig

log = logging.getLogger("sarmae.finetune")

CNN_ARCHS = ("cnn", "small_cnn")  # --arch values that select the small CNN
TIE = 0.005  # validation scores this close count as a tie: the CNN (smaller, faster on a CPU) is kept


def check_arch(cfg: FinetuneConfig) -> bool:
    """True when ``cfg.arch`` selects the small CNN; a sentence (FinetuneError) for an unknown
    architecture or settings the CNN cannot take."""
    from engine.models.registry import vit_names

    vits = vit_names()
    if cfg.arch not in (*CNN_ARCHS, *vits):
        raise FinetuneError(f"--arch '{cfg.arch}': use cnn (a small CNN trained from scratch, classify only) or a ViT "
                            f"size for a random encoder ({', '.join(vits)})")
    if cfg.arch not in CNN_ARCHS:
        return False
    if cfg.task != "classify":
        raise FinetuneError(f"--arch cnn is a chip classifier: it serves --task classify, not '{cfg.task}'")
    if cfg.encoder:
        raise FinetuneError(f"--arch cnn trains a small CNN from scratch and takes no --encoder ({cfg.encoder}); leave "
                            "--encoder out, or leave --arch out to fine-tune that encoder (--mode auto also tries the "
                            "CNN and keeps the better on validation)")
    if cfg.mode == "head" or cfg.linear_probe:
        raise FinetuneError("--arch cnn trains the whole network: --mode head and --linear-probe belong to a pretrained "
                            "encoder; leave them out")
    return True


def train_cnn(data, tr: np.ndarray, va: np.ndarray, cfg: FinetuneConfig, progress=None, max_minutes=None):
    """A ``SmallCNN`` trained on ``data`` (classify's chips in memory) with the ViT route's
    augmentations and input standardisation, within ``cfg.epochs`` and ``max_minutes`` (default
    ``cfg.max_minutes``). Returns (model, History, row: val_accuracy, epochs_run, minutes, parameters)."""
    from ..baselines import train_small_cnn
    from .classify import augment

    aug = (lambda b: chip_jitter(augment(b), data.contract, cfg)) if cfg.augment else None
    model, info = train_small_cnn(data.x, data.y, tr, va, epochs=cfg.epochs,
                                  max_minutes=cfg.max_minutes if max_minutes is None else max_minutes,
                                  batch_size=cfg.batch_size, seed=cfg.seed, augment=aug,
                                  prepare=lambda b: model_input(b, data.contract), num_classes=len(data.classes),
                                  progress=progress)
    n = info["epochs_run"]
    hist = History(epochs=list(range(n)), train_loss=info.pop("train_loss"), val_score=info.pop("val_curve"),
                   best_epoch=info["best_epoch"], best_score=info["val_accuracy"],
                   stopped=f"{n} epoch(s) of {cfg.epochs}" + (" (the time budget)" if n < cfg.epochs else ""))
    return model, hist, {"name": "small CNN", **info}


@torch.no_grad()
def robust_validation(model, data, va: np.ndarray, device: str = "cpu") -> dict:
    """{"clean", "shift mean", "score"} validation accuracy of ``model`` on chips ``va`` of ``data``: as
    they are, averaged over ``training.acquisition.DEFAULT_SHIFTS``, and the mean of the two."""
    from ..acquisition import DEFAULT_SHIFTS, accuracy_table, shifted_sets

    model.eval()
    x = data.x[va].float()
    probs = {}
    for name, xs in shifted_sets(x, data.contract, DEFAULT_SHIFTS, seed=0).items():
        probs[name] = torch.cat([model(model_input(xs[i:i + 128], data.contract).to(device)).cpu()
                                 for i in range(0, len(xs), 128)]).numpy()
    acc = accuracy_table(probs, data.y[va])
    return {"clean": acc["clean"], "shift mean": acc["shift mean"], "score": (acc["clean"] + acc["shift mean"]) / 2}


def choose(candidates: list[dict]) -> tuple[dict, str]:
    """The candidate kept (each {"name", "validation": robust_validation(...), ...}; the CNN named
    "small CNN") and why, in a sentence."""
    if not candidates:
        raise FinetuneError("no classification candidate was trained (the budget ran out first): raise --max-minutes")
    best = max(candidates, key=lambda c: c["validation"]["score"])
    cnn = next((c for c in candidates if c["name"] == "small CNN"), None)
    if cnn is not None and cnn is not best and cnn["validation"]["score"] >= best["validation"]["score"] - TIE:
        best = cnn
    rows = "; ".join(f"{c['name']} {100 * c['validation']['clean']:.1f} % as they are, "
                     f"{100 * c['validation']['shift mean']:.1f} % under simulated acquisition shifts"
                     for c in candidates)
    why = (f"kept the {best['name']}: validation accuracy {rows} (the mean of the two decides"
           + ("; a tie goes to the small CNN" if len(candidates) > 1 else "") + ")")
    return best, why
