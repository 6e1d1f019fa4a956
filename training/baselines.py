"""Classical baselines, printed beside every model (CONVENTIONS 17): what an analyst gets on a CPU
without deep learning, fitted on the SAME training labels and scored on the SAME test data.

Segmentation (``SegBaselines``), on the model's normalised input (a monotonic map of the file's dB
or 8-bit values, so thresholds are the analyst's thresholds):
- ``threshold <band>``: the single threshold (and side) with the best mean IoU on the training
  pixels, per band (two classes only);
- ``Otsu <band>``: Otsu's threshold computed on each test scene itself (no labels; the side, i.e.
  which class is the dark one, from the training pixels), as flood mappers do per scene;
- ``random forest``: scikit-learn's forest (100 trees, balanced classes) on per-pixel features: the
  bands, their local mean and standard deviation over 3 / 7 / 15 px boxes and the band differences
  (``engine.models.seg_light.pixel_features``, the light head's own pixel branch).
Chip classification: ``small CNN`` (``engine.models.small_cnn.SmallCNN``, 0.55 M parameters, trained
from scratch on the same chips with the same budget and augmentations; the same network is a classify
package of its own, ``sarmae finetune --task classify --arch cnn``); the logistic regression on the frozen encoder's pooled
embedding is the quick mode itself (``finetune.quick``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine.models.small_cnn import SmallCNN  # the baseline and the --arch cnn package: one class

log = logging.getLogger("sarmae.baselines")

MAX_FOREST_PIXELS = 120_000  # training pixels drawn for the forest (stratified by class, seeded)
MAX_SCENE_PX = 64_000_000  # baselines read whole scenes: above this, crop (an evaluation area, not a country)


def pixel_feature_array(x: np.ndarray) -> np.ndarray:
    """(C, H, W) normalised input -> (F, H, W) float32: the light head's per-pixel features."""
    from engine.models.seg_light import pixel_features

    with torch.no_grad():
        return pixel_features(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None])[0].numpy()


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a sample (scikit-image), over its finite values."""
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values[np.isfinite(values)]))


def _binary_miou(pred: np.ndarray, true: np.ndarray) -> float:
    fg = (pred & true).sum() / max((pred | true).sum(), 1)
    bg = (~pred & ~true).sum() / max((~pred | ~true).sum(), 1)
    return float((fg + bg) / 2)


@dataclass
class SegBaselines:
    """Fitted segmentation baselines (see the module docstring); ``predict`` gives every row."""

    k: int
    band_names: list[str]
    thresholds: list[tuple[float, bool]] = field(default_factory=list)  # per band: (t, class 1 above t)
    dark_is_one: list[bool] = field(default_factory=list)  # per band: class 1 darker than class 0 (Otsu's side)
    forest: object = None

    @classmethod
    def fit(cls, xs: list[np.ndarray], ys: list[np.ndarray], k: int, band_names: list[str],
            seed: int = 0) -> SegBaselines:
        """xs: (C, H, W) normalised inputs; ys: (H, W) class index, < 0 or 255 = unlabelled."""
        from sklearn.ensemble import RandomForestClassifier

        rng = np.random.default_rng(seed)
        feats, labs = [], []
        for x, y in zip(xs, ys):
            ok = (y >= 0) & (y < k) & np.isfinite(x).all(0)
            f = pixel_feature_array(x)
            feats.append(f[:, ok].T)
            labs.append(y[ok].astype(np.int64))
        f_all, y_all = np.concatenate(feats), np.concatenate(labs)
        if len(np.unique(y_all)) < 2:
            raise ValueError("the training labels hold one class: baselines need two")
        out = cls(k, list(band_names))
        c = xs[0].shape[0]
        if k == 2:
            sub = rng.permutation(len(y_all))[:200_000]  # the natural class ratio (IoU depends on it)
            for b in range(c):  # the training pixels' bands are the first C features
                v, t1 = f_all[sub, b], y_all[sub] == 1
                grid = np.unique(np.percentile(v, np.linspace(0.5, 99.5, 199)))
                best = max(((t, up) for t in grid for up in (True, False)),
                           key=lambda tu: _binary_miou((v > tu[0]) if tu[1] else (v <= tu[0]), t1))
                out.thresholds.append((float(best[0]), bool(best[1])))
                out.dark_is_one.append(bool(v[t1].mean() < v[~t1].mean()))
        per = max(1, MAX_FOREST_PIXELS // k)
        take = np.concatenate([rng.permutation(np.flatnonzero(y_all == j))[:per] for j in range(k)])
        out.forest = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, class_weight="balanced", n_jobs=-1,
                                            random_state=seed).fit(f_all[take], y_all[take])
        return out

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """(C, H, W) normalised input -> {row name: (H, W) uint8 class index}."""
        rows: dict[str, np.ndarray] = {}
        for b, ((t, up), dark) in enumerate(zip(self.thresholds, self.dark_is_one)):
            name = self.band_names[b] if b < len(self.band_names) else f"band {b + 1}"
            v = x[b]
            rows[f"threshold {name}"] = ((v > t) if up else (v <= t)).astype(np.uint8)
            to = otsu_threshold(v.ravel())
            rows[f"Otsu {name}"] = ((v <= to) if dark else (v > to)).astype(np.uint8)
        f = pixel_feature_array(x)
        flat = f.reshape(f.shape[0], -1).T
        pred = np.zeros(flat.shape[0], np.uint8)
        ok = np.isfinite(flat).all(1)
        for i in range(0, len(flat), 500_000):  # bounded memory for the trees' outputs
            sl = slice(i, i + 500_000)
            sub = ok[sl]
            if sub.any():
                part = pred[sl]
                part[sub] = self.forest.predict(flat[sl][sub])
        rows["random forest"] = pred.reshape(x.shape[1:])
        return rows


def read_scene(path: str, contract: dict, bands: list | None = None, input_units: str | None = None,
               notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole raster through ``contract`` (as the engine feeds the model): (C, H, W) float32, valid."""
    from engine.errors import SarmaeError
    from engine.tiling import Window

    from .finetune.labels import open_input

    raster, rad, _ = open_input(path, contract, bands, input_units, notes if notes is not None else [])
    with raster:
        if raster.height * raster.width > MAX_SCENE_PX:
            raise SarmaeError(f"{path}: {raster.width}x{raster.height} px is too large for the baseline rows, which "
                              f"read the whole raster (at most {MAX_SCENE_PX // 1_000_000} Mpx): evaluate on a crop")
        x, valid = raster.read(Window(0, 0, raster.height, raster.width))
        return rad.apply(x, valid).astype(np.float32), valid


