"""Typed settings of a fine-tuning run (one comment per field)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# detection's default peak lr: its RPN and box heads start from random weights and learn about ten
# times too slowly at the classification rule's 3e-5 for batch 8 (synthetic ships, 6 CPU epochs:
# mAP@0.5 0.36 there, 0.97 at 3e-4); 3e-4 is within AdamW detection fine-tuning's usual 1e-4..1e-3.
DETECT_LR = 3e-4


@dataclass
class FinetuneConfig:
    task: str = "classify"  # classify | segment | detect
    encoder: str = ""  # encoder package (task embed) or any package with a ViT encoder; "" = random init
    arch: str = "vit_tiny_patch16"  # encoder architecture when starting from random weights
    img_size: int | None = None  # model input size (None: the encoder's)
    in_chans: int | None = None  # channels (None: the encoder's)
    mode: str = "auto"  # head: quick, a light head on the frozen encoder; full: fine-tune it all; auto: by label count
    seg_head: str = "light"  # segment, full fine-tune: light (per-pixel head, fast on CPUs) | upernet (pyramid + UPerNet)
    linear_probe: bool = False  # freeze the encoder, train the head only (by gradient descent, as a full fine-tune)
    freeze_epochs: int = 0  # epochs with a frozen encoder before full fine-tuning
    epochs: int = 50  # maximum epochs (early stopping and --max-minutes may end sooner)
    batch_size: int = 32  # samples per step
    lr: float | None = None  # peak lr (None: base_lr x batch / 256; detection: DETECT_LR)
    base_lr: float = 1e-3  # classification reference: 1e-3 x batch / 256
    layer_decay: float | None = None  # layer-wise lr decay; None: the task's default (classify 0.75, dense 0.9)
    weight_decay: float = 0.05  # AdamW decay (none on biases, norms, embeddings)
    warmup_epochs: float = 5.0  # linear warm-up, then cosine to min_lr
    min_lr: float = 1e-6
    label_smoothing: float = 0.1  # classification
    drop_path: float = 0.1  # stochastic depth of the encoder
    shots: int | None = None  # classification: N training samples per class (None: all)
    val_fraction: float = 0.2  # held-out share for validation (per class, or by spatial blocks)
    seed: int = 0  # data split, shots and initialisation
    max_minutes: float | None = None  # wall-clock budget: the best model found in time is kept
    patience: int = 10  # early stopping: epochs without a better validation metric
    num_workers: int = 0  # data-loader workers
    device: str = "auto"  # auto | cpu | cuda
    augment: bool = True  # random flips / 90-degree rotations (SAR has no preferred orientation)
    acquisition: bool = False  # classify with augment: random acquisition shifts (training.acquisition) beside the gain
    acquisition_warp: float = 0.5  # with acquisition: the share of chips also resampled (zoom, rotation, translation)
    gain_db: float = 2.0  # classify/segment with augment: random gain per chip within +-gain_db dB (0: off)
    standardise: str = "auto"  # classify: median (chip in dB minus its median, / 10 dB), iqr, none; auto: median for 8-bit
    smooth: float | None = None  # classify with standardise: Gaussian sigma (px) of the standardised chip (0: off; None: SMOOTH_DEFAULT)
    pool: str = "blocks"  # classify: blocks (mean + max of the last 4 blocks' tokens, the default) | mean (last block's)
    baselines: bool = False  # classify: also train the small-CNN baseline on the same chips and budget (its row)
    bands: list[int | str] | None = None  # rasters: bands in the encoder's order, 1-based indexes or names (as infer)
    input_units: str | None = None  # what the data holds, overriding detection: db | linear_power | amplitude | uint8
    class_weights: str | list[float] | None = None  # segment: None, "auto" (inverse pixel frequency) or one per class
    max_chips: int = 2000  # rasters: at most this many chips are sampled (seeded)
    export_onnx: bool = False  # also write model.onnx into the package (segment, classify)

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown fine-tuning options {sorted(bad)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def peak_lr(self) -> float:
        """The peak lr in force: the given one, else DETECT_LR for detection, else base_lr x batch / 256."""
        if self.lr:
            return self.lr
        return DETECT_LR if self.task == "detect" else self.base_lr * self.batch_size / 256

    @property
    def decay(self) -> float:
        """The layer decay in force: the given one, else 0.75 for classification, 0.9 for dense tasks."""
        if self.layer_decay is not None:
            return self.layer_decay
        return 0.75 if self.task == "classify" else 0.9
