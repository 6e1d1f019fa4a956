"""Typed settings of a CLIP training run (``sarmae finetune --task clip``), one comment per field,
and the small open_clip model this project trains on CPUs (``small_clip_config``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from engine.errors import SarmaeError

LOSSES = ("pairs", "captions")


class ClipConfigError(SarmaeError, ValueError):
    """CLIP training settings that cannot be used."""


def small_clip_config(img_size: int = 64, embed_dim: int = 128, vision_width: int = 16, text_width: int = 128,
                      text_layers: int = 3, context_length: int = 32) -> dict:
    """An open_clip config: a ModifiedResNet image tower (one block per stage, ``vision_width`` base
    channels; its input a multiple of 32) and a small causal text transformer over open_clip's BPE
    vocabulary (captions here are short: 32 tokens). About 8 M parameters, 6.3 M of them the token
    embedding; a step of 128 pairs at 64 px takes ~2 s on one CPU thread."""
    if img_size % 32:
        raise ClipConfigError(f"img_size {img_size}: the ResNet image tower needs a multiple of 32 (e.g. 64, 96)")
    return {"embed_dim": embed_dim,
            "vision_cfg": {"layers": [1, 1, 1, 1], "width": vision_width, "image_size": img_size},
            "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                         "heads": max(1, text_width // 32), "layers": text_layers}}


@dataclass
class ClipTrainConfig:
    pairs: str = ""  # caption table (CSV: image, caption[, class, source, split]) from 'sarmae captions'
    init: str = ""  # a CLIP (zeroshot) package to start from; "" = the small model with random weights
    encoder: str = ""  # a SARMAE encoder package as the image tower (with open_clip's small text tower)
    model: dict = field(default_factory=dict)  # open_clip config overriding small_clip_config (random start)
    img_size: int = 64  # image tower input (random start; a package keeps its own)
    bands: list[str] = field(default_factory=lambda: ["VV"])  # the package's input bands (random start)
    epochs: int = 30  # maximum epochs (max_minutes may end sooner)
    batch_size: int = 128  # pairs per step over all processes (the contrastive batch)
    lr: float = 1e-3  # peak learning rate (AdamW), after warm-up, cosine to min_lr
    min_lr: float = 1e-5
    warmup_steps: int = 50  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW decay (none on biases, norms, embeddings, logit scale)
    augment: bool = True  # random flips / 90-degree rotations of the images
    loss: str = "pairs"  # pairs: open_clip's ClipLoss (each row its own positive); captions: rows with the
    # same caption text are positives of each other (no false negatives among template captions; one process)
    train_split: str = "train"  # rows of the table trained on ("" = all rows)
    val_split: str = "val"  # rows scored after each epoch (curves only: the last weights are kept)
    max_minutes: float | None = None  # wall-clock budget; the run stops after the step that crosses it
    max_steps: int | None = None  # stop after this many steps (tests, smoke runs)
    checkpoint_every_steps: int = 0  # also write last.pt every N steps (0: at the end of each epoch)
    seed: int = 0  # data order, augmentation, initialisation
    device: str = "auto"  # auto | cpu | cuda
    templates: list[str] = field(default_factory=list)  # the package's prompt templates ([] = engine defaults)

    @classmethod
    def from_dict(cls, d: dict) -> ClipTrainConfig:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ClipConfigError(f"unknown CLIP training options {bad}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        problems = []
        if not self.pairs:
            problems.append("give the caption table (--pairs CSV)")
        if self.init and self.encoder:
            problems.append("give one start: --init CLIP_PACKAGE or --encoder SARMAE_PACKAGE (not both)")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (a contrastive batch), not {self.batch_size}")
        if self.epochs < 1 or self.lr <= 0:
            problems.append(f"epochs must be >= 1 and lr > 0 (got {self.epochs}, {self.lr})")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if problems:
            raise ClipConfigError("CLIP training settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)
