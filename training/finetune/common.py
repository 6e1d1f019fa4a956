"""What every fine-tuning task shares: encoder loading, layer-wise lr decay, the epoch loop with a
time budget and early stopping, curves, and writing the result as a model package."""

from __future__ import annotations

import copy
import logging
import math
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from engine.errors import SarmaeError
from engine.models import VisionTransformer
from engine.models.registry import arch_encoder_config, vit_name
from engine.package import default_input

from ..optim import lr_at
from .config import FinetuneConfig
from .metrics import confusion_png, preview_png

log = logging.getLogger("sarmae.finetune")


class FinetuneError(SarmaeError, ValueError):
    """Fine-tuning cannot start: bad labels, too little data, mismatched inputs."""


@dataclass
class Encoder:
    model: VisionTransformer
    input: dict  # the engine input contract the encoder was trained with
    source: str  # provenance: package name + sha256, or "random initialisation"
    report: str  # what loaded


def load_encoder(cfg: FinetuneConfig) -> Encoder:
    """The ViT encoder of a package (any task), adapted to cfg.img_size / cfg.in_chans, or a random one."""
    from engine.convert import adapt_patch_embed, find_encoder_prefix
    from engine.models import ViTConfig
    from engine.models.pos_embed import resample_pos_embed
    from engine.models.vit import input_conv_key
    from engine.package import load_state_dict

    if not cfg.encoder:
        c = cfg.in_chans or 1
        enc = VisionTransformer(arch_encoder_config(cfg.arch, img_size=cfg.img_size or 224, in_chans=c,
                                                    drop_path_rate=cfg.drop_path))
        return Encoder(enc, default_input(c), "random initialisation", f"random {cfg.arch}")
    card, sd = load_state_dict(cfg.encoder)
    arch = dict(card.architecture["encoder"])
    prefix = find_encoder_prefix(sd.keys())
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k[len(prefix):].startswith(("decoder", "mask_token"))}
    c = cfg.in_chans or arch["in_chans"]
    size = cfg.img_size or arch["img_size"][0]
    notes = []
    if c != arch["in_chans"]:
        key = input_conv_key(arch.get("stem", "patch"))
        sd[key] = adapt_patch_embed(sd[key], c)
        notes.append(f"patch embedding {arch['in_chans']}->{c} channels")
    old_grid = (arch["img_size"][0] // arch["patch_size"], arch["img_size"][1] // arch["patch_size"])
    arch.update(in_chans=c, img_size=[size, size], drop_path_rate=cfg.drop_path)
    model = VisionTransformer(ViTConfig.from_dict(arch))
    if "pos_embed" in sd and model.grid != old_grid:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], model.grid, old_grid)
        notes.append(f"position table {old_grid[0]}x{old_grid[1]}->{model.grid[0]}x{model.grid[1]}")
    target = model.state_dict()
    ok = {k: v for k, v in sd.items() if k in target and v.shape == target[k].shape}
    frac = len(ok) / len(target)
    if frac < 0.9:
        raise FinetuneError(f"{cfg.encoder}: only {len(ok)}/{len(target)} encoder tensors fit ({100 * frac:.0f} %); "
                            "is it a SARMAE encoder package?")
    model.load_state_dict(ok, strict=False)
    inp = dict(card.input)
    if c != card.in_chans:
        # the channels are new: the first training raster names them (labels.open_input); mean / std repeat
        inp = {**inp, "bands": [f"band{i + 1}" for i in range(c)], "mean": (inp["mean"] * c)[:c],
               "std": (inp["std"] * c)[:c]}
    report = f"encoder {card.name}: {len(ok)}/{len(target)} tensors" + (f" ({', '.join(notes)})" if notes else "")
    return Encoder(model, inp, f"{card.name} (sha256 {card.weights['sha256'][:12]})", report)


def apply_gain(x: torch.Tensor, contract: dict, gain_db: torch.Tensor | float) -> torch.Tensor:
    """A radiometric gain of ``gain_db`` decibels (a number, or one per chip: (N, 1, 1, 1)) on
    normalised model input (N, C, H, W): dB contracts shift by the gain; amplitude and 8-bit display
    values scale by 10^(g/20), linear power by 10^(g/10); the result is clipped to the contract's
    range as the engine clips real data."""
    c = x.shape[1]
    mean = torch.tensor(contract["mean"][:c], dtype=x.dtype).view(1, c, 1, 1)
    std = torch.tensor(contract["std"][:c], dtype=x.dtype).view(1, c, 1, 1)
    g = torch.as_tensor(gain_db, dtype=x.dtype)
    v = x * std + mean  # [0, 1] scaled
    units = contract.get("units", "db")
    if units == "db":
        lo, hi = contract["clip"]
        v = v + g / (hi - lo)
    else:
        v = v * 10 ** (g / (10 if units == "linear_power" else 20))
    return (v.clamp(0.0, 1.0) - mean) / std


