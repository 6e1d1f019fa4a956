"""Sliding-window inference over SAR rasters larger than memory: ``run_inference``.

raster(s) -> reader (windows) -> radiometry -> batches (IO thread) -> backend -> task sink
(stitcher + writers, on the writer thread ``SinkThread``) -> result record. The CLI (``sarmae
infer``), the engine worker (``sarmae serve``) and the QGIS plugin (through the worker) all call
``run_inference``.
"""

from __future__ import annotations

import contextvars
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
from .errors import CancelledError, RasterInputError
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


class SinkThread:
    """``sink.consume`` on a background thread, up to ``depth`` batches behind the model.

    The sink's work per batch (stitching, softmax, statistics, compressing and writing strips) would
    otherwise run between two model batches on the calling thread; here it fills the gaps the
    model's threads leave (it is as nice as the reader). Batches are consumed in order, by one
    thread, so outputs are bitwise those of a serial run. An error in ``consume`` is raised on the
    calling thread at the next ``put`` or at ``close``; ``stop`` waits for the batch in hand, so the
    sink can be aborted safely.
    """

    def __init__(self, sink, depth: int = 2):
        self.sink = sink
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        # in the caller's context: the run's Publication (free space, disk-full messages) is a context variable
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,), name="sarmae-writer",
                                       daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        import rasterio

        _lower_thread_priority(READER_NICENESS)
        with rasterio.Env():  # GDAL's errors reach engine.publish.gdal_errors from this thread too
            while True:
                item = self.q.get()
                if item is None:
                    return
                if self.error is None:
                    try:
                        self.sink.consume(*item)
                    except BaseException as e:  # raised on the calling thread
                        self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, windows, outputs, valid) -> None:
        self._raise()
        while self.thread.is_alive():
            try:
                self.q.put((windows, outputs, valid), timeout=0.2)
                return
            except queue.Full:
                self._raise()
        self._raise()

    def close(self) -> None:
        """Wait until every batch is consumed; raise the first error of ``consume``."""
        self.q.put(None)
        self.thread.join()
        self._raise()

    def stop(self) -> None:
        """Drop the batches not yet consumed and wait for the one in hand (before ``sink.abort``)."""
        self.error = self.error or CancelledError("stopped")
        while self.thread.is_alive():
            try:
                self.q.get_nowait()
            except queue.Empty:
                pass
            try:
                self.q.put_nowait(None)
            except queue.Full:
                pass
            self.thread.join(timeout=0.05)


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
    """Run a model package over raster(s) and write the task's outputs next to ``output``
    (``_run_inference``), publishing them through one ``engine.publish.Publication``: every output
    path the run checks is locked for it, stale temporaries of interrupted runs in its folder are
    removed (and said), and each file is verified before a lock-checked rename; one GDAL
    environment for the run, so that GDAL's write errors reach ``engine.publish.gdal_errors``."""
    import rasterio

    from .publish import Publication

    overwrite = bool(options is not None and options.overwrite)

    def say(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(-1.0, msg)

    with rasterio.Env(), Publication(overwrite=overwrite, say=say) as pub:
        result = _run_inference(inputs, output, model, options, progress, should_cancel, backend)
    result.log = pub.messages + result.log
    return result


def _run_inference(inputs: list[str] | str, output: str | Path, model, options: InferenceOptions | None = None,
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
    from .options import check_options, check_window
    from .radiometry import Radiometry
    from .reader import SarRaster
    from .tasks import task_for
    from .writers import check_output

    t0 = time.perf_counter()
    opts = options or InferenceOptions()
    check_options(opts)  # before anything is opened: a sentence for a bad option, never a traceback
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
    out = check_output(task.output_path(output), inputs, opts.overwrite)
    if not task.windowed:  # the task reads the raster itself (CFAR): no windows, no backend
        result = task.run_raster(inputs, out, pkg, opts, say, progress, should_cancel)
        elapsed = time.perf_counter() - t0
        return _record(result, t0, elapsed, card, inputs, opts, messages)
    with SarRaster.open(inputs, opts.bands, opts.complex_mode) as raster:
        size = check_window(opts, card, raster.width)  # the patch size, and memory, before any allocation
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
        writer = SinkThread(sink)
        try:
            for wins, x, valid in iter_batches(ctx, windows, opts.batch_size, should_cancel):
                t1 = time.perf_counter()
                y = backend.run(x)
                t_model += time.perf_counter() - t1
                writer.put(wins, y, valid)
                del x, y, valid
                trimmer.maybe()
                done += len(wins)
                if progress is not None:
                    progress(done / len(windows), f"{done}/{len(windows)} windows")
            writer.close()
            if should_cancel is not None and should_cancel():
                raise CancelledError("cancelled by the user; no output was written")
            result = sink.finish()
        except BaseException:
            writer.stop()
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