def train_small_cnn(x: torch.Tensor, y: np.ndarray, tr: np.ndarray, va: np.ndarray, *, epochs: int = 60,
                    max_minutes: float | None = None, batch_size: int = 32, seed: int = 0,
                    augment=None, prepare=None, num_classes: int | None = None,
                    progress=None) -> tuple[SmallCNN, dict]:
    """Train ``SmallCNN`` on chips ``x[tr]`` (AdamW 2e-3, cosine, label smoothing 0.1), keep the epoch
    with the best accuracy on ``x[va]``; stops at ``epochs`` or ``max_minutes``. ``augment``: a
    function on a training batch (the model's own flips / rotations, gains); ``prepare``: on every
    batch the model sees, after ``augment`` (the contract's standardisation, ``model_input``);
    ``progress``: called with each epoch's row (epoch, train loss, validation accuracy). The info
    returned holds the per-epoch ``train_loss`` and validation accuracy (``val_curve``) and the best epoch."""
    prep = prepare if prepare is not None else (lambda b: b)
    import copy

    torch.manual_seed(seed)
    k = num_classes or int(y.max()) + 1
    model = SmallCNN(x.shape[1], k)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    yt = torch.from_numpy(y)
    steps = max(1, math.ceil(len(tr) / batch_size)) * epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, t0, ran, best_epoch = -1.0, None, time.time(), 0, -1
    curves: dict[str, list[float]] = {"train_loss": [], "val_curve": []}

    def accuracy(idx: np.ndarray) -> float:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(prep(x[idx[i:i + 256]].float())).argmax(1) for i in range(0, len(idx), 256)])
        return float((pred.numpy() == y[idx]).mean())

    for _ in range(epochs):
        model.train()
        losses = []
        order = torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue
            xb = x[idx].float()
            xb = prep(augment(xb) if augment is not None else xb)
            loss = F.cross_entropy(model(xb), yt[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        ran += 1
        acc = accuracy(va) if len(va) else 0.0
        curves["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        curves["val_curve"].append(acc)
        if acc > best:
            best, best_state, best_epoch = acc, copy.deepcopy(model.state_dict()), ran - 1
        if progress is not None:
            progress({"epoch": ran - 1, "epochs": epochs, "train_loss": curves["train_loss"][-1], "accuracy": acc,
                      "metric": "accuracy", "best": best, "elapsed_s": time.time() - t0,
                      "eta_s": (time.time() - t0) / ran * (epochs - ran)})
        if max_minutes and time.time() - t0 > 60 * max_minutes:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {"val_accuracy": best, "epochs_run": ran, "minutes": round((time.time() - t0) / 60, 2),
                   "parameters": sum(p.numel() for p in model.parameters()), "best_epoch": best_epoch, **curves}


def training_reference(card, notes: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The training rasters of a segment package (its provenance) read through its input contract,
    with their training labels on each raster's grid: (xs, ys), ys with 255 = unlabelled."""
    from engine.errors import SarmaeError
    from engine.inference import InferenceOptions

    from .finetune.labels import rasterize_polygons
    from .reference import reference_raster, vector_reference

    prov, names = card.provenance or {}, card.class_names
    conf = prov.get("config") or {}
    rasters = prov.get("rasters") or []
    if not rasters or not (prov.get("label_raster") or prov.get("labels")):
        raise SarmaeError(f"{card.name}: its provenance names no training rasters and labels, so the baseline rows "
                          "cannot be fitted on the same labels; evaluate without --baselines")
    opts = InferenceOptions(bands=conf.get("bands"), input_units=conf.get("input_units"))
    xs, ys = [], []
    shapes = (vector_reference(rasters, prov["labels"], prov["class_field"], names, opts)[0]
              if not prov.get("label_raster") else None)
    for i, r in enumerate(rasters):
        x, valid = read_scene(r, card.input, opts.bands, opts.input_units, notes)
        y = (reference_raster(r, prov["label_raster"], names, opts)[0] if shapes is None
             else rasterize_polygons(*shapes[i], x.shape[1:]))
        xs.append(x)
        ys.append(np.where(valid, y, 255).astype(np.uint8))
    return xs, ys


def segment_rows(card, raster: str, ref: np.ndarray, ok: np.ndarray, opts, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Baseline rows for a segment evaluation: fitted on the package's training labels, predicted
    over ``raster`` (the processed region ``ref`` covers, from the top-left of ``opts.extent``),
    scored where ``ok``. Returns ([{"name", "iou", "mean_iou", "pixel_accuracy"}], notes)."""
    from .finetune.metrics import iou_metrics

    notes: list[str] = []
    xs, ys = training_reference(card, notes)
    names = card.class_names
    fitted = SegBaselines.fit(xs, ys, len(names), list(card.input.get("bands") or []), seed)
    x, valid = read_scene(raster, card.input, opts.bands, opts.input_units, notes)
    r0, c0 = (0, 0) if opts.extent is None else (max(int(opts.extent[0]), 0), max(int(opts.extent[1]), 0))
    x = x[:, r0:r0 + ref.shape[0], c0:c0 + ref.shape[1]]
    keep = ok & valid[r0:r0 + ref.shape[0], c0:c0 + ref.shape[1]]
    k, rows = len(names), []
    for name, pred in fitted.predict(x).items():
        cm = np.bincount(ref[keep].astype(np.int64) * k + pred[keep], minlength=k * k).reshape(k, k)
        m = iou_metrics(cm, names)
        rows.append({"name": name, "iou": m["iou"], "mean_iou": m["mean_iou"], "pixel_accuracy": m["pixel_accuracy"]})
    return rows, notes
