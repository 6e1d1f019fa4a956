"""Classification fine-tuning: ``finetune_classifier``, from ImageFolder-style chip folders (one
sub-folder per class) or from rasters with labelled polygons / a class raster.

Folder chips are scaled to [0, 1] by the pretraining data rule (training/data/scaling.py: 8-bit
/255, calibrated data -> dB -> clip -> [0, 1]), resized to the model input, normalised with the
encoder's mean/std, and cached in memory (small chip sets); validation: a stratified held-out
share of each class. Raster chips come from ``labels.build_chips`` (task "classify": centred
inside the polygons, read through the encoder's input contract, spatial block split). ``shots``
keeps N training chips per class (seeded). Output: a ``classify`` package (``sarmae infer`` writes
a grid of labelled windows) with metrics, training curves and the confusion matrix inside.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.card import check_standardise

from ..data.config import DataConfig
from .common import (
    FinetuneError,
    History,
    budget_spent,
    chip_jitter,
    class_colours,
    fit_batch,
    model_input,
    pick_device,
    remaining,
    save_task_package,
    start,
    validation_report,
)
from .config import FinetuneConfig
from .labels import build_chips, chip_provenance
from .metrics import classification_metrics
from .quick import fit_classify_head, full_after_quick, resolve_mode

log = logging.getLogger("sarmae.finetune")


@dataclass
class ChipSet:
    classes: list[str]
    files: list[str]
    labels: np.ndarray  # (N,) int64 class index


def class_folders(root: str | Path) -> ChipSet:
    """Chips under root/<class>/..., classes sorted by folder name."""
    from ..data.chips import find_chips

    root = Path(root)
    if not root.is_dir():
        raise FinetuneError(f"{root}: chip folder not found; give a folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for k, c in enumerate(classes):
        try:
            found = find_chips(root / c)
        except Exception:  # an empty class folder
            found = []
        if not found:
            log.warning("class folder %s holds no chip: skipped", root / c)
        files += found
        labels += [k] * len(found)
    used = sorted({classes[k] for k in labels})
    if len(used) < 2:
        raise FinetuneError(f"{root}: classification needs at least two class sub-folders with chips "
                            f"(found {len(used)}: {', '.join(used) or 'none'})")
    remap = {classes.index(c): i for i, c in enumerate(used)}
    return ChipSet(used, files, np.array([remap[k] for k in labels], dtype=np.int64))


def take_shots(labels: np.ndarray, idx: np.ndarray, shots: int | None, classes: list[str],
               rng: np.random.Generator | None) -> np.ndarray:
    """At most ``shots`` of the samples ``idx`` per class (all when None): a seeded draw, or the
    first ones when ``rng`` is None (``idx`` already shuffled); a warning when a class has fewer."""
    if shots is None:
        return idx
    keep = []
    for k, c in enumerate(classes):
        have = idx[labels[idx] == k]
        have = rng.permutation(have) if rng is not None else have
        if len(have) < shots:
            log.warning("class %s has only %d training chips (< %d shots)", c, len(have), shots)
        keep += have[:shots].tolist()
    return np.array(sorted(keep), dtype=np.int64)


def split(chips: ChipSet, val_fraction: float, shots: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: per class, a held-out val share, then ``shots`` training chips (seeded)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for k in range(len(chips.classes)):
        idx = rng.permutation(np.flatnonzero(chips.labels == k))
        n_val = int(round(val_fraction * len(idx))) if len(idx) > 1 else 0
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    train = take_shots(chips.labels, np.array(train, dtype=np.int64), shots, chips.classes, None)
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def load_tensors(files: list[str], size: int, in_chans: int, mean: list[float], std: list[float],
                 units: str | None = None, clip_db=(-35.0, 10.0)) -> tuple[torch.Tensor, str]:
    """Read chips -> (N, C, size, size) normalised float32 and the scaling kind ("uint8", "db", ...)."""
    from ..data.chips import map_channels, read_chip, scan_chips
    from ..data.scaling import fit_size, scaling_kind

    dc = DataConfig(paths=[], img_size=size, in_chans=in_chans, units=units, clip_db=tuple(clip_db))
    infos, bad = scan_chips(files, dc)
    if bad:
        raise FinetuneError(f"{len(bad)} unreadable chip(s), e.g. {bad[:3]}")
    out = torch.empty(len(infos), in_chans, size, size)
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    kinds = set()
    for i, info in enumerate(infos):
        x = torch.from_numpy(map_channels(read_chip(info, dc), in_chans))
        out[i] = (fit_size(x, size, "resize") - m) / s
        kinds.add(scaling_kind(info.dtype, units))
    return out, (kinds.pop() if len(kinds) == 1 else "mixed")


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random flips and 90-degree rotations per batch (SAR chips have no preferred orientation)."""
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    if torch.rand(()) < 0.5:
        x = x.flip(-2)
    k = int(torch.randint(0, 4, ()))
    return torch.rot90(x, k, (-2, -1)) if k else x


