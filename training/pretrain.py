"""SARMAE pretraining: MAE + SARE (+ SARC), resumable, distributed with torchrun.

``pretrain(cfg, resume)`` is the work; ``sarmae pretrain`` only translates arguments. One process
or many (``torchrun --nproc_per_node N``): DDP with gloo on CPU, nccl on GPU; logging and
checkpoints on rank 0.

Reproducibility: the data order comes from the sampler (seed, epoch); SARE noise and MAE masks are
drawn per SAMPLE from generators seeded by (seed, epoch, dataset index). A resumed run therefore
repeats the uninterrupted run's losses, and N processes see the same noise as one process with
the same global batch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from engine.errors import SarmaeError
from engine.models import DecoderConfig, MaskedAutoencoderViT, SARCProjectionHead, sarc_loss
from engine.models.registry import arch_encoder_config

from .acquisition import acquisition_jitter
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, PretrainConfig, same_config, save_config
from .data.sare import SAREConfig, apply_sare
from .distributed import DistInfo, all_mean, barrier, cleanup, init_distributed
from .feedback import MetricsLog, plot_curves, reconstruction_grid
from .optim import lr_at, param_groups, set_lr

log = logging.getLogger("sarmae.pretrain")
NORM_MEAN, NORM_STD = 0.5, 0.5  # SARMAE: [0, 1] -> [-1, 1]


def sample_seed(seed: int, epoch: int, index: int, salt: str) -> int:
    h = hashlib.blake2b(f"{seed}/{epoch}/{index}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


class PretrainModule(nn.Module):
    """MAE (+ SARC head): one module so DDP synchronises both."""

    def __init__(self, cfg: PretrainConfig, teacher_dim: int = 768):
        super().__init__()
        m = cfg.model
        overrides = {"img_size": m.img_size, "in_chans": m.in_chans, "drop_path_rate": m.drop_path}
        if m.depth:
            overrides["depth"] = m.depth
        try:
            enc = arch_encoder_config(m.arch, **overrides)
        except SarmaeError as e:
            raise ConfigError(f"model.arch: {e}") from None
        dec = DecoderConfig(embed_dim=m.decoder_dim, depth=m.decoder_depth, num_heads=m.decoder_heads,
                            norm_pix_loss=m.norm_pix_loss)
        self.mae = MaskedAutoencoderViT(enc, dec)
        self.sarc_head = SARCProjectionHead(enc.embed_dim, teacher_dim) if cfg.sarc.enabled else None

    def forward(self, noised, clean, mask_noise, mask_ratio, optical_tokens=None, paired=None):
        out = self.mae(noised, target=clean, mask_ratio=mask_ratio, noise=mask_noise)
        loss_sarc = None
        if self.sarc_head is not None and optical_tokens is not None:
            student = self.sarc_head(out.latent[:, 1:])
            teacher = torch.gather(optical_tokens, 1, out.ids_keep.unsqueeze(-1).expand(-1, -1, optical_tokens.shape[-1]))
            loss_sarc = sarc_loss(student, teacher, paired)
        return out, loss_sarc


def _device(name: str, info: DistInfo) -> str:
    if name == "auto":
        return f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    return name


def _amp(mode: str, device: str):
    if not device.startswith("cuda") or mode == "off":
        return None, False
    if mode in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


@dataclass
class Batch:
    noised: torch.Tensor
    clean: torch.Tensor
    mask_noise: torch.Tensor
    optical: torch.Tensor
    paired: torch.Tensor
    sigma: torch.Tensor


def prepare_batch(items: dict, indices: torch.Tensor, epoch: int, cfg: PretrainConfig, sare: SAREConfig,
                  n_tokens: int, device: str) -> Batch:
    """Acquisition jitter (``data.acquisition``), SARE noise and mask noise per sample (seeded by dataset
    index), then normalisation. The jittered chip is the clean target too: it is another view of the data."""
    clean01 = items["sar"].float()
    acq = float(cfg.data.get("acquisition") or 0.0)
    noised, sigmas, masks, cleans = [], [], [], []
    for i, idx in enumerate(indices.tolist()):
        x = clean01[i:i + 1]
        if acq:
            ga = torch.Generator().manual_seed(sample_seed(cfg.run.seed, epoch, idx, "acquisition"))
            if float(torch.rand(1, generator=ga)) < acq:
                x = acquisition_jitter(x, _unit_contract(x.shape[1]), generator=ga)
        cleans.append(x)
        g = torch.Generator().manual_seed(sample_seed(cfg.run.seed, epoch, idx, "sare"))
        y, s = apply_sare(x, sare, g)
        noised.append(y)
        sigmas.append(s)
        gm = torch.Generator().manual_seed(sample_seed(cfg.run.seed, epoch, idx, "mask"))
        masks.append(torch.rand(1, n_tokens, generator=gm))
    norm = lambda x: (x - NORM_MEAN) / NORM_STD  # noqa: E731
    clean01 = torch.cat(cleans)
    return Batch(norm(torch.cat(noised)).to(device), norm(clean01).to(device), torch.cat(masks).to(device),
                 items["optical"].float().to(device), items["paired"].bool().to(device), torch.cat(sigmas))


def _unit_contract(c: int) -> dict:
    """The [0, 1] pretraining values as an input contract for ``acquisition_jitter``: a gain moves them
    as dB over the default 45 dB clip range would (8-bit chips are displayed on a log-like scale too)."""
    return {"mean": [0.0] * c, "std": [1.0] * c, "units": "db", "clip": [-35.0, 10.0]}


class _Indexed(torch.utils.data.Dataset):
    """Adds the dataset index to each item (per-sample seeds)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        item["index"] = i[1] if isinstance(i, tuple) else i  # the sampler yields (epoch, index) keys
        return item


