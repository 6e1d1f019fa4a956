"""The records of one inference run: its options, its result and what a task sees of it.

Kept in a module of their own (plain dataclasses, no heavy imports) so that the pipeline
(``engine.inference``), the tasks (``engine.tasks``) and the scale-out (``engine.distributed``)
all import them without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SarmaeError
from .tiling import Window

if TYPE_CHECKING:  # types only: no import at run time
    from .card import ModelCard
    from .radiometry import Radiometry
    from .reader import SarRaster

ProgressFn = Callable[[float, str], None]
DEFAULT_SCORE_THRESHOLD = 0.3  # detect: the score a learned detector's boxes need when none is given
CancelFn = Callable[[], bool]


@dataclass
class InferenceOptions:
    """Options of one run; every field has a command-line flag of the same name."""

    window: int | None = None  # window size in px (default: the model's input size)
    overlap: float | None = None  # fraction of the window shared by neighbours (default: the task's, 0.25; classify 0)
    batch_size: int = 4  # windows per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    backend: str = "auto"  # auto | torch | onnxruntime
    precision: str = "auto"  # fp32 | int8 (the package's model.int8.onnx) | auto (int8 when present on an int8-capable CPU)
    threads: int | None = None  # CPU threads for the backend (default: torch/onnxruntime's own)
    bands: list[int | str] | None = None  # band indexes (1-based) or polarisation names, in model order
    input_units: str | None = None  # override unit detection: db | linear_power | amplitude | uint8
    complex_mode: str = "intensity"  # complex (SLC) bands -> intensity |z|^2 or amplitude |z|
    vector: bool = False  # segment: also write polygons (GeoPackage)
    min_area_px: int = 0  # segment vectors: drop regions smaller than this many pixels
    probabilities: bool = False  # segment: also write per-class probabilities
    score_threshold: float | None = None  # detect: keep boxes scoring at least this (None: the package's own:
    # DEFAULT_SCORE_THRESHOLD for a model, a CFAR card's score_threshold)
    nms_iou: float = 0.5  # detect: IoU above which overlapping boxes of one class are merged
    mask_ratio: float = 0.75  # reconstruct: fraction of patches hidden from the encoder
    water_mask: str | None = None  # detect (CFAR): boxes only on water: a mask raster on the input's grid, or a
    # segmentation package run first
    water_class: str | None = None  # the mask's water: the package's class (default water/sea/ocean), or raster
    # value(s) "1" / "1,2" (default 1)
    classes: list[str] | None = None  # zeroshot: the class names to tell apart (typed at run time)
    templates: list[str] | None = None  # zeroshot: prompt templates with one {} (default: the package's)
    query: list[str] | None = None  # textquery (zeroshot packages): phrases, one similarity band each
    cog: bool = False  # write Cloud-Optimised GeoTIFFs
    overwrite: bool = False  # replace existing outputs
    extent: tuple[int, int, int, int] | None = None  # (row_off, col_off, height, width) subset in px

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InferenceOptions:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SarmaeError(f"unknown inference options {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


@dataclass
class InferenceResult:
    """The result record (JSON-serialisable): what was written and what was measured."""

    task: str
    outputs: dict[str, str]  # role -> path (class, confidence, vectors, detections, ...)
    classes: list[dict] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunContext:
    """What a task's sink needs to know about the run."""

    raster: SarRaster  # the open input (one raster, or single-band rasters stacked as channels)
    card: ModelCard  # the package's model card
    radiometry: Radiometry | None  # how raw pixels become model input (None when merging parts)
    output: Path  # the main output; extra outputs are written beside it
    options: InferenceOptions
    size: int  # model window in px
    tags: dict[str, str]  # provenance tags for every raster output
    region: Window  # the part of the raster being processed
    say: Callable[[str], None]  # log a line for the user (and the result record)