def contract_for(kind: str, enc_input: dict, in_chans: int, clip_db) -> dict:
    """The package's input contract: how the chips were scaled (uint8 /255, or dB clipped)."""
    if kind == "uint8":
        units, clip = "uint8", [0.0, 255.0]
    elif kind == "uint16":
        units, clip = "amplitude", [0.0, 65535.0]
    else:
        units, clip = "db", [float(clip_db[0]), float(clip_db[1])]
    return {**enc_input, "units": units, "clip": clip}


# --standardise: how each chip is standardised in dB (engine.radiometry.standardise_windows). "median"
# subtracts the chip's median and divides by a fixed 10 dB, keeping the target-to-clutter contrast;
# "iqr" also divides by the chip's interquartile range (MSTAR 40-shot, quick mode, random ViT-Tiny,
# validation accuracy: median 51.8 %, iqr 38.3 %, none 52.1 %; README, "Measured"). "auto" (the
# default): median for 8-bit display chips, whose level is a display stretch or an unknown gain;
# none for calibrated units (dB, power, amplitude), whose level is physical (water is dark).
STANDARDISE = {"median": {"per": "window", "centre": "median", "spread": 10.0},
               "iqr": {"per": "window", "centre": "median", "spread": "iqr"}, "none": None}
# --smooth: a Gaussian low-pass (sigma in px) of each standardised chip, in training and in the engine
# (standardise_windows). MSTAR 40-shot, quick mode, validation chips, clean / mean of 9 simulated
# acquisition shifts: see README "Measured", "Input smoothing"; chosen there on validation.
SMOOTH_DEFAULT = 1.0


def with_standardise(contract: dict, cfg: FinetuneConfig) -> tuple[dict, str]:
    """The package's input contract with ``cfg.standardise`` (``STANDARDISE``; "auto" by the units),
    and why; the engine applies it to every window it classifies, training to every chip after its
    augmentations (``model_input``)."""
    choice = cfg.standardise
    if choice not in (*STANDARDISE, "auto"):
        raise FinetuneError(f"--standardise '{choice}': use auto (by the data's units), median (each chip in dB minus "
                            "its median, over 10 dB: brightness-independent), iqr (over the chip's interquartile "
                            "range) or none")
    why = f"--standardise {choice}"
    if choice == "auto":
        choice = "median" if contract.get("units") == "uint8" else "none"
        why = ("8-bit display chips (no calibrated level): each chip in dB minus its median, over 10 dB, in training "
               "and in the engine" if choice == "median" else
               f"calibrated {contract.get('units')} input (its level is physical): no per-chip standardisation")
    spec = STANDARDISE[choice]
    smooth = SMOOTH_DEFAULT if cfg.smooth is None else cfg.smooth
    bad = check_standardise({**STANDARDISE["median"], "smooth": smooth})  # the card's own rule for the sigma
    if bad:
        raise FinetuneError(f"--smooth {smooth!r}: {bad}")
    if spec is None and cfg.smooth:
        raise FinetuneError(f"--smooth {cfg.smooth:g} low-passes the standardised chip, and this input is not "
                            f"standardised ({why}); add --standardise median or iqr, or leave --smooth out")
    if spec is not None and smooth:
        spec = {**spec, "smooth": float(smooth)}
        why += f"; then a Gaussian low-pass of {float(smooth):g} px (--smooth)"
    out = {**{k: v for k, v in contract.items() if k != "standardise"}, **({"standardise": spec} if spec else {})}
    return out, why