def model_input(x: torch.Tensor, contract) -> torch.Tensor:
    """What the model sees of ``x`` (N, C, H, W), normalised by the contract's clip / mean / std: the
    same, standardised per chip in dB when the contract has ``standardise``
    (``engine.radiometry.standardise_windows``, the function the engine applies to each window), so
    training, validation and inference feed the model alike. Gains and augmentations go BEFORE it."""
    if contract.get("standardise") is None:
        return x
    from engine.radiometry import standardise_windows

    return torch.from_numpy(standardise_windows(x.detach().float().cpu().numpy(), contract)).to(x.device)


def gain_jitter(x: torch.Tensor, contract: dict, max_db: float) -> torch.Tensor:
    """A random gain per chip, uniform in +-``max_db`` dB (``apply_gain``): acquisitions differ in
    calibration, incidence angle and processing, and a model that keys on absolute brightness fails
    on the next sensor."""
    if not max_db:
        return x
    return apply_gain(x, contract, (torch.rand(x.shape[0], 1, 1, 1) * 2 - 1) * max_db)


def chip_jitter(x: torch.Tensor, contract: dict, cfg: FinetuneConfig) -> torch.Tensor:
    """The radiometric / acquisition augmentation of classification chips: a random gain
    (``gain_jitter``, ``cfg.gain_db``), or with ``cfg.acquisition`` random changes of acquisition
    (``training.acquisition.acquisition_jitter``: gain, 8-bit stretch, fresh speckle, resolution, pose)."""
    if cfg.acquisition:
        from ..acquisition import acquisition_jitter

        return acquisition_jitter(x, contract, cfg.gain_db, warp=cfg.acquisition_warp)
    return gain_jitter(x, contract, cfg.gain_db)


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for block i, depth + 1 for everything after (norms, heads)."""
    for prefix in ("encoder.", "detector.backbone.encoder."):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.startswith(("cls_token", "pos_embed", "patch_embed")):
                return 0
            if rest.startswith("blocks."):
                return int(rest.split(".")[1]) + 1
            return depth + 1
    return depth + 1


def decay_groups(model: nn.Module, depth: int, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with lr scale layer_decay^(depth + 1 - layer) and no decay on 1-D params / embeddings."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        no_wd = p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        g = groups.setdefault((lid, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                             "lr_scale": layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
    return list(groups.values())


@dataclass
class History:
    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_score: list[float] = field(default_factory=list)
    val_metrics: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = -math.inf
    stopped: str = ""


def fit(model: nn.Module, train_step: Callable, evaluate: Callable, train_loader, cfg: FinetuneConfig,
        device: str, metric_name: str, progress: Callable[[dict], None] | None = None) -> History:
    """The epoch loop: warm-up + cosine per step with layer-wise scales, early stopping on the
    validation score (higher is better), a wall-clock budget; the best weights are restored."""
    depth = len(model.encoder.blocks)
    if cfg.linear_probe:
        model.encoder.requires_grad_(False)
    elif cfg.freeze_epochs:
        model.encoder.requires_grad_(False)
    lr = cfg.peak_lr
    groups = decay_groups(model, depth, cfg.weight_decay, cfg.decay)
    opt = torch.optim.AdamW(groups, lr=lr)
    steps_per_epoch = max(1, len(train_loader))
    total, warmup = steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)
    hist, best_state, step = History(), None, 0
    t0 = time.time()
    deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes else None
    for epoch in range(cfg.epochs):
        if cfg.freeze_epochs and not cfg.linear_probe and epoch == cfg.freeze_epochs:
            model.encoder.requires_grad_(True)
            opt = torch.optim.AdamW(decay_groups(model, depth, cfg.weight_decay, cfg.decay), lr=lr)
        model.train()
        if cfg.linear_probe:
            model.encoder.eval()
        losses = []
        for batch in train_loader:
            cur = lr_at(step, total, warmup, lr, cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = cur * g.get("lr_scale", 1.0)
            loss = train_step(model, batch)
            if not torch.isfinite(loss):
                opt.zero_grad(set_to_none=True)
                step += 1
                continue
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if deadline and time.time() > deadline:
                break
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model)
        score = float(metrics[metric_name])
        hist.epochs.append(epoch)
        hist.train_loss.append(float(np.mean(losses)) if losses else float("nan"))
        hist.val_score.append(score)
        hist.val_metrics.append(metrics)
        if score > hist.best_score:
            hist.best_score, hist.best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        if progress is not None:
            now = time.time()
            eta = (now - t0) / (epoch + 1) * (cfg.epochs - epoch - 1)
            progress({"epoch": epoch, "epochs": cfg.epochs, "train_loss": hist.train_loss[-1], metric_name: score,
                      "metric": metric_name, "best": hist.best_score, "elapsed_s": now - t0,
                      "eta_s": min(eta, max(0.0, deadline - now)) if deadline else eta})
        if deadline and time.time() > deadline:
            hist.stopped = f"time budget of {cfg.max_minutes} min reached after epoch {epoch}"
            break
        if epoch - hist.best_epoch >= cfg.patience:
            hist.stopped = f"no better validation {metric_name} for {cfg.patience} epochs (early stop at epoch {epoch})"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return hist


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def progress_line(row: dict) -> str:
    """One epoch of ``fit``'s progress as text: 'epoch 3/50: loss 0.41, val accuracy 0.82 (best 0.85),
    12 s, ETA 3 min 10 s' (the rest of the epochs at the mean pace so far, within the time budget;
    early stopping may end sooner)."""
    m = row.get("metric")
    if m is None:  # no validation metric (the CFAR proposal scorer): the training loss alone
        return (f"epoch {row['epoch'] + 1}/{row['epochs']}: loss {row['train_loss']:.4f}, "
                f"{_duration(row['elapsed_s'])}, ETA {_duration(row['eta_s'])}")
    if not math.isfinite(row["train_loss"]):  # the quick mode's one fit (no epochs of gradient steps)
        return f"quick fit: val {m} {row[m]:.4f}, {_duration(row['elapsed_s'])}"
    return (f"epoch {row['epoch'] + 1}/{row['epochs']}: loss {row['train_loss']:.4f}, val {m} {row[m]:.4f} "
            f"(best {row['best']:.4f}), {_duration(row['elapsed_s'])}, ETA {_duration(row['eta_s'])}")


def plot_history(hist: History, metric_name: str, png: Path) -> None:
    """Training loss and validation score per epoch, sized for a dialog: 800 x 320 px at 100 dpi,
    11 pt text (readable at full size in the results dialog and at half size in a card)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11}):
        fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
        ax[0].plot(hist.epochs, hist.train_loss, marker="o", ms=3)
        ax[0].set_title("training loss")
        ax[1].plot(hist.epochs, hist.val_score, marker="o", ms=3, c="tab:green")
        if hist.best_epoch >= 0:
            ax[1].axvline(hist.best_epoch, ls="--", c="gray", label=f"best (epoch {hist.best_epoch})")
            ax[1].legend(loc="best", fontsize=10)
        ax[1].set_title(f"validation {metric_name}")
        for a in ax:
            a.set_xlabel("epoch")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)