def _collate(items: list[dict]) -> dict:
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], (int, bool)):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def input_contract(cfg: PretrainConfig, scaling: str, clip_db: tuple[float, float]) -> dict:
    """The engine input contract the data's [0, 1] scaling implies (for packages made from the run).

    scaling (``PretrainDataset.input_scaling()``): uint8 -> x/255 (8-bit display chips); uint16 ->
    x/65535 (DN, read as amplitude); db (calibrated data in dB, clipped to clip_db); mixed -> db.
    """
    units, clip = {"uint8": ("uint8", (0.0, 255.0)), "uint16": ("amplitude", (0.0, 65535.0))}.get(
        scaling, ("db", tuple(clip_db)))
    c = cfg.model.in_chans
    bands = ["VV", "VH"][:c] if c <= 2 else [f"band{i + 1}" for i in range(c)]
    return {"bands": bands, "units": units, "clip": [float(clip[0]), float(clip[1])], "mean": [NORM_MEAN] * c,
            "std": [NORM_STD] * c, "nodata": "mask", "pixel_spacing_m": None, "pretraining_scaling": scaling}


def load_init(module: PretrainModule, path: str) -> str:
    """Start the MAE from a package or checkpoint (e.g. an ImageNet MAE); refuse < 90 % of the encoder."""
    from engine.convert import (
        adapt_patch_embed,
        extract_state_dict,
        find_encoder_prefix,
        safe_load_checkpoint,
    )
    from engine.models.pos_embed import resample_pos_embed
    from engine.models.vit import input_conv_key
    from engine.package import load_state_dict

    p = Path(path)
    sd = load_state_dict(p)[1] if (p / "model.json").exists() or p.suffix == ".zip" else extract_state_dict(safe_load_checkpoint(p))
    prefix = find_encoder_prefix(sd.keys())
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    mae = module.mae
    key = input_conv_key(mae.cfg.stem)
    if key in sd:
        sd[key] = adapt_patch_embed(sd[key], mae.in_chans)
    for key, table in (("pos_embed", mae.pos_embed), ("decoder_pos_embed", mae.decoder_pos_embed)):
        if key in sd and sd[key].shape != table.shape and sd[key].shape[-1] == table.shape[-1]:
            sd[key] = resample_pos_embed(sd[key], mae.grid)
    target = mae.state_dict()
    loaded = {k: v for k, v in sd.items() if k in target and v.shape == target[k].shape}
    enc_keys = [k for k in target if not k.startswith(("decoder", "mask_token"))]
    frac = sum(k in loaded for k in enc_keys) / len(enc_keys)
    if frac < 0.9:
        raise SarmaeError(f"{path}: only {100 * frac:.0f} % of the encoder's tensors match this model "
                          f"({cfg_name(mae)}); check model.arch / in_chans")
    mae.load_state_dict(loaded, strict=False)
    return f"initialised from {p.name}: {len(loaded)}/{len(target)} tensors ({100 * frac:.0f} % of the encoder)"