@dataclass
class _Data:
    """Classification data in memory, from either source."""

    classes: list[str]
    x: torch.Tensor  # (N, C, S, S) normalised model input (float32 from folders, float16 from rasters)
    y: np.ndarray  # (N,) int64 class index
    train: np.ndarray  # indices
    val: np.ndarray
    contract: dict  # the package's input contract
    prov: dict  # what provenance records about the data
    result: dict  # extra fields of the result (decisions and warnings of the raster path)


def _from_folders(chips_dir, cfg: FinetuneConfig, enc_input: dict, size: int, in_chans: int) -> _Data:
    if cfg.bands:
        raise FinetuneError("--bands picks raster bands; chips in class folders are mapped to the encoder's channels "
                            "automatically (leave --bands out, or train from --raster with --labels)")
    chips = class_folders(chips_dir)
    tr, va = split(chips, cfg.val_fraction, cfg.shots, cfg.seed)
    if len(va) == 0:
        raise FinetuneError(f"{chips_dir}: no validation chips; put more chips in each class folder or raise "
                            "--val-fraction")
    clip_db = (-35.0, 10.0) if enc_input["units"] != "db" else tuple(enc_input["clip"])
    units = cfg.input_units if cfg.input_units != "uint8" else None  # 8-bit chips are always /255
    x, kind = load_tensors(chips.files, size, in_chans, enc_input["mean"], enc_input["std"], units=units,
                           clip_db=clip_db)
    prov = {"task_data": str(chips_dir), "train_chips": int(len(tr)), "val_chips": int(len(va)),
            "split": "stratified per class (seeded)", "shots": cfg.shots}
    return _Data(chips.classes, x, chips.labels, tr, va, contract_for(kind, enc_input, in_chans, clip_db), prov, {})


def _from_rasters(rasters, cfg: FinetuneConfig, enc_input: dict, size: int, **kw) -> _Data:
    chips = build_chips(rasters, enc_input, size, "classify", val_fraction=cfg.val_fraction, seed=cfg.seed,
                        bands=cfg.bands, input_units=cfg.input_units, max_chips=cfg.max_chips, **kw)
    va = np.flatnonzero(chips.split)
    tr = take_shots(chips.labels, np.flatnonzero(~chips.split), cfg.shots, chips.classes,
                    np.random.default_rng(cfg.seed))
    src = {"rasters": [str(r) for r in ([rasters] if isinstance(rasters, (str, Path)) else rasters)],
           "labels": str(kw["labels"]) if kw.get("labels") else None, "class_field": kw.get("class_field"),
           "label_raster": str(kw["label_raster"]) if kw.get("label_raster") else None,
           "background": kw.get("background"), "shots": cfg.shots,
           "chips": "centred inside labelled polygons (class raster cells); label = that polygon's class",
           **chip_provenance(chips), "train_chips": int(len(tr))}
    return _Data(chips.classes, chips.x, chips.labels, tr, va, dict(chips.contract), src,
                 {"log": chips.log, "warnings": chips.warnings})