def class_colours(classes: list[str], colours: dict[str, str] | list[str] | None,
                  given: list[str] | None = None) -> dict[str, str]:
    """{class: '#rrggbb'} from a dict, or from a list aligned with ``given`` (the user's class order,
    else ``classes``); FinetuneError on a malformed colour or a list of the wrong length."""
    if not colours:
        return {}
    if not isinstance(colours, dict):
        names = list(given or classes)
        if len(colours) != len(names):
            raise FinetuneError(f"{len(colours)} colour(s) given for {len(names)} class(es) ({', '.join(names)}); "
                                "give one '#rrggbb' per class, in the class order")
        colours = dict(zip(names, colours))
    bad = [c for c in colours.values() if not (isinstance(c, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", c))]
    if bad:
        raise FinetuneError(f"colour(s) {bad} are not '#rrggbb'")
    return {str(k): str(v) for k, v in colours.items()}


def fit_batch(cfg: FinetuneConfig, n_train: int, warnings_out: list[str]) -> FinetuneConfig:
    """``cfg`` with the batch size lowered to the number of training chips when they are fewer
    (a handful of polygons must train), saying so in ``warnings_out``."""
    if n_train >= cfg.batch_size:
        return cfg
    bs = max(1, n_train)
    msg = f"only {n_train} training chip(s): batch size lowered from {cfg.batch_size} to {bs}"
    log.warning(msg)
    warnings_out.append(msg)
    return replace(cfg, batch_size=bs)


MIN_VAL_CHIPS = 4  # fewer validation chips than this: the validation score is not reliable
MIN_VAL_PER_CLASS = 2  # chips / boxes: fewer held-out items of a class than this is not reliable
HELD_OUT = {"pixel": "pixel in the held-out area", "chip": "chip held out", "box": "box in the held-out area"}


def validation_report(classes: list[str], true: np.ndarray, n_chips: int, cv: dict | None = None,
                      unit: str = "pixel") -> dict:
    """How far a validation score can be trusted, for every task: chips, classes present, the quick
    mode's cross-validation by chip when it ran, and a sentence when the held-out split is weak.
    ``true``: the class index of each held-out ``unit`` (segment: pixels, 255 ignored; classify: one
    per chip; detect: one per box, labels 1..K minus 1). Weak: fewer than 4 validation chips, a class
    with nothing held out, or (chips, boxes) fewer than 2 held out of a class."""
    true = np.asarray(true).reshape(-1)
    counts = {c: int((true == j).sum()) for j, c in enumerate(classes)}
    present = [c for c in classes if counts[c]]
    missing = [c for c in classes if not counts[c]]
    thin = [c for c in present if unit != "pixel" and counts[c] < MIN_VAL_PER_CLASS]
    reliable = n_chips >= MIN_VAL_CHIPS and not missing and not thin
    note = ""
    if not reliable:
        why = [f"only {n_chips} validation chip(s)"] if n_chips < MIN_VAL_CHIPS else []
        why += [f"no {', '.join(missing)} {HELD_OUT[unit]}"] if missing else []
        why += [f"only {counts[c]} {c} {unit} held out" for c in thin]
        note = "validation is weak (" + "; ".join(why) + "): its score says little about the map"
        if cv and cv.get("cv_balanced_accuracy") is not None and cv.get("refit_chips"):
            note += (f"; cross-validation over all {cv['refit_chips']} labelled chips ({cv['cv_folds']} folds by chip, "
                     f"each scored by a head fitted without it) gives a balanced accuracy of "
                     f"{cv['cv_balanced_accuracy']:.2f}, and the model was then fitted on all of them")
        elif cv and cv.get("cv_balanced_accuracy") is not None:
            note += (f"; cross-validation over the training chips ({cv['cv_folds']} folds by chip, each scored by a "
                     f"head fitted without it) gives a balanced accuracy of {cv['cv_balanced_accuracy']:.2f}")
        note += ". Label more areas, spread out, with every class in several places"
    out = {"chips": int(n_chips), "classes_present": present, "reliable": reliable, "note": note}
    if unit != "pixel":
        out["held_out_per_class"] = counts  # chips (classify) or boxes (detect) of each class
    if cv:
        out["cross_validation"] = {"balanced_accuracy": cv.get("cv_balanced_accuracy"), "folds": cv.get("cv_folds"),
                                   "by": "labelled chip" if cv.get("refit_chips") else "training chip"}
    return out


def budget_spent(cfg: FinetuneConfig, t0: float) -> bool:
    """True when ``cfg.max_minutes`` (counted from ``t0``) is used up."""
    return bool(cfg.max_minutes) and time.time() - t0 >= 60 * cfg.max_minutes


def remaining(cfg: FinetuneConfig, t0: float) -> FinetuneConfig:
    """``cfg`` with ``max_minutes`` reduced to what is left of it since ``t0``."""
    if not cfg.max_minutes:
        return cfg
    return replace(cfg, max_minutes=max(0.05, cfg.max_minutes - (time.time() - t0) / 60))


def save_task_package(model: nn.Module, enc: Encoder | None, task: str, head: dict, classes: list[str], contract: dict,
                      output: str | Path, cfg: FinetuneConfig, hist: History, metric: str, metrics: dict,
                      data: dict, t0: float, cm=None, overwrite: bool = False,
                      colours: dict[str, str] | None = None, preview: tuple | None = None,
                      architecture: dict | None = None) -> Path:
    """Write a task package: input contract, classes + colours, provenance (encoder, ``data``,
    metrics, config), training_curves.png, (when ``cm``) confusion_matrix.png and (when
    ``preview``: chips, labels, predictions, tags) preview.png inside, and with ``cfg.export_onnx``
    a model.onnx checked against torch (the engine's exporter). A network that is not a ViT with a
    head (the small CNN) comes with its own ``architecture`` and no ``enc``."""
    from engine.package import default_classes, new_card, save_package

    out = Path(output)
    arch = architecture or {"name": vit_name(enc.model.cfg), "encoder": {**enc.model.cfg.to_dict(), "drop_path_rate": 0.0},
                            "head": head}
    mode = metrics.get("mode") or "full"
    mode = "linear probe" if cfg.linear_probe and mode == "full" else mode
    prov = {"encoder": enc.source if enc else "none: trained from scratch",
            "encoder_load": enc.report if enc else arch["name"], **data, "seed": cfg.seed,
            "mode": {"head": "quick (light head on the frozen encoder)", "full": "full fine-tune",
                     "cnn": "small CNN trained from scratch"}.get(mode, mode),
            "metrics": metrics, "config": cfg.to_dict(), "minutes": round((time.time() - t0) / 60, 2)}
    cls = [{**c, "colour": (colours or {}).get(c["name"], c["colour"])} for c in default_classes(classes)]
    card = new_card(out.stem, task, arch, dict(contract), cls, prov)
    with tempfile.TemporaryDirectory() as tmp:
        plot_history(hist, metric, Path(tmp) / "training_curves.png")
        if cm is not None:
            confusion_png(cm, classes, Path(tmp) / "confusion_matrix.png")
        if preview is not None:
            preview_png(*preview, [c["colour"] for c in cls], Path(tmp) / "preview.png")
        pngs = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    sd = model.cpu().state_dict()
    save_package(sd, card, out, extra_files=pngs, overwrite=overwrite)
    if cfg.export_onnx:
        save_package(sd, card, out, onnx_bytes=onnx_export(out), extra_files=pngs, overwrite=True)
    return out


def onnx_export(package: Path) -> bytes:
    """model.onnx for a written package, as ``sarmae export`` makes it, refused when onnxruntime and
    torch disagree by more than 1e-4."""
    import json

    from engine.backends import OnnxBackend, TorchBackend, export_onnx
    from engine.package import load_package

    pkg = load_package(package)
    card = pkg.card
    with warnings.catch_warnings():  # the tracer's notes on shape checks: the input size is fixed
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        blob = export_onnx(pkg.model, card.task, card.in_chans, card.input_size, json.dumps(card.to_dict()))
    x = np.random.default_rng(0).standard_normal((2, card.in_chans, *card.input_size)).astype(np.float32)
    diff = float(np.abs(TorchBackend(pkg.model, card.task, "cpu").run(x) - OnnxBackend(blob, card.task, "cpu").run(x)).max())
    if diff > 1e-4:
        raise FinetuneError(f"{package}: the ONNX export disagrees with torch (max abs diff {diff:.2e}); the package "
                            "was written without model.onnx and runs with the torch backend")
    log.info("model.onnx written (%.1f MB); torch vs onnxruntime max abs diff %.1e", len(blob) / 1e6, diff)
    return blob


def start(cfg: FinetuneConfig) -> tuple[str, Encoder, int]:
    """The start every task shares: seed, device, encoder, and the model input size in px."""
    from engine.backends import onnx_tasks
    from engine.tasks import get_task

    if cfg.export_onnx and not get_task(cfg.task).onnx:
        raise FinetuneError(f"--export-onnx: ONNX export covers {', '.join(onnx_tasks())}; '{cfg.task}' packages run "
                            "with the torch backend (leave --export-onnx off)")
    if cfg.task == "detect" and cfg.mode == "head":
        raise FinetuneError("--mode head (quick) covers classify and segment; detection fine-tunes its whole model "
                            "(leave --mode out)")
    if cfg.class_weights not in (None, "none") and cfg.task != "segment":
        raise FinetuneError(f"--class-weights applies to segmentation, not to '{cfg.task}'; leave it out")
    torch.manual_seed(cfg.seed)
    enc = load_encoder(cfg)
    return pick_device(cfg.device), enc, enc.model.cfg.grid[0] * enc.model.patch_size


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
