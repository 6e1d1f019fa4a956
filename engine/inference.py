"""Sliding-window inference over SAR rasters larger than memory: ``run_inference``.

raster(s) -> reader (windows) -> radiometry -> batches (IO thread) -> backend -> task sink
(stitcher + writers) -> result record. The CLI (``sarmae infer``), the engine worker (``sarmae
serve``) and the QGIS plugin (through the worker) all call ``run_inference``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import __version__
from .errors import CancelledError, RasterInputError, SarmaeError
from .tiling import Window
from .types import CancelFn, InferenceOptions, InferenceResult, ProgressFn, RunContext

__all__ = ["CancelFn", "InferenceOptions", "InferenceResult", "ProgressFn", "RunContext", "run_inference"]

log = logging.getLogger("sarmae.inference")

def _read_padded(raster, win: Window, size: int, region: Window) -> tuple[np.ndarray, np.ndarray]:
    """Read ``win`` (relative to ``region``) clipped to the region, zero-padded to size x size."""
    h = min(win.height, region.height - win.row_off)
    w = min(win.width, region.width - win.col_off)
    abs_win = Window(region.row_off + win.row_off, region.col_off + win.col_off, h, w)
    return raster.read(abs_win, pad_to=(size, size))


READER_NICENESS = 5
"""How much nicer than the model's threads the reader thread is (Linux). On a machine with as many
model threads as cores, an equal-priority reader takes a core from one OpenMP thread in the middle
of a parallel region and the others wait at its barrier; a nicer reader runs in the gaps instead
(it needs a few percent of the model's time and stays ``depth`` batches ahead)."""


def _lower_thread_priority(by: int) -> None:
    """Raise the calling thread's niceness by ``by`` (never needs privileges; no-op off Linux)."""
    if by <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        pass


def iter_batches(ctx: RunContext, windows: list[Window], batch_size: int, should_cancel: CancelFn | None,
                 depth: int = 3) -> Iterator[tuple[list[Window], np.ndarray, np.ndarray]]:
    """Yield (windows, x (B, C, S, S) float32, valid (B, S, S)); reading and radiometry run on a
    background thread, ``depth`` batches ahead, overlapped with the model."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    size = ctx.size

    def produce() -> None:
        _lower_thread_priority(READER_NICENESS)
        try:
            for i in range(0, len(windows), batch_size):
                if stop.is_set():
                    return
                chunk = windows[i:i + batch_size]
                xs = np.empty((len(chunk), len(ctx.radiometry.channels), size, size), np.float32)
                vs = np.empty((len(chunk), size, size), bool)
                for b, win in enumerate(chunk):
                    x, v = _read_padded(ctx.raster, win, size, ctx.region)
                    xs[b] = ctx.radiometry.apply(x, v)
                    vs[b] = v
                while not stop.is_set():
                    try:
                        q.put((chunk, xs, vs), timeout=0.2)
                        break
                    except queue.Full:
                        continue
            q.put(None)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=produce, name="sarmae-reader", daemon=True)
    thread.start()
    try:
        while True:
            if should_cancel is not None and should_cancel():
                raise CancelledError("cancelled by the user; no output was written")
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


class _HeapTrimmer:
    """Give freed heap memory back to the system at most every ``every_s`` seconds (glibc only).

    A run frees and allocates arrays of a few MB per window and batch in several threads, while GDAL
    keeps its blocks: glibc's heaps fragment and the freed pages stay resident, which made the peak
    RSS of a 16384-px-wide raster ~20 MB higher than needed. ``malloc_trim(0)`` returns them;
    elsewhere (macOS, musl, Windows) this does nothing.
    """

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.last = every_s, time.perf_counter()
        try:
            import ctypes

            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def maybe(self) -> None:
        now = time.perf_counter()
        if self._trim is not None and now - self.last >= self.every_s:
            self._trim(0)
            self.last = now


def _open_package(model):
    """A ``LoadedPackage`` whose torch model is built only if a torch backend asks for it."""
    from .package import LoadedPackage, load_package

    return model if isinstance(model, LoadedPackage) else load_package(model, lazy=True)


def run_inference(inputs: list[str] | str, output: str | Path, model, options: InferenceOptions | None = None,
                  progress: ProgressFn | None = None, should_cancel: CancelFn | None = None,
                  backend=None) -> InferenceResult:
    """Run a model package over raster(s) and write the task's outputs next to ``output``.

    Args:
        inputs: one raster, or several single-band rasters on one grid (stacked as channels).
        output: main output path (segment/embed/reconstruct: a GeoTIFF; detect/classify: a GeoPackage);
            extra outputs are written beside it with suffixes (``_confidence.tif``, ``.gpkg``, ...).
        model: a package path or an already loaded ``LoadedPackage``.
        options: see ``InferenceOptions``.
        progress: called with (fraction 0..1, message).
        should_cancel: polled between batches; True stops the run, removes partial outputs and raises
            ``CancelledError``.
        backend: an already built backend to reuse (the worker keeps them between requests).

    Returns:
        The result record. Raises ``SarmaeError`` subclasses with actionable messages.
    """
    from .backends import make_backend
    from .radiometry import Radiometry
    from .reader import SarRaster
    from .tasks import task_for
    from .writers import check_output

    t0 = time.perf_counter()
    opts = options or InferenceOptions()
    inputs = [str(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    messages: list[str] = []

    def say(msg: str) -> None:
        messages.append(msg)
        log.info(msg)
        if progress is not None:
            progress(-1.0, msg)

    pkg = _open_package(model)
    card = pkg.card
    task = task_for(card)
    out = Path(output)
    if not out.suffix:
        out = out.with_suffix(task.output_suffix)
    out = check_output(out, inputs, opts.overwrite)
    if not task.windowed:  # the task reads the raster itself (CFAR): no windows, no backend
        result = task.run_raster(inputs, out, pkg, opts, say, progress, should_cancel)
        elapsed = time.perf_counter() - t0
        return _record(result, t0, elapsed, card, inputs, opts, messages)
    size = opts.window or card.input_size[0]
    if size % card.patch_size:
        raise SarmaeError(f"--window {size} must be a multiple of the model's patch size {card.patch_size}")
    with SarRaster.open(inputs, opts.bands, opts.complex_mode) as raster:
        say(f"input: {raster.describe()}")
        if raster.georeferencing == "none":
            say("the input has no CRS and no GCPs: outputs are in pixel coordinates")
        radiometry = Radiometry.for_raster(card.input, raster, opts.input_units)
        say(radiometry.describe())
        region = Window(0, 0, raster.height, raster.width)
        if opts.extent is not None:
            region = _clip_extent(opts.extent, raster)
        tags = {"SARMAE_MODEL": card.name, "SARMAE_MODEL_SHA256": card.weights.get("sha256", ""),
                "SARMAE_TASK": card.task, "SARMAE_INPUT_UNITS": radiometry.describe(),
                "SARMAE_SOFTWARE": f"sarmae {__version__}", "SARMAE_INPUTS": ";".join(Path(p).name for p in inputs)}
        ctx = RunContext(raster, card, radiometry, out, opts, size, tags, region, say)
        if backend is None:  # before the sink opens its (temporary) output files
            backend = make_backend(task, pkg, opts, size, log=say)
        sink = task.make_sink(ctx)
        windows = list(sink.windows)
        say(f"{len(windows)} window(s) of {size} px, batch {opts.batch_size}, backend {backend.describe()}")
        t_model = 0.0
        done = 0
        trimmer = _HeapTrimmer()
        try:
            for wins, x, valid in iter_batches(ctx, windows, opts.batch_size, should_cancel):
                t1 = time.perf_counter()
                y = backend.run(x)
                t_model += time.perf_counter() - t1
                sink.consume(wins, y, valid)
                del x, y, valid
                trimmer.maybe()
                done += len(wins)
                if progress is not None:
                    progress(done / len(windows), f"{done}/{len(windows)} windows")
            if should_cancel is not None and should_cancel():
                raise CancelledError("cancelled by the user; no output was written")
            result = sink.finish()
        except BaseException:
            sink.abort()
            raise
    result.provenance = {"input_units": radiometry.describe(), "backend": backend.describe()}
    return _record(result, t0, t_model, card, inputs, opts, messages)


def _record(result: InferenceResult, t0: float, t_model: float, card, inputs: list[str], opts: InferenceOptions,
            messages: list[str]) -> InferenceResult:
    """The result record's timings, provenance (the task's ``input_units`` and ``backend`` kept) and log."""
    result.timings = {"total_s": time.perf_counter() - t0, "model_s": t_model}
    result.provenance = {"model": card.name, "model_sha256": card.weights.get("sha256"), "inputs": inputs,
                         "input_units": result.provenance.get("input_units"), "backend": result.provenance.get("backend"),
                         "software": f"sarmae {__version__}", "options": asdict(opts)}
    result.log = messages
    return result


def _clip_extent(extent, raster) -> Window:
    r, c, h, w = (int(v) for v in extent)
    r0, c0 = max(r, 0), max(c, 0)
    r1, c1 = min(r + h, raster.height), min(c + w, raster.width)
    if r1 - r0 < 1 or c1 - c0 < 1:
        raise RasterInputError(f"the requested extent {extent} (row, col, height, width) does not overlap the "
                               f"{raster.height}x{raster.width} raster {raster.paths[0]}")
    return Window(r0, c0, r1 - r0, c1 - c0)
