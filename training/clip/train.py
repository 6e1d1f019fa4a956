"""CLIP training on a caption table (``sarmae finetune --task clip``): open_clip's model and its
contrastive loss (``open_clip.loss.ClipLoss``), resumable, distributed with torchrun.

``train_clip(cfg, output)`` is the work. The start: a CLIP package (``init``), a SARMAE encoder
as the image tower (``encoder``, ``sarmae_tower.py``), or the small config with random weights.
Images are read once through the package's input contract (``images.read_for_clip``) and kept in
memory; captions are tokenised once with the package's tokenizer. A step encodes only the UNIQUE
captions of its batch (template captions repeat) and spreads them back: the same loss, less text work.

Run folder ``<output>.run/``: ``config.yaml`` (``--resume`` refuses another), ``last.pt`` (plain
data: model, optimizer, epoch, step, RNG; ``training/checkpoint.py``), ``metrics.csv``. The data
order of an epoch is a function of (seed, epoch), each image's augmentation of (seed, epoch, row), so a
resumed run repeats the uninterrupted run's losses. With torchrun each rank takes its share of
every global batch and ClipLoss gathers the features of all ranks (the global contrastive batch).
At the end rank 0 scores the validation rows and writes the ``zeroshot`` package (the LAST
weights: the validation split is never used to choose among them, so it stays held out).
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from engine.errors import SarmaeError

from ..checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..data.scaling import item_rng
from ..distributed import DistInfo, all_mean, barrier, cleanup, init_distributed
from ..optim import lr_at, param_groups, set_lr
from .captions import read_table
from .config import ClipTrainConfig, small_clip_config
from .evaluate import embed_images, table_metrics
from .images import augment, read_for_clip

log = logging.getLogger("sarmae.clip")
METRIC_FIELDS = ["step", "epoch", "lr", "loss", "logit_scale", "pairs_per_s", "val_loss", "val_top1", "val_r5"]


def start_model(cfg: ClipTrainConfig):
    """(open_clip model, card) to train: from a package, a SARMAE encoder, or the small config."""
    from engine.clip import build_clip, clip_card, load_clip

    if cfg.init:
        c = load_clip(cfg.init)
        return c.model.train(), c.card
    if cfg.encoder:
        from .sarmae_tower import sarmae_clip

        return sarmae_clip(cfg)
    config = {**small_clip_config(cfg.img_size), **cfg.model}
    card = clip_card("sarclip-small", config=config, source="db", bands=list(cfg.bands),
                     templates=list(cfg.templates) or None)
    torch.manual_seed(cfg.seed)
    return build_clip(card), card


class PairData:
    """The prepared images of one split with their caption ids and token table."""

    def __init__(self, table, card, tokenizer) -> None:
        from engine.clip import tokenize

        im = read_for_clip(table.images, card)
        self.x = im.x
        self.bad = im.bad
        keep = im.keep.tolist()
        self.captions = [table.captions[i] for i in keep]
        self.classes = [table.classes[i] for i in keep]
        self.sources = [table.sources[i] for i in keep]
        unique = sorted(set(self.captions))
        self.caption_id = torch.tensor([unique.index(c) for c in self.captions])
        self.tokens = tokenize(tokenizer, unique, f"captions of {table.path}") if unique else None

    def __len__(self) -> int:
        return len(self.x)


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def contrastive_step(model, loss_fn, x: torch.Tensor, caption_id: torch.Tensor, tokens: torch.Tensor):
    """The loss of one (local) batch; the text tower runs on the batch's unique captions only.
    ``loss_fn``: open_clip's ClipLoss (every row its own positive), or ``caption_loss``."""
    uniq, inverse = torch.unique(caption_id, return_inverse=True)
    img, txt, scale = model(x, tokens[uniq])[:3]
    if loss_fn is caption_loss:
        return caption_loss(img, txt, inverse, scale), scale
    return loss_fn(img, txt[inverse], scale), scale