def finetune_classifier(chips_dir: str | Path | None, output: str | Path, cfg: FinetuneConfig, progress=None,
                        overwrite: bool = False, *, rasters: list[str] | str | None = None, labels: str | None = None,
                        class_field: str | None = None, label_raster: str | None = None,
                        classes: list[str] | None = None, background: str | None = None,
                        colours: dict[str, str] | list[str] | None = None) -> dict:
    """Fine-tune (or linear-probe) a classifier; write a classify package with metrics and plots.

    Data: ``chips_dir`` (one sub-folder of chips per class, stratified validation share), or
    ``rasters`` with ``labels`` + ``class_field`` (polygons) or ``label_raster``: chips centred
    inside the labelled polygons, several per large polygon, labelled with its class, validation
    by spatial blocks (``labels.build_chips``); ``background`` names the class of chips that touch
    no polygon (else there are none). ``cfg.shots`` keeps N training chips per class (seeded);
    a batch larger than the training set is lowered to it.
    """
    from engine.card import default_input

    if (chips_dir is None) == (not rasters):
        raise FinetuneError("give the classification data: a chip folder, or raster(s) with labelled polygons "
                            "(--labels, --class-field) or a label raster (not both)")
    if rasters and ((labels is None) == (label_raster is None) or (labels is not None and not class_field)):
        raise FinetuneError("give the labels: a vector file with its class field, or a label raster (not both)")
    from .classify_cnn import check_arch, choose, robust_validation, train_cnn

    t0 = time.time()
    cnn_only = check_arch(cfg)
    if cnn_only:
        device, enc, size = start_cnn(cfg)
        c, enc_input = cfg.in_chans or 1, default_input(cfg.in_chans or 1)
    else:
        device, enc, size = start(cfg)
        c, enc_input = enc.model.in_chans, enc.input
    if chips_dir is not None:
        data = _from_folders(chips_dir, cfg, enc_input, size, c)
    else:
        data = _from_rasters(rasters, cfg, enc_input, size, labels=labels, class_field=class_field,
                             label_raster=label_raster, classes=classes, background=background)
    colours = class_colours(data.classes, colours, classes)
    k, tr, va = len(data.classes), data.train, data.val
    if len(tr) < k:
        raise FinetuneError(f"only {len(tr)} training chips for {k} classes ({', '.join(data.classes)})")
    warns = list(data.result.get("warnings", []))
    data.contract, std_why = with_standardise(data.contract, cfg)
    log.info("input: %s", std_why)
    cfg = fit_batch(cfg, len(tr), warns)
    if cnn_only:
        model, hist, row = train_cnn(data, tr, va, cfg, progress)
        chosen, why, head, candidates = "cnn", "--arch cnn: a small CNN trained from scratch", {}, []
    else:
        mode, why = resolve_mode(cfg, "classify", len(tr))
        log.info(why)
        # auto: the ViT route gets half the budget, the small CNN candidate the rest (both fit in it)
        both = cfg.mode == "auto" and not cfg.linear_probe
        vit_cfg = replace(cfg, max_minutes=cfg.max_minutes / 2) if both and cfg.max_minutes else cfg
        model, hist, chosen, head = _vit_route(data, enc, vit_cfg, mode, device, t0, progress, warns)
        candidates = []
        if both:
            candidates.append({"name": f"ViT {'quick head' if chosen == 'head' else 'fine-tune'}",
                               "validation": robust_validation(model, data, va, device), "minutes":
                               round((time.time() - t0) / 60, 2)})
            if budget_spent(cfg, t0):
                why += "; the small CNN did not fit in what was left of --max-minutes"
            else:
                t1 = time.time()
                cnn, cnn_hist, row = train_cnn(data, tr, va, cfg, progress, remaining(cfg, t0).max_minutes)
                candidates.append({"name": "small CNN", "validation": robust_validation(cnn, data, va),
                                   "minutes": round((time.time() - t1) / 60, 2), "epochs_run": row["epochs_run"]})
                kept, pick = choose(candidates)
                why += "; " + pick
                if kept["name"] == "small CNN":
                    model, hist, chosen, enc, head = cnn, cnn_hist, "cnn", None, {}
            log.info(why)
    return _finish(model, hist, chosen, why, std_why, head, enc, data, cfg, candidates, warns, output, overwrite,
                   colours, t0, device, c, size)