def cfg_name(mae) -> str:
    c = mae.cfg
    return f"width {c.embed_dim}, depth {c.depth}, {c.in_chans} channel(s)"


def pretrain(cfg: PretrainConfig, resume: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) a pretraining run; returns a summary dict (rank 0) with the final losses."""
    from .data import build_pretrain_data, worker_init_fn
    from .data.config import DataConfig

    info = init_distributed(cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    device = _device(cfg.run.device, info)
    out = Path(cfg.run.output)
    try:
        return _pretrain(cfg, resume, progress, info, device, out, build_pretrain_data, worker_init_fn, DataConfig)
    finally:
        cleanup(info)


def _check_output(cfg: PretrainConfig, out: Path, resume: bool) -> dict | None:
    import yaml

    last = out / "last.pt"
    saved = out / "config.yaml"
    if resume:
        if not last.exists():
            raise SarmaeError(f"{out}: nothing to resume (no last.pt); start without --resume")
        old = yaml.safe_load(saved.read_text()) if saved.exists() else {}
        diffs = same_config(old, cfg.to_dict())
        if diffs:
            raise ConfigError(f"{out}: --resume with a different config ({'; '.join(diffs[:5])}); resume with the "
                              f"run's own config: 'sarmae pretrain --output {out} --resume' (no --config, --data or "
                              "overrides: it reads config.yaml there), or start a new output folder")
        return load_checkpoint(last)
    if last.exists() or saved.exists():
        old = yaml.safe_load(saved.read_text()) if saved.exists() else {}
        diffs = same_config(old, cfg.to_dict()) if old else []
        what = f"a run with a different config ({'; '.join(diffs[:3])})" if diffs else "a run"
        raise SarmaeError(f"{out} already holds {what}; pass --resume to continue it or choose another --output")
    return None


def _pretrain(cfg, resume, progress, info, device, out, build_pretrain_data, worker_init_fn, DataConfig) -> dict:
    torch.manual_seed(cfg.run.seed)
    state = _check_output(cfg, out, resume) if info.is_main else None
    barrier(info)
    if not info.is_main and resume:
        state = load_checkpoint(out / "last.pt")
    dc = DataConfig.from_dict({**cfg.data, "img_size": cfg.model.img_size, "in_chans": cfg.model.in_chans,
                               "seed": cfg.run.seed})
    if cfg.sarc.enabled and not dc.pairs:
        raise ConfigError("SARC is enabled but data.pairs (--pairs) is not set: give a paired index or sarc.enabled=false")
    teacher = None
    if cfg.sarc.enabled:  # checked before the data: a missing teacher is the cheaper error
        from .teacher import OpticalTeacher

        if not cfg.sarc.teacher_path:
            raise ConfigError("SARC is enabled but sarc.teacher_path is not set (a local ViT-B/16 weights file)")
        teacher = OpticalTeacher(cfg.sarc.teacher_path, cfg.sarc.teacher_mode, cfg.model.img_size).to(device)
    dataset, sampler = build_pretrain_data(dc, cfg.optim.batch_size, info.rank, info.world_size,
                                           epoch_size=cfg.run.epoch_size)
    contract = input_contract(cfg, dataset.input_scaling(), dc.clip_db)
    module = PretrainModule(cfg, teacher.dim if teacher is not None else 768).to(device)
    init_msg = load_init(module, cfg.model.init_from) if (cfg.model.init_from and state is None) else None
    module.mae.grad_checkpointing = cfg.optim.grad_checkpointing
    opt_modules = [module.mae] + ([module.sarc_head] if module.sarc_head is not None else [])
    optimizer = torch.optim.AdamW(param_groups(opt_modules, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas))
    amp_dtype, use_scaler = _amp(cfg.optim.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    model = module
    if info.active:
        model = nn.parallel.DistributedDataParallel(module, device_ids=[info.local_rank] if device.startswith("cuda") else None)
    steps_per_epoch = sampler.batches_per_epoch // cfg.optim.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch holds {sampler.batches_per_epoch} batch(es), fewer than optim.accum_steps "
                          f"({cfg.optim.accum_steps}); lower accum_steps or batch_size")
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    epoch, step, skipped = 0, 0, 0
    if state is not None:
        module.mae.load_state_dict(state["model"])
        if module.sarc_head is not None and state.get("sarc_head"):
            module.sarc_head.load_state_dict(state["sarc_head"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step, skipped = state["epoch"], state["step"], state.get("skipped", 0)
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        metrics = MetricsLog(out, resume)
        if resume:
            metrics.truncate_after(step)
        msg = (f"pretraining {cfg.model.arch} ({cfg.model.in_chans} ch, {cfg.model.img_size} px) on {len(dataset)} samples, "
               f"{steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs, global batch "
               f"{cfg.optim.batch_size * info.world_size * cfg.optim.accum_steps}, device {device}, "
               f"{info.world_size} process(es)" + (f"; resumed at epoch {epoch} step {step}" if resume else ""))
        log.info(msg)
        if init_msg:
            log.info(init_msg)
    sare = SAREConfig(**cfg.sare)
    n_tokens = module.mae.grid[0] * module.mae.grid[1]
    t_start = time.time()
    deadline = t_start + 60 * cfg.run.max_minutes if cfg.run.max_minutes else None
    window = {"loss": 0.0, "mae": 0.0, "sarc": 0.0, "n": 0, "images": 0, "t": time.time()}
    last_loss = None
    stop = False
    preview_batch = None

    def checkpoint(name: str) -> None:
        if not info.is_main:
            return
        save_checkpoint(out / name, {
            "model": module.mae.state_dict(),
            "sarc_head": module.sarc_head.state_dict() if module.sarc_head is not None else {},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if use_scaler else {},
            "epoch": epoch, "step": step, "skipped": skipped, "sampler": sampler.state_dict(), "rng": rng_state(),
            "config": _plain_config(cfg), "sarmae_input": contract,
            "architecture": {"name": "mae_" + cfg.model.arch.replace("mae_", ""), "encoder": module.mae.cfg.to_dict(),
                             "decoder": module.mae.dec_cfg.to_dict()},
        })

    while epoch < cfg.optim.epochs and not stop:
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_size=cfg.optim.batch_size, sampler=sampler,
                                             num_workers=dc.num_workers, collate_fn=_collate, drop_last=True,
                                             worker_init_fn=partial(worker_init_fn, seed=cfg.run.seed, rank=info.rank),
                                             persistent_workers=False)
        module.train()
        micro = 0
        for items in loader:
            b = prepare_batch(items, items["index"], epoch, cfg, sare, n_tokens, device)
            if preview_batch is None and info.is_main:
                preview_batch = (b, items["index"][: cfg.run.preview_samples])
            optical_tokens = teacher(b.optical) if teacher is not None and b.paired.any() else None
            with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs, loss_sarc = model(b.noised, b.clean, b.mask_noise, cfg.model.mask_ratio,
                                           optical_tokens, b.paired)
            loss_mae = outputs.loss.float()
            if loss_sarc is not None and not torch.isfinite(loss_sarc):
                loss_sarc = None  # non-finite SARC term -> 0 for this batch
            loss = loss_mae + (cfg.sarc.weight * loss_sarc.float() if loss_sarc is not None else 0.0)
            finite = bool(torch.isfinite(loss))
            if finite:
                scaler.scale(loss / cfg.optim.accum_steps).backward()
            micro += 1
            if micro % cfg.optim.accum_steps:
                continue
            set_lr(optimizer, lr_at(step, total_steps, warmup, cfg.optim.lr, cfg.optim.min_lr))
            if finite:
                if cfg.optim.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                skipped += 1  # non-finite total loss: skip the step
            optimizer.zero_grad(set_to_none=True)
            step += 1
            sampler.advance(cfg.optim.accum_steps)
            window["loss"] += float(loss.detach()) if finite else 0.0
            window["mae"] += float(loss_mae.detach())
            window["sarc"] += float(loss_sarc.detach()) if loss_sarc is not None else 0.0
            window["n"] += 1
            window["images"] += b.clean.shape[0] * cfg.optim.accum_steps * info.world_size
            if step % cfg.run.log_every_steps == 0 or step == total_steps:
                n = window["n"]
                row = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                       "loss": all_mean(window["loss"] / n, info), "loss_mae": all_mean(window["mae"] / n, info),
                       "loss_sarc": all_mean(window["sarc"] / n, info) if cfg.sarc.enabled else None,
                       "images_per_s": window["images"] / max(1e-9, time.time() - window["t"]), "skipped_steps": skipped}
                last_loss = row["loss"]
                if info.is_main:
                    metrics.log(row)
                if progress is not None and info.is_main:
                    progress({**row, "total_steps": total_steps, "elapsed_s": time.time() - t_start})
                window = {"loss": 0.0, "mae": 0.0, "sarc": 0.0, "n": 0, "images": 0, "t": time.time()}
            if cfg.run.checkpoint_every_steps and step % cfg.run.checkpoint_every_steps == 0:
                checkpoint("last.pt")
            if (cfg.run.max_steps and step >= cfg.run.max_steps) or (deadline and time.time() > deadline):
                stop = True
                break
        if not stop:
            epoch += 1
            sampler.set_epoch(epoch)
        checkpoint("last.pt")
        if info.is_main and not stop:
            if cfg.run.checkpoint_every_epochs and epoch % cfg.run.checkpoint_every_epochs == 0:
                checkpoint(f"checkpoint-{epoch:04d}.pt")
            _epoch_pictures(module, preview_batch, cfg, out, epoch)
        barrier(info)
    if info.is_main:
        _epoch_pictures(module, preview_batch, cfg, out, epoch)
        metrics.close()
    return {"epoch": epoch, "step": step, "last_loss": last_loss, "skipped_steps": skipped, "output": str(out),
            "minutes": (time.time() - t_start) / 60}


def _plain_config(cfg: PretrainConfig) -> dict:
    d = cfg.to_dict()
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return d


@torch.no_grad()
def _epoch_pictures(module: PretrainModule, preview, cfg: PretrainConfig, out: Path, epoch: int) -> None:
    if (out / "metrics.csv").exists():
        plot_curves(out / "metrics.csv", out / "loss_curves.png")
    if preview is None:
        return
    b, _ = preview
    k = min(cfg.run.preview_samples, b.clean.shape[0])
    was = module.training
    module.eval()
    o = module.mae(b.noised[:k], target=b.clean[:k], mask_ratio=cfg.model.mask_ratio, noise=b.mask_noise[:k])
    pred = o.pred
    if module.mae.dec_cfg.norm_pix_loss:
        t = module.mae.patchify(b.clean[:k])
        pred = pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True)
    m = o.mask.unsqueeze(-1)
    recon = module.mae.unpatchify(module.mae.patchify(b.noised[:k]) * (1 - m) + pred * m, o.grid)
    reconstruction_grid(b.noised[:k].cpu(), b.clean[:k].cpu(), recon.cpu(), o.mask.cpu(), module.mae.patch_size,
                        out / "reconstructions.png")
    module.train(was)
