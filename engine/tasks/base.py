"""The task protocol: what a task (segment, detect, classify, embed, reconstruct, ...) is to the engine.

A task is one class in one file of ``engine/tasks/`` (or of another package, registered through
the ``sarmae.tasks`` entry point group; see ``engine.tasks.registry``). It says

- what it plans: the windows over the region (``plan``, ``windows``; overlap default
  ``default_overlap``; a grid in pixels or, like embed, in tokens of ``unit`` pixels),
- what it writes: the main output (a GeoTIFF, or a GeoPackage when ``vector_output``) and the
  files beside it (``extra_outputs``),
- how a model runs on a batch: ``build_model`` (torch, from the card), ``forward`` (torch;
  also what is exported to ONNX when ``onnx``), ``to_numpy``; a task without a network
  (``needs_weights = False``) returns a backend of its own from ``backend`` and needs neither torch
  nor weights; one that reads the raster itself (``windowed = False``: the CFAR detector, by strips
  with its background margins) does its whole run in ``run_raster`` instead of windows and a sink,
- its sink (``make_sink``): ``windows``, ``consume(windows, outputs, valid)`` per batch, ``finish()``
  -> ``InferenceResult``, ``abort()`` (remove partial outputs; called on any failure or cancel),
- how per-rank parts merge under torchrun (``blended``, ``part_options``, ``merge``).

The pipeline (``engine.inference``) and the scale-out (``engine.distributed``) know nothing else
about a task. A METHOD of a task (``method``: ``detect`` + ``cfar``) is a task class registered as
``<task>.<method>`` and chosen by the card's architecture name (``engine.tasks.registry``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from ..tiling import TilePlan, Window, plan_tiles
from ..types import InferenceOptions, InferenceResult, RunContext
from .georef import Georef

if TYPE_CHECKING:
    from ..card import ModelCard
    from ..types import CancelFn, ProgressFn
    from .merging import MergeJob


class Sink(Protocol):
    """Where a task's model outputs go, batch by batch, until ``finish`` publishes the outputs.

    ``windows``: the windows to run, in order (relative to the region). ``consume`` gets each batch's
    windows, the backend's outputs for them and their valid masks (B, S, S) (False on padding and
    nodata). ``finish`` writes and publishes every output atomically and returns the result record;
    ``abort`` removes whatever was written (nothing is published before ``finish``).
    """

    windows: list[Window]

    def consume(self, windows: list[Window], outputs: Any, valid: np.ndarray) -> None: ...

    def finish(self) -> InferenceResult: ...

    def abort(self) -> None: ...


class Task:
    """Base class of the tasks; a task overrides ``make_sink`` and ``merge`` and sets its attributes."""

    name: ClassVar[str] = ""  # as written in model.json's "task"
    method: ClassVar[str | None] = None  # a method of the task, chosen by model.json's architecture name
    outputs: ClassVar[tuple[str, ...]] = ()  # what the model may return (model.json "output"); [0]: default
    needs_classes: ClassVar[bool] = False  # model.json must list classes
    needs_weights: ClassVar[bool] = True  # a network: weights, architecture.encoder, input (CFAR: False)
    needs_encoder: ClassVar[bool] = True  # the network is built on architecture.encoder (False: a network of
    # its own, described by the task's architecture fields, e.g. detect.cfar_scored's chip scorer)
    windowed: ClassVar[bool] = True  # runs window by window through a sink (False: ``run_raster``)
    vector_output: ClassVar[bool] = False  # the main output is a GeoPackage (else a GeoTIFF)
    blended: ClassVar[bool] = True  # overlapping windows are blended into rasters (distributed: see split_rows)
    onnx: ClassVar[bool] = False  # the model exports to / runs from model.onnx
    default_overlap: ClassVar[float] = 0.25  # when --overlap is not given
    # the int8 export's quality gate (``engine.quantize``): what ``agreement`` measures, and its floor
    agreement_metric: ClassVar[str | None] = None  # None: no int8 export for this task
    agreement_threshold: ClassVar[float] = 0.99

    REQUIRED: ClassVar[tuple[str, ...]] = ("make_sink", "merge")  # a plug-in must define these (not
    # windowed: run_raster)

    @classmethod
    def key(cls) -> str:
        """The registry name: the task's, or ``<task>.<method>`` for a method."""
        return f"{cls.name}.{cls.method}" if cls.method else cls.name

    @property
    def output_suffix(self) -> str:
        return ".gpkg" if self.vector_output else ".tif"

    def output_path(self, output) -> Path:
        """The main output: ``output`` with the task's suffix when it has none; another format's
        suffix (a segment output named .gpkg, a detect output named .tif) is refused with the name to
        give, rather than writing a file whose name says another format."""
        from ..errors import OutputError

        out = Path(output)
        if not out.suffix:
            return out.with_suffix(self.output_suffix)
        other = (".tif", ".tiff") if self.vector_output else (".gpkg",)  # a plug-in's own suffixes pass
        if out.suffix.lower() in other and out.suffix.lower() != self.output_suffix:
            what = "a GeoPackage of vectors" if self.vector_output else "a GeoTIFF"
            extra = ("; with --vector its polygons go beside it as " + out.with_suffix(".gpkg").name
                     if not self.vector_output and self.name == "segment" else "")
            raise OutputError(f"{out}: a {self.name} run writes {what}: name the output "
                              f"{out.with_suffix(self.output_suffix).name}{extra}")
        return out

    # ------------------------------------------------------------------ planning
    def plan(self, card: ModelCard, height: int, width: int, window: int,
             overlap: float | None) -> tuple[TilePlan, int]:
        """The tile plan over a ``height x width`` region and its grid unit in pixels (1: pixels)."""
        ov = self.default_overlap if overlap is None else overlap
        return plan_tiles(height, width, window, ov), 1

    def windows(self, plan: TilePlan, unit: int) -> list[Window]:
        """The plan's windows in pixels of the region."""
        if unit == 1:
            return list(plan.windows)
        return [Window(w.row_off * unit, w.col_off * unit, w.height * unit, w.width * unit) for w in plan.windows]

    def extra_outputs(self, output: Path, options: InferenceOptions) -> list[Path]:
        """The files a run writes beside ``output`` (checked before any work starts)."""
        return []

    # ------------------------------------------------------------------ the model
    def build_model(self, card: ModelCard) -> Any:
        """The torch model of the card (weights not loaded)."""
        from ..models import build_from_architecture

        return build_from_architecture(card.architecture.to_dict(), self.name, len(card.classes))

    def backend(self, package: Any, options: InferenceOptions) -> Any | None:
        """A backend of the task's own (``run(batch) -> outputs``, ``describe()``, ``name``), or None:
        the engine's torch / onnxruntime choice (``engine.backends.choose_backend``)."""
        return None

    def init_architecture(self, architecture: dict, decoder: dict) -> dict:
        """A new (random) package's architecture from the encoder's (``sarmae init``)."""
        return architecture

    def forward(self, model: Any, x: Any, mask_ratio: float = 0.75) -> Any:
        """The torch forward of one batch (B, C, H, W); also what ONNX export traces."""
        return model(x)

    def to_numpy(self, y: Any) -> Any:
        """The backend's torch output as the sink's numpy input."""
        return y.float().cpu().numpy()

    def check_card(self, card: ModelCard) -> list[str]:
        """The card's problems for this task beyond the common schema (e.g. CFAR's settings), as sentences."""
        return []

    def summary(self, card: ModelCard) -> list[str]:
        """Lines of ``sarmae info`` about the task's own settings (e.g. CFAR's windows and pfa)."""
        return []

    def agreement(self, reference: np.ndarray, test: np.ndarray, valid: np.ndarray) -> float:
        """How far a quantised model's outputs ``test`` agree with the fp32 model's ``reference`` on
        one batch of calibration windows (``valid`` (B, S, S): the windows' data pixels), in [0, 1]:
        the int8 gate refuses a model below ``agreement_threshold``."""
        raise NotImplementedError(f"task '{self.name}' has no int8 quality gate (Task.agreement)")

    # ------------------------------------------------------------------ output and merging
    def run_raster(self, inputs: list[str], output: Path, package: Any, options: InferenceOptions,
                   say: Callable[[str], None], progress: ProgressFn | None,
                   should_cancel: CancelFn | None) -> InferenceResult:
        """The whole run of a task that is not ``windowed``: read ``inputs``, write ``output`` (checked
        by the engine: not an input, absent unless ``overwrite``) atomically and return the result
        record; ``engine.inference`` adds timings, provenance and the log."""
        raise NotImplementedError(f"task '{self.key()}' is windowed: it runs through make_sink")

    def make_sink(self, ctx: RunContext) -> Sink:
        raise NotImplementedError

    def part_options(self, options: InferenceOptions) -> InferenceOptions:
        """The options of one rank's part run (e.g. detect keeps every box for the global NMS)."""
        return options

    def merge(self, job: MergeJob) -> InferenceResult:
        """Rank 0's merge of the parts' outputs into the outputs of a single run (bitwise)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- shared by the sinks
def sibling(path: Path, suffix: str) -> Path:
    """``out.tif`` + ``_confidence.tif`` -> ``out_confidence.tif``."""
    return path.with_name(path.stem + suffix)


def check_extra_outputs(ctx: RunContext, paths: list[Path]) -> None:
    """Apply the main output's checks (exists without overwrite, equals an input) to the outputs
    written beside it, before any file is opened."""
    from ..writers import check_output

    for p in paths:
        check_output(p, ctx.raster.paths, ctx.options.overwrite)


class PixelSink:
    """Common start of the sinks whose windows are planned by their task: ``plan``, ``unit``,
    ``windows`` and ``geo`` (georeferencing of the region at the plan's unit)."""

    def __init__(self, task: Task, ctx: RunContext):

        self.task, self.ctx = task, ctx
        self.plan, self.unit = task.plan(ctx.card, ctx.region.height, ctx.region.width, ctx.size,
                                         ctx.options.overlap)
        self.windows = task.windows(self.plan, self.unit)
        self.geo = Georef(ctx.raster, ctx.region, scale=self.unit)


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    z = logits - np.max(logits, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def as_logits(y: np.ndarray, output: str | None) -> np.ndarray:
    """The model's class scores as logits: probabilities (a model.onnx made elsewhere) become their
    logarithms, so that the sinks' softmax gives them back instead of flattening them."""
    if output == "probabilities":
        return np.log(np.maximum(y, np.float32(1e-30)))
    return y
