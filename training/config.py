"""Typed configuration of a pretraining run: YAML preset -> command-line overrides -> resolved
config saved next to the outputs (``config.yaml`` in the run folder)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import SarmaeError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(SarmaeError, ValueError):
    """A preset, file or override is unknown or invalid."""


@dataclass
class ModelConfig:
    arch: str = "vit_tiny_patch16"  # encoder: vit_{tiny,small,base,large}_{patch,conv}{16,8} (conv: ConvStem)
    img_size: int = 224  # input size (pos-embed interpolated when it differs from a loaded encoder)
    in_chans: int = 1  # channels: 1 single pol / 8-bit chips, 2 VV+VH, 3 reference layout
    depth: int | None = None  # override the encoder depth (None: the named size's)
    decoder_dim: int = 512  # MAE decoder width (reference 512)
    decoder_depth: int = 8  # MAE decoder blocks (reference 8; 1-2 buys many more CPU epochs)
    decoder_heads: int = 16  # MAE decoder heads
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder
    norm_pix_loss: bool = False  # per-patch normalised target (off in SARMAE, on in MAE)
    drop_path: float = 0.0  # stochastic depth of the encoder
    init_from: str | None = None  # encoder/MAE package or checkpoint to start from (e.g. ImageNet MAE)


@dataclass
class SARCConfig:
    enabled: bool = False  # optical alignment (needs data.pairs and a teacher)
    teacher_path: str | None = None  # local ViT-B/16 weights (safetensors or .pth); never downloaded
    teacher_mode: str = "patchembed"  # patchembed (reference code) | full (paper)
    weight: float = 0.8  # w in L = L_MAE + w * L_SARC (reference 0.8; paper summary 0.1)


@dataclass
class OptimConfig:
    epochs: int = 300  # passes over an epoch of data
    batch_size: int = 64  # per process (global batch = batch_size * processes * accum_steps)
    accum_steps: int = 1  # gradient accumulation steps per optimizer step
    lr: float = 1e-4  # absolute peak learning rate
    min_lr: float = 0.0  # end of the half-cosine
    warmup_epochs: float = 1.0  # linear warm-up length in epochs
    weight_decay: float = 0.05  # AdamW decay (none on biases, norms, 1-D params, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    clip_grad: float | None = 1.0  # gradient-norm clipping (None: off)
    amp: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU) | bf16 | fp16 | off
    grad_checkpointing: bool = False  # recompute encoder blocks in backward to save memory


@dataclass
class RunConfig:
    output: str = "runs/pretrain"  # run folder: checkpoints, config.yaml, metrics.csv, PNGs
    seed: int = 0  # global seed (data order, SARE noise and masks are derived from it)
    device: str = "auto"  # auto | cpu | cuda
    epoch_size: int | None = None  # samples per epoch (None: the dataset's size)
    checkpoint_every_epochs: int = 10  # keep checkpoint-<epoch>.pt every N epochs
    checkpoint_every_steps: int = 0  # also refresh last.pt every N optimizer steps (0: epochs only)
    log_every_steps: int = 10  # CSV/TensorBoard scalars every N steps
    preview_samples: int = 4  # rows of the reconstruction PNG
    max_steps: int | None = None  # stop after this many optimizer steps (tests, budgets)
    max_minutes: float | None = None  # stop (with a checkpoint) after this wall time


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sare: dict = field(default_factory=lambda: {"enabled": True, "mode": "reference", "p_clean": 0.5, "sigma_max": 0.7})
    sarc: SARCConfig = field(default_factory=SARCConfig)
    data: dict = field(default_factory=dict)  # training.data.config.DataConfig fields
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"model": ModelConfig, "sarc": SARCConfig, "optim": OptimConfig, "run": RunConfig}


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _numbers(v: Any) -> Any:
    """YAML 1.1 reads '1e-3' as a string: turn number-looking strings into numbers, recursively."""
    if isinstance(v, str) and _NUMBER.match(v.strip()):
        f = float(v)
        return int(f) if f.is_integer() and not any(c in v for c in ".eE") else f
    if isinstance(v, dict):
        return {k: _numbers(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_numbers(x) for x in v]
    return v


def _parse_value(text: str) -> Any:
    return _numbers(yaml.safe_load(text))


def from_dict(d: dict) -> PretrainConfig:
    d = _numbers(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(PretrainConfig)}
    if unknown:
        raise ConfigError(f"unknown config sections {sorted(unknown)}; known: model, sare, sarc, data, optim, run")
    kw = {}
    for name, cls in _SECTIONS.items():
        sec = d.get(name) or {}
        bad = set(sec) - {f.name for f in dataclasses.fields(cls)}
        if bad:
            raise ConfigError(f"unknown {name} options {sorted(bad)}; known: {sorted(f.name for f in dataclasses.fields(cls))}")
        if name == "optim" and "betas" in sec:
            sec = {**sec, "betas": tuple(sec["betas"])}
        kw[name] = cls(**sec)
    kw["sare"] = {**PretrainConfig().sare, **(d.get("sare") or {})}
    kw["data"] = dict(d.get("data") or {})
    return PretrainConfig(**kw)


def load_config(preset_or_file: str | None, overrides: list[str] = ()) -> PretrainConfig:
    """A preset name (training/configs/<name>.yaml) or a YAML file, then ``section.key=value`` overrides."""
    d: dict = {}
    if preset_or_file:
        path = Path(preset_or_file)
        if not path.suffix:
            path = CONFIG_DIR / f"{preset_or_file}.yaml"
        if not path.is_file():
            presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"config '{preset_or_file}' not found: give a YAML file or a preset ({presets})")
        d = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. optim.lr=2e-4")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        d.setdefault(section, {})[name] = _parse_value(value)
    return from_dict(d)


def save_config(cfg: PretrainConfig, path: Path) -> None:
    d = cfg.to_dict()
    d["optim"]["betas"] = list(d["optim"]["betas"])
    path.write_text(yaml.safe_dump(d, sort_keys=False))


def same_config(a: dict, b: dict) -> list[str]:
    """Keys whose values differ, ignoring run-control fields that may change on resume."""
    free = {("run", "max_steps"), ("run", "max_minutes"), ("run", "output"), ("optim", "epochs")}
    diffs = []
    for sec in set(a) | set(b):
        sa, sb = a.get(sec) or {}, b.get(sec) or {}
        for k in set(sa) | set(sb):
            va, vb = sa.get(k), sb.get(k)
            if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
                va, vb = list(va), list(vb)
            if (sec, k) not in free and va != vb:
                diffs.append(f"{sec}.{k}: {va!r} -> {vb!r}")
    return sorted(diffs)
