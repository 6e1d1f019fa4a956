"""The rules of the run options, in one place: types and ranges, and the window against memory.

``sarmae infer`` (through ``run_inference``), the engine worker (``InferenceOptions.from_dict`` on a
``run`` request, so also QGIS and its Processing algorithms, which send their options through the
worker) and torchrun ranks all check options here, and each refusal is a sentence naming the
option as its command-line flag, the value given, the range, and what to do.

``check_options`` needs only the options; ``check_window`` also needs the model card and the
raster's width: the window against the patch size, a minimum, and an estimate of the memory a
window batch takes (the model's tokens, the input batch, the stitcher's rolling rows) against the
memory available (``/proc/meminfo``'s MemAvailable; unchecked where it cannot be read).
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import OptionError

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
BACKENDS = ("auto", "torch", "onnx", "onnxruntime")
PRECISIONS = ("fp32", "int8", "auto")
COMPLEX_MODES = ("intensity", "amplitude")
UNITS = ("db", "linear_power", "amplitude", "uint8")
MAX_OVERLAP = 0.9  # windows overlapping more than this cost > 100x the work of edge-to-edge windows
MIN_WINDOW = 32  # px: at least 2 x 2 patches of 16 px


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad(name: str, value: Any, rule: str, fix: str = "") -> OptionError:
    return OptionError(f"{flag(name)} {value!r}: {rule}" + (f"; {fix}" if fix else ""))


def _int(name: str, value: Any, low: int, fix: str = "", none: str = "") -> int | None:
    """An integer >= low (a JSON 8.0 counts as 8); None allowed when ``none`` says what it means."""
    if value is None and none:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, value, f"must be a whole number >= {low}" + (f" (or left out: {none})" if none else ""), fix)
    if value < low:
        raise _bad(name, value, f"must be at least {low}" + (f" (or left out: {none})" if none else ""), fix)
    return value


def _fraction(name: str, value: Any, low: float, high: float, rule: str, none: str = "") -> float | None:
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, value, f"must be a number, {rule}" + (f" (or left out: {none})" if none else ""))
    if not low <= value <= high:
        raise _bad(name, value, f"out of range: {rule}" + (f" (or left out: {none})" if none else ""))
    return float(value)


def _choice(name: str, value: Any, choices: tuple[str, ...], none: bool = False) -> None:
    if value is None and none:
        return
    if not isinstance(value, str) or value not in choices:
        raise _bad(name, value, f"must be one of {', '.join(choices)}")


def check_options(opts) -> None:
    """Refuse options of the wrong type or out of range (``InferenceOptions``), with a sentence;
    whole numbers given as floats (JSON) are stored as ints."""
    o = opts
    o.window = _int("window", o.window, MIN_WINDOW, "give the window side in pixels, e.g. 224",
                    none="the model's input size")
    o.overlap = _fraction("overlap", o.overlap, 0.0, MAX_OVERLAP,
                          f"the fraction of a window its neighbours share, 0 <= overlap <= {MAX_OVERLAP} (e.g. 0.25)",
                          none="the task's default, 0.25; classify 0")
    o.batch_size = _int("batch_size", o.batch_size, 1, "windows per forward pass, e.g. 4")
    o.threads = _int("threads", o.threads, 1, "the number of CPU threads, e.g. 4",
                     none="all cores, the backend's own default")
    o.min_area_px = _int("min_area_px", o.min_area_px, 0, "a region size in pixels, e.g. 20")
    o.score_threshold = _fraction("score_threshold", o.score_threshold, 0.0, 1.0,
                                  "a box score between 0 and 1 (e.g. 0.3)", none="the package's own")
    o.nms_iou = _fraction("nms_iou", o.nms_iou, 0.0, 1.0, "an intersection over union between 0 and 1 (e.g. 0.5)")
    if o.nms_iou == 0.0:
        raise _bad("nms_iou", o.nms_iou, "must be above 0 (0 would merge boxes that do not overlap)", "e.g. 0.5")
    o.mask_ratio = _fraction("mask_ratio", o.mask_ratio, 0.0, 0.99, "the fraction of patches hidden, 0..0.99 "
                             "(e.g. 0.75)")
    if not isinstance(o.device, str) or not DEVICE.fullmatch(o.device):
        raise _bad("device", o.device, "must be auto, cpu, cuda, cuda:N or mps")
    _choice("backend", o.backend, BACKENDS)
    _choice("precision", o.precision, PRECISIONS)
    _choice("complex_mode", o.complex_mode, COMPLEX_MODES)
    _choice("input_units", o.input_units, UNITS, none=True)
    for name in ("vector", "probabilities", "cog", "overwrite"):
        if not isinstance(getattr(o, name), bool):
            raise _bad(name, getattr(o, name), "must be true or false")
    for name in ("water_mask", "water_class"):
        if getattr(o, name) is not None and not isinstance(getattr(o, name), str):
            raise _bad(name, getattr(o, name), "must be a text (a path, or class names / values)")
    if o.bands is not None:
        if (not isinstance(o.bands, (list, tuple)) or not o.bands
                or not all((isinstance(b, int) and not isinstance(b, bool) and b >= 1) or (isinstance(b, str) and b)
                           for b in o.bands)):
            raise _bad("bands", o.bands, "must list bands by 1-based index or name, e.g. VV,VH or 2,1")
        o.bands = list(o.bands)
    if o.extent is not None:
        e = o.extent
        if isinstance(e, (list, tuple)):  # JSON's 10.0 is 10
            e = [int(v) if isinstance(v, float) and v.is_integer() else v for v in e]
        if (not isinstance(e, (list, tuple)) or len(e) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in e)
                or e[2] < 1 or e[3] < 1):
            raise _bad("extent", e, "must be ROW COL HEIGHT WIDTH in whole pixels, height and width >= 1 (the "
                       "region is clipped to the raster)")
        o.extent = tuple(e)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def window_memory(card, size: int, batch: int, raster_width: int) -> int:
    """About how many bytes a run holds at once for windows of ``size`` px (an estimate, on the
    high side): the input batch (read, scaled, padded: 3 copies), the encoder's activations for the
    batch (tokens x width x ~16 live floats), the task's outputs for the batch (classes per pixel,
    features per token, a few numbers per window; 3 copies), and the stitcher's rolling rows
    (raster width x window rows x outputs, values + weights)."""
    enc = card.architecture.encoder
    channels, width = card.in_chans, enc.embed_dim if enc is not None else 1
    tokens = (size // card.patch_size) ** 2
    if card.task == "embed":  # features per token (stride = patch)
        outputs, cells, row_cells = width, tokens, size // card.patch_size
    elif card.task in ("segment", "reconstruct"):  # classes (or bands) per pixel
        outputs, cells, row_cells = max(len(card.classes), channels), size * size, size
    else:  # classify, detect: a few numbers per window
        outputs, cells, row_cells = max(len(card.classes), 1), 1, 1
    per_window = 4 * (3 * channels * size * size + 16 * tokens * width + 3 * outputs * cells)
    stitch = 4 * 2 * (outputs + 1) * max(raster_width, size) * row_cells
    return batch * per_window + stitch


def check_window(opts, card, raster_width: int, available: int | None = None) -> int:
    """The window side of this run (the option, else the model's input size), refused with a
    sentence when it is not a multiple of the patch size or needs more memory than is available."""
    size = opts.window or card.input_size[0]
    if size % card.patch_size:
        raise _bad("window", size, f"must be a multiple of the model's patch size {card.patch_size}",
                   f"e.g. {max(card.patch_size, size // card.patch_size * card.patch_size)}")
    need = window_memory(card, size, opts.batch_size, raster_width)
    free = available_memory() if available is None else available
    if free is not None and need > free:
        what = f"--window {size} with --batch-size {opts.batch_size}" if opts.window else \
            f"the model's input size {size} px with --batch-size {opts.batch_size}"
        raise OptionError(f"{what} needs about {need / 2**30:.1f} GiB of memory, more than the {free / 2**30:.1f} GiB "
                          f"available; use a smaller --window (the model was trained on {card.input_size[0]} px) "
                          "or --batch-size")
    return size