def start_cnn(cfg: FinetuneConfig) -> tuple[str, None, int]:
    """``start`` for the small CNN (no encoder): seed, device, the chip size (``--img-size``, default 128)."""
    from engine.models.small_cnn import STRIDE

    size = cfg.img_size or 128
    if size % STRIDE:
        raise FinetuneError(f"--img-size {size}: the small CNN needs a multiple of {STRIDE} px (e.g. "
                            f"{max(STRIDE, size // STRIDE * STRIDE)})")
    torch.manual_seed(cfg.seed)
    return pick_device(cfg.device), None, size


def _vit_route(data: _Data, enc, cfg: FinetuneConfig, mode: str, device: str, t0: float, progress, warns: list):
    """The ViT classifier on ``enc``: quick head (frozen encoder), then (mode full / auto) a full
    fine-tune from it. Returns (model, History, "head" | "full", head config)."""
    from engine.models.heads import CLS_POOLS, ViTClassifier

    k, tr, va, bs = len(data.classes), data.train, data.val, cfg.batch_size
    if not cfg.encoder and mode == "head" and not cfg.baselines:
        warns.append("no pretrained encoder (--encoder): the quick mode fits a head on a random network's features, "
                     "which only tie a small CNN trained from scratch (MSTAR 40 shots: 85.5 against 85.4 %), while a "
                     "pretrained encoder scores 90.4 % (README, 'The classifier's 8 views'); give --encoder, or use "
                     "--mode auto or --arch cnn, or add --baselines to see both scores")
    y = torch.from_numpy(data.y)
    loader = torch.utils.data.DataLoader(torch.from_numpy(tr), batch_size=bs, shuffle=True,
                                         drop_last=len(tr) >= 2 * bs, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.pool not in CLS_POOLS:
        raise FinetuneError(f"--pool '{cfg.pool}': use mean (the last block's tokens) or blocks (mean and max of the "
                            "last 4 blocks' tokens)")
    head = {} if cfg.pool == "mean" else {"pool": cfg.pool, "blocks": 4}
    model = ViTClassifier(enc.model, k, **head).to(device)
    head = {**head, "blocks": model.blocks} if head else head  # the blocks it has (a shallow encoder: fewer)

    def train_step(m, idx):
        xb = data.x[idx].float()
        xb = chip_jitter(augment(xb), data.contract, cfg) if cfg.augment else xb
        xb = model_input(xb, data.contract)
        return F.cross_entropy(m(xb.to(device)), y[idx].to(device), label_smoothing=cfg.label_smoothing)

    def evaluate(m):
        pred = torch.cat([m(model_input(data.x[va[i:i + 256]].float(), data.contract).to(device)).argmax(1).cpu()
                          for i in range(0, len(va), 256)])
        return classification_metrics(data.y[va], pred.numpy(), data.classes)

    log.info("%s; %d classes, %d train / %d val chips%s, %d px, %s", enc.report, k, len(tr), len(va),
             f" ({cfg.shots}-shot)" if cfg.shots else "", data.x.shape[-1], {"head": "quick mode (frozen encoder)", "auto":
             "quick mode, then full fine-tune"}.get(mode, "linear probe" if cfg.linear_probe else "full fine-tune"))
    hist, chosen = None, mode
    if mode in ("head", "auto"):
        q = fit_classify_head(model, data.x, data.y, tr, va, cfg, device, data.classes, data.contract)
        model.eval()
        with torch.no_grad():
            acc = evaluate(model)["accuracy"]
        hist = History(epochs=[0], train_loss=[float("nan")], val_score=[acc], val_metrics=[q], best_epoch=0,
                       best_score=acc, stopped="quick mode: one logistic-regression fit")
        if progress is not None:
            progress({"epoch": 0, "epochs": 1, "train_loss": float("nan"), "accuracy": acc, "metric": "accuracy",
                      "best": acc, "elapsed_s": time.time() - t0, "eta_s": 0.0})
        chosen = "head"
    quick_views = model.views  # the quick head's choice (fit_classify_head); a full fine-tune trains 1 view
    if mode in ("full", "auto") and not budget_spent(cfg, t0):
        model.views = 1
        hist, chosen, note = full_after_quick(model, hist, train_step, evaluate, loader, cfg, t0, device, "accuracy",
                                              progress)
        if note:
            log.info(note)
        model.views = quick_views if chosen == "head" else 1
    if model.views != 1:
        head = {**head, "views": model.views}
    return model, hist, chosen, head


def _finish(model, hist, chosen: str, why: str, std_why: str, head: dict, enc, data: _Data, cfg: FinetuneConfig,
            candidates: list[dict], warns: list[str], output, overwrite: bool, colours, t0: float, device: str,
            c: int, size: int) -> dict:
    """Score the model kept on the validation chips, add the baseline row (``--baselines``), write the package."""
    from engine.models.small_cnn import small_cnn_architecture

    from .classify_cnn import train_cnn

    va = data.val
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(model_input(data.x[va[i:i + 256]].float(), data.contract).to(device)).argmax(1).cpu()
                          for i in range(0, len(va), 256)])
    final = classification_metrics(data.y[va], pred.numpy(), data.classes)
    quick = hist.val_metrics[0] if chosen == "head" and hist.val_metrics else {}  # fit_classify_head's record
    cv = quick if isinstance(quick, dict) and quick.get("cv_balanced_accuracy") is not None else None
    validation = validation_report(data.classes, data.y[va], len(va), cv, unit="chip")
    if not validation["reliable"]:
        warns.append(validation["note"])
    metrics = {"val_accuracy": final["accuracy"], "val_per_class_accuracy": final["per_class_accuracy"],
               "best_epoch": hist.best_epoch, "epochs_run": len(hist.epochs), "stopped": hist.stopped,
               "mode": chosen, "mode_reason": why, "standardise": std_why, "validation": validation}
    if chosen == "head" and isinstance(quick, dict) and "views" in quick:  # fit_classify_head's choice (choose_views)
        metrics.update(views=quick["views"], views_reason=quick["views_reason"])
    if candidates:
        metrics["candidates"] = candidates
    cnn_row = next((cd for cd in candidates if cd["name"] == "small CNN"), None)
    if cfg.baselines and chosen != "cnn" and cnn_row is None:
        _, _, row = train_cnn(data, data.train, va, cfg)
        metrics["baselines"] = [row]
        log.info("baseline: small CNN from scratch, validation accuracy %.3f (%d epochs, %.1f min) against %.3f",
                 row["val_accuracy"], row["epochs_run"], row["minutes"], final["accuracy"])
        if row["val_accuracy"] > final["accuracy"]:
            warns.append(f"a small CNN trained from scratch on the same chips scored validation accuracy "
                         f"{row['val_accuracy']:.3f} against {final['accuracy']:.3f} for this model: with this encoder "
                         "and these labels the deep model is not worth installing; use --mode auto (keeps the better) "
                         "or --arch cnn, or try a stronger pretrained encoder or more labels")
    elif cfg.baselines:
        metrics["baselines"] = [{"name": "small CNN", "note": "the package's model is the small CNN" if chosen == "cnn"
                                 else "trained as --mode auto's candidate (metrics.candidates)"}]
    arch = small_cnn_architecture(c, size) if chosen == "cnn" else None
    out = save_task_package(model, enc, "classify", head, data.classes, data.contract, output, cfg, hist, "accuracy",
                            metrics, {**data.prov, "batch_size": cfg.batch_size}, t0, cm=final["confusion"],
                            overwrite=overwrite, colours=colours, architecture=arch)
    return {"package": str(out), **metrics, "classes": data.classes, "train_chips": int(len(data.train)),
            "val_chips": int(len(va)), **data.result, "warnings": warns, "seconds": round(time.time() - t0, 1),
            "history": {"val_accuracy": hist.val_score, "train_loss": hist.train_loss}}
