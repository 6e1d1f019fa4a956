"""Classification fine-tuning on ImageFolder-style chip folders (one sub-folder per class).

Chips are scaled to [0, 1] by the pretraining data rule (training/data/scaling.py: 8-bit /255,
calibrated data -> dB -> clip -> [0, 1]), resized to the model input, normalised with the encoder's
mean/std, and cached in memory (small chip sets). Validation: a stratified held-out share of each
class; ``shots`` keeps N training chips per class (seeded).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.config import DataConfig
from .common import FinetuneError, fit, plot_history, start
from .config import FinetuneConfig
from .metrics import classification_metrics, confusion_png

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


def split(chips: ChipSet, val_fraction: float, shots: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: per class, a held-out val share, then ``shots`` training chips (seeded)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for k in range(len(chips.classes)):
        idx = rng.permutation(np.flatnonzero(chips.labels == k))
        n_val = int(round(val_fraction * len(idx))) if len(idx) > 1 else 0
        val += idx[:n_val].tolist()
        rest = idx[n_val:]
        if shots is not None:
            if len(rest) < shots:
                log.warning("class %s has only %d training chips (< %d shots)", chips.classes[k], len(rest), shots)
            rest = rest[:shots]
        train += rest.tolist()
    return np.array(sorted(train)), np.array(sorted(val))


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


def finetune_classifier(chips_dir: str | Path, output: str | Path, cfg: FinetuneConfig, progress=None,
                        overwrite: bool = False) -> dict:
    """Fine-tune (or linear-probe) a classifier; write a classify package with metrics and plots."""
    from engine.models.heads import ViTClassifier
    from engine.package import default_classes, new_card, save_package

    t0 = time.time()
    device, enc, size = start(cfg)
    c = enc.model.in_chans
    chips = class_folders(chips_dir)
    tr, va = split(chips, cfg.val_fraction, cfg.shots, cfg.seed)
    if len(tr) < len(chips.classes):
        raise FinetuneError(f"only {len(tr)} training chips for {len(chips.classes)} classes")
    if len(va) == 0:
        raise FinetuneError("no validation chips: use more chips per class or a larger val_fraction")
    clip_db = (-35.0, 10.0) if enc.input["units"] != "db" else tuple(enc.input["clip"])
    x, kind = load_tensors(chips.files, size, c, enc.input["mean"], enc.input["std"], clip_db=clip_db)
    y = torch.from_numpy(chips.labels)
    bs = min(cfg.batch_size, len(tr))
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[tr], y[tr]), batch_size=bs,
                                               shuffle=True, drop_last=len(tr) >= 2 * bs, generator=g)
    model = ViTClassifier(enc.model, len(chips.classes)).to(device)

    def train_step(m, batch):
        xb, yb = batch
        xb = augment(xb) if cfg.augment else xb
        return F.cross_entropy(m(xb.to(device)), yb.to(device), label_smoothing=cfg.label_smoothing)

    def predict(m, xs: torch.Tensor) -> np.ndarray:
        return torch.cat([m(xs[i:i + 256].to(device)).argmax(1).cpu() for i in range(0, len(xs), 256)]).numpy()

    def evaluate(m):
        return classification_metrics(chips.labels[va], predict(m, x[va]), chips.classes)

    log.info("%s; %d classes, %d train / %d val chips%s, %d px, %s", enc.report, len(chips.classes), len(tr), len(va),
             f" ({cfg.shots}-shot)" if cfg.shots else "", size, "linear probe" if cfg.linear_probe else "full fine-tune")
    hist = fit(model, train_step, evaluate, train_loader, cfg, device, "accuracy", progress)
    model.eval()
    with torch.no_grad():
        final = evaluate(model)
    out = Path(output)
    arch = {"name": _arch_name(enc.model), "encoder": enc.model.cfg.to_dict(), "head": {}}
    arch["encoder"]["drop_path_rate"] = 0.0
    contract = contract_for(kind, enc.input, c, clip_db)
    metrics = {"val_accuracy": final["accuracy"], "val_per_class_accuracy": final["per_class_accuracy"],
               "best_epoch": hist.best_epoch, "epochs_run": len(hist.epochs), "stopped": hist.stopped}
    prov = {"encoder": enc.source, "task_data": str(chips_dir), "train_chips": int(len(tr)), "val_chips": int(len(va)),
            "shots": cfg.shots, "seed": cfg.seed, "mode": "linear probe" if cfg.linear_probe else "fine-tune",
            "metrics": metrics, "config": cfg.to_dict(), "minutes": round((time.time() - t0) / 60, 2)}
    card = new_card(out.stem, "classify", arch, contract, default_classes(chips.classes), prov)
    pngs = {}
    tmp = Path(str(out) + ".plots")
    tmp.mkdir(parents=True, exist_ok=True)
    plot_history(hist, "accuracy", tmp / "training_curves.png")
    confusion_png(final["confusion"], chips.classes, tmp / "confusion_matrix.png")
    for name in ("training_curves.png", "confusion_matrix.png"):
        pngs[name] = (tmp / name).read_bytes()
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    save_package(model.cpu().state_dict(), card, out, extra_files=pngs, overwrite=overwrite)
    return {"package": str(out), **metrics, "history": {"val_accuracy": hist.val_score, "train_loss": hist.train_loss}}


def _arch_name(vit) -> str:
    from engine.models.registry import size_of

    size = size_of(vit.cfg)
    return f"vit_{size}_patch16" if size and vit.patch_size == 16 else "custom"