def caption_loss(img: torch.Tensor, txt: torch.Tensor, inverse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Contrastive loss over a batch's UNIQUE captions: image -> text is cross-entropy over the
    distinct captions (its own caption the target); text -> image gives each caption all the images
    it describes as positives (the mean log-probability over them). With template captions many rows
    share one text: ClipLoss would push images with the same caption apart; this does not."""
    logits = scale * img @ txt.T  # (B, U)
    to_text = nn.functional.cross_entropy(logits, inverse)
    pos = nn.functional.one_hot(inverse, txt.shape[0]).T.float()  # (U, B)
    logp = torch.log_softmax(logits.T, dim=1)
    to_image = -((logp * pos).sum(1) / pos.sum(1)).mean()
    return (to_text + to_image) / 2


def _check_run(run: Path, cfg: ClipTrainConfig, resume: bool) -> dict | None:
    import yaml

    saved, last = run / "config.yaml", run / "last.pt"
    free = {"epochs", "max_minutes", "max_steps", "checkpoint_every_steps", "device"}
    if resume:
        if not last.exists():
            raise SarmaeError(f"{run}: nothing to resume (no last.pt); start without --resume")
        old = yaml.safe_load(saved.read_text()) if saved.exists() else {}
        diffs = [k for k in set(old) | set(cfg.to_dict()) if k not in free and old.get(k) != cfg.to_dict().get(k)]
        if diffs:
            raise SarmaeError(f"{run}: --resume with different settings ({', '.join(sorted(diffs))}); resume with "
                              "the run's own settings or write another package")
        return load_checkpoint(last)
    if last.exists():
        raise SarmaeError(f"{run} holds a CLIP run already; pass --resume to continue it or choose another --output")
    return None


def train_clip(cfg: ClipTrainConfig, output: str | Path, resume: bool = False, overwrite: bool = False,
               progress: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) and write the zeroshot package ``output``; returns the result (rank 0)."""
    cfg.validate()
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    info = init_distributed(want)
    device = f"cuda:{info.local_rank}" if want.startswith("cuda") else want
    try:
        return _train(cfg, Path(output), resume, overwrite, progress, info, device)
    finally:
        cleanup(info)


def _train(cfg: ClipTrainConfig, output: Path, resume: bool, overwrite: bool, progress, info: DistInfo,
           device: str) -> dict:
    import yaml
    from open_clip.loss import ClipLoss

    from engine.clip import clip_model

    if output.exists() and not overwrite and not resume:
        raise SarmaeError(f"{output} exists; pass --overwrite to replace it or choose another --output")
    run = output.with_name(output.name + ".run")
    state = _check_run(run, cfg, resume) if info.is_main else None
    barrier(info)
    if state is None and resume:
        state = load_checkpoint(run / "last.pt")
    t0, cpu0 = time.time(), time.process_time()
    model, card = start_model(cfg)
    clip = clip_model(model, card)
    table = read_table(cfg.pairs)
    train = PairData(table.subset(cfg.train_split or None), card, clip.tokenizer)
    val_table = table.subset(cfg.val_split) if cfg.val_split else None
    val = PairData(val_table, card, clip.tokenizer) if val_table is not None and len(val_table) else None
    local = cfg.batch_size // info.world_size
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch < 1 or local < 2:
        raise SarmaeError(f"{cfg.pairs}: {len(train)} training rows make no batch of {cfg.batch_size} over "
                          f"{info.world_size} process(es); lower --batch-size or add captions")
    total = steps_per_epoch * cfg.epochs
    model.to(device)
    opt = torch.optim.AdamW(param_groups([model], cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    epoch, step = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        epoch, step = state["epoch"], state["step"]
        set_rng_state(state["rng"])
    net = nn.parallel.DistributedDataParallel(model) if info.active else model
    if cfg.loss == "captions" and info.world_size > 1:
        raise SarmaeError("loss 'captions' runs in one process (the batch's captions are not gathered over ranks); "
                          "use loss 'pairs' under torchrun")
    loss_fn = caption_loss if cfg.loss == "captions" else ClipLoss(gather_with_grad=True, rank=info.rank,
                                                                   world_size=info.world_size)
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
        _start_metrics(run / "metrics.csv", step if state is not None else None)
        log.info("CLIP training on %d pairs (%d unique captions), %d validation rows; %d steps/epoch x %d epochs, "
                 "batch %d over %d process(es), device %s%s", len(train), len(train.tokens), len(val or []),
                 steps_per_epoch, cfg.epochs, cfg.batch_size, info.world_size, device,
                 f"; resumed at epoch {epoch} step {step}" if state is not None else "")
    deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes else None
    last_loss, stop = None, False

    def checkpoint() -> None:
        if info.is_main:
            save_checkpoint(run / "last.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                              "epoch": epoch, "step": step, "rng": rng_state(),
                                              "config": cfg.to_dict()})

    while epoch < cfg.epochs and not stop:
        order = _order(len(train), cfg.seed, epoch)
        net.train()
        t_win, n_win = time.time(), 0
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size][info.rank::info.world_size][:local]
            x = train.x[idx].float()
            if cfg.augment:  # per sample: the same views whatever the ranks or a resume
                x = augment(x, [item_rng(cfg.seed, epoch, int(i), stream=7) for i in idx])
            set_lr(opt, lr_at(step, total, cfg.warmup_steps, cfg.lr, cfg.min_lr))
            loss, scale = contrastive_step(net, loss_fn, x.to(device), train.caption_id[idx], train.tokens.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # CLIP's clamp of the temperature (logit scale <= 100)
                model.logit_scale.clamp_(0, float(np.log(100)))
            step += 1
            n_win += 1
            last_loss = all_mean(float(loss.detach()), info)  # this step's loss (mean over the ranks)
            row = {"step": step, "epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": last_loss,
                   "logit_scale": float(scale.detach()), "total_steps": total,
                   "pairs_per_s": n_win * cfg.batch_size / max(1e-9, time.time() - t_win),
                   "elapsed_s": time.time() - t0}
            stop = bool((cfg.max_steps and step >= cfg.max_steps) or (deadline and time.time() > deadline))
            if info.is_main:  # the validation scores on each epoch's last row
                _log_row(run, row, clip, val, device, stop or b == steps_per_epoch - 1)
                if progress is not None:
                    progress(row)
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                checkpoint()
            if stop:
                break
        if not stop:
            epoch += 1
        checkpoint()
        barrier(info)
    result = {}
    if info.is_main:
        result = _finish(cfg, output, overwrite, resume, run, clip, val, train, table, epoch, step, last_loss,
                         (t0, cpu0), info)
    barrier(info)
    return result


def _val_scores(clip, val: PairData | None, device: str) -> dict:
    from open_clip.loss import ClipLoss

    if val is None or len(val) < 2:
        return {}
    clip.model.eval()
    img = embed_images(clip.model, val.x)
    m = table_metrics(clip, img, val.captions, val.classes, val.sources)
    with torch.no_grad():
        n = min(len(val), 512)
        loss, _ = contrastive_step(clip.model, ClipLoss(), val.x[:n].float().to(device),
                                   val.caption_id[:n], val.tokens.to(device))
    clip.model.train()
    top1 = [z["top1"] for z in m["zeroshot"].values()]
    return {"val_loss": float(loss), "val_top1": float(np.mean(top1)) if top1 else None,
            "val_r5": m["retrieval"]["mean_r5"], "metrics": m}


def _start_metrics(path: Path, resumed_step: int | None) -> None:
    """A new metrics.csv, or on resume the old one without the rows after the checkpoint's step."""
    rows = []
    if resumed_step is not None and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= resumed_step]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([METRIC_FIELDS, *rows])


def _log_row(run: Path, row: dict, clip, val, device, validate: bool) -> None:
    """One step's row in metrics.csv; with ``validate`` also the validation scores (and a log line)."""
    scores = _val_scores(clip, val, device) if validate else {}
    row = {**row, **{k: v for k, v in scores.items() if k != "metrics"}}
    with open(run / "metrics.csv", "a", newline="") as f:
        csv.writer(f).writerow([row.get(k, "") for k in METRIC_FIELDS])
    if not validate:
        return
    per_source = scores.get("metrics", {}).get("zeroshot", {})
    top1 = ", ".join(f"{k} {v['top1']:.3f}" for k, v in per_source.items())
    log.info("epoch %s step %s: loss %.4f%s", row.get("epoch"), row.get("step"), row.get("loss") or float("nan"),
             f"; validation zero-shot top-1 {top1}, retrieval recall@5 {row['val_r5']:.3f}" if per_source else "")


def _finish(cfg, output, overwrite, resume, run, clip, val, train, table, epoch, step, last_loss, clock,
            info) -> dict:
    t0, cpu0 = clock  # wall-clock and CPU time at the start
    from engine.clip import save_clip_package

    scores = _val_scores(clip, val, str(next(clip.model.parameters()).device))
    metrics = scores.get("metrics", {})
    for z in metrics.get("zeroshot", {}).values():
        z.pop("confusion", None)
    provenance = {"trained_by": "sarmae finetune --task clip", "pairs": str(table.path), "train_rows": len(train),
                  "val_rows": len(val or []), "skipped_rows": table.skipped, "unreadable_chips": len(train.bad),
                  "epochs": epoch, "steps": step, "batch_size": cfg.batch_size, "processes": info.world_size,
                  "minutes": round((time.time() - t0) / 60, 2), "last_loss": last_loss,
                  "cpu_minutes": round((time.process_time() - cpu0) / 60, 2),  # this process (rank 0), all threads
                  "start": cfg.init or cfg.encoder or "random", "config": cfg.to_dict(),
                  "metrics": {"validation": metrics}}
    card = clip.card
    card.provenance.update(provenance)
    clip.model.eval()
    extra = {}
    if (run / "metrics.csv").exists():
        extra["metrics.csv"] = (run / "metrics.csv").read_bytes()
    path = save_clip_package(clip.model.cpu(), card, output, overwrite=overwrite or resume, extra_files=extra)
    return {"package": str(path), "run": str(run), "epochs": epoch, "steps": step, "last_loss": last_loss,
            "minutes": provenance["minutes"], "cpu_minutes": provenance["cpu_minutes"], "validation": metrics}
