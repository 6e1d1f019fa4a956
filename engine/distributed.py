"""Scale-out over ``torchrun``: one large raster, or a batch of rasters, shared by N processes.

``torchrun --nproc_per_node N`` starts the same entry point N times (ranks); ``dist_info`` joins
them with ``torch.distributed`` (gloo on CPU, NCCL for CUDA tensors) and is a no-op in a plain
process, where every function here falls back to ``run_inference``.

One raster (``run_distributed_inference``): the merged outputs equal a single-process run of
``run_inference`` with the same options, bit for bit (see "Equality" below).

1. The task's tile plan is made exactly as its sink makes it (segment, reconstruct and detect:
   overlap 0.25; classify: 0; embed: on the token grid, ceil(H/p) x ceil(W/p), windows of
   window/p tokens). Its row bands are split into N contiguous groups (``split_rows``); rank k
   owns the output rows ``[row_starts[b_lo], row_starts[b_hi])`` of its group ``[b_lo, b_hi)``
   (rank 0 from row 0, the last rank to the last row).
2. Each rank runs ``run_inference`` with ``extent`` = the rows of every band that touches the rows
   it owns, at full width, writing "part" outputs to hidden files beside the output. ``plan_tiles``
   over that height reproduces the global band starts shifted by the extent's first row (inner
   starts are multiples of the stride counted from a multiple of the stride; the last one is
   shifted to ``extent height - window`` = the global last start), so each owned row receives
   the same windows, with the same weights, added in the same order: the same float32 sums.
   Blended tasks (segment, reconstruct, embed) therefore recompute the one or two bands above a
   group that overlap its first rows; detect and classify run exactly their own bands.
3. After an exchange of every rank's status (which doubles as the barrier), rank 0 merges:
   rasters are copied strip by strip (the single run's strips, so that the float statistics
   accumulate in the same order) from the part that owns each strip, into writers with the same
   tags, colours and georeferencing; segment statistics are recomputed while copying and its
   polygons (``--vector``) made from the merged class raster; the embed PCA preview is recomputed
   from the merged embedding. Detect parts run with NMS disabled (``nms_iou=1.0`` keeps every box:
   an IoU never exceeds 1), so rank 0 applies the one global NMS of the single run to the same
   boxes; classify parts' grid cells are concatenated. Part files are removed, also on failure.

Equality. On CPU, a window's model output depends (in the last bits) on the size of the batch
it is computed in and on its slot, though not on the other windows' content: GEMM and
convolution kernels pick their blocking from the batch size. The ranks therefore run each window
in a batch of the size, and at the slot, it has in the single run (``BatchAlignedBackend``; zero
windows fill the free slots of a rank's first and last batches), which also gives reconstruct
the same random masks. A different thread count also changes the last bits (torchrun sets
``OMP_NUM_THREADS=1`` per rank): compare with a single run on as many threads as one rank.
Exceptions: the embed PCA preview (``*_pca.tif``) is fitted to a sample read back from the
merged, float16 embedding instead of the float32 values a single run samples, so a few of its
8-bit colours may differ by one. Detect keeps the same boxes, bitwise; but a part's NMS with
``nms_iou=1.0``, though it removes nothing, returns its boxes sorted by score, so boxes of exactly
equal score can come out in another order than in a single run (whose final sort, above 4000
boxes, is not stable) unless ``DetectSink`` skips NMS for ``nms_iou >= 1`` and keeps window order.

A batch (``run_batch``): rank r processes rasters ``r, r + N, r + 2N, ...`` with
``run_inference`` (one backend per rank, reused), each to ``<output_dir>/<stem><suffix>.tif``
(``.gpkg`` for detect/classify); rank 0 gathers the result records in input order.

Parts are exchanged through the file system: on several nodes the output folder must be shared.
Progress: each rank measures its own fraction; only rank 0 calls ``progress``.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from . import errors as _errors
from .errors import RasterInputError, SarmaeError
from .inference import (
    InferenceOptions,
    InferenceResult,
    ProgressFn,
    _clip_extent,
    _open_package,
    run_inference,
)
from .tiling import TilePlan, Window, plan_tiles

log = logging.getLogger("sarmae.distributed")

BLENDED_TASKS = ("segment", "reconstruct", "embed")  # overlapping windows are blended into rasters
VECTOR_TASKS = ("detect", "classify")  # outputs are GeoPackages
# messages of the sinks' "nothing valid here" errors: for one part of a raster, not an error
_EMPTY_PART = ("every pixel is nodata", "every window is nodata")
_DEFAULT_TIMEOUT_S = 24 * 3600  # a rank may wait this long for the others (torchrun kills the rest if one dies)


# ---------------------------------------------------------------------------- process group
def dist_info() -> tuple[int, int, bool]:
    """``(rank, world_size, initialised)``, joining the process group of ``torchrun`` if needed.

    Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``
    in the environment, ``WORLD_SIZE > 1``) this initialises ``torch.distributed`` once: gloo when
    CUDA is absent, else gloo for CPU tensors and NCCL for CUDA tensors, with this process bound
    to GPU ``LOCAL_RANK``. The collectives wait up to ``SARMAE_DIST_TIMEOUT_S`` seconds (default
    24 h: ranks wait for each other's parts). An already initialised group is used as it is.
    Without that environment it does nothing and returns ``(0, 1, False)``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError as e:
        raise SarmaeError(f"WORLD_SIZE / RANK must be integers (set by torchrun), got {env.get('WORLD_SIZE')!r}, "
                          f"{env.get('RANK')!r}") from e
    if world <= 1:
        return 0, 1, False
    if not dist.is_available():
        raise SarmaeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise SarmaeError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; start the ranks with "
                          "torchrun --nproc_per_node N (it sets them)")
    from datetime import timedelta

    import torch

    timeout = timedelta(seconds=float(env.get("SARMAE_DIST_TIMEOUT_S", _DEFAULT_TIMEOUT_S)))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    atexit.register(dist_shutdown)
    return rank, world, True


def dist_shutdown(timeout_s: float = 60.0) -> None:
    """Leave the process group, every rank together: a barrier (gloo: at most ``timeout_s``), then
    ``destroy_process_group`` while the interpreter is fully alive (a gloo group left to interpreter
    finalisation can abort the process). Registered at exit by ``dist_info``; an entry point may call
    it at its end. Does nothing without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":  # a rank that failed alone must not wait for the others forever
        from datetime import timedelta

        with contextlib.suppress(Exception):
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _error_record(e: BaseException) -> dict[str, str]:
    return {"type": type(e).__name__, "message": str(e) or repr(e)}


def _rebuild_error(record: dict[str, str], rank: int) -> SarmaeError:
    """The error another rank raised, as an engine error of the same class when there is one."""
    cls = getattr(_errors, record["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, SarmaeError)):
        cls = SarmaeError
    msg = record["message"] if cls is not SarmaeError else f"{record['type']}: {record['message']}"
    return cls(f"rank {rank}: {msg}")


def _agreed(fn) -> list[Any]:
    """Run ``fn`` on every rank and gather what each returned (also a barrier).

    If it raised on any rank, every rank raises: the failing rank its own exception, the others
    an engine error naming that rank, so that all of them stop together.
    """
    try:
        value, err = fn(), None
    except Exception as e:
        value, err = None, e
    gathered = _all_gather({"value": value, "error": None if err is None else _error_record(err)})
    if err is not None:
        raise err
    for r, g in enumerate(gathered):
        if g["error"] is not None:
            raise _rebuild_error(g["error"], r)
    return [g["value"] for g in gathered]


# ---------------------------------------------------------------------------- split arithmetic
@dataclass(frozen=True)
class RankRows:
    """One rank's share of a tile plan, in rows of the plan's grid (pixels; tokens for embed).

    Attributes:
        own_bands: row bands ``[first, stop)`` of the plan assigned to this rank.
        run_bands: row bands ``[first, stop)`` it runs: its own and, when windows are blended, the
            earlier ones that overlap its first rows. Its windows are the plan's windows
            ``run_bands[0] * ncols`` to ``run_bands[1] * ncols`` (row-major order).
        rows: output rows ``[start, stop)`` it owns in the merged result (blended tasks).
        extent: rows ``[start, stop)`` covered by ``run_bands``: the extent it processes.
    """

    own_bands: tuple[int, int]
    run_bands: tuple[int, int]
    rows: tuple[int, int]
    extent: tuple[int, int]


def split_rows(row_starts: tuple[int, ...] | list[int], window: int, height: int, parts: int,
               blended: bool = True) -> list[RankRows]:
    """Split a plan's row bands into at most ``parts`` contiguous groups, one per rank.

    Args:
        row_starts: the plan's band starts (``TilePlan.row_starts``), increasing, starting at 0.
        window: the plan's window height (``TilePlan.window``).
        height: the plan's raster height.
        parts: the number of ranks (>= 1); ranks beyond the number of bands get nothing.
        blended: windows are blended into rasters (segment, reconstruct, embed): a rank also runs
            the earlier bands that overlap the rows it owns. False (detect, classify): each window
            is run by exactly one rank.

    Returns:
        ``min(parts, len(row_starts))`` shares; their ``rows`` tile ``[0, height)`` in order and
        their ``own_bands`` tile ``[0, len(row_starts))``. Row ``r`` of ``rows`` is touched only by
        bands in ``run_bands`` (when ``blended``), all inside ``extent``.
    """
    starts = [int(s) for s in row_starts]
    n = len(starts)
    if n < 1 or starts[0] != 0 or any(a >= b for a, b in pairwise(starts)):
        raise ValueError(f"row_starts must increase from 0, got {row_starts}")
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    k_parts = min(parts, n)
    cuts = [k * n // k_parts for k in range(k_parts + 1)]
    shares = []
    for k in range(k_parts):
        b_lo, b_hi = cuts[k], cuts[k + 1]
        r0 = 0 if k == 0 else starts[b_lo]
        r1 = height if k == k_parts - 1 else starts[b_hi]
        a = b_lo
        if blended:  # the first band whose rows reach below r0 (bands are in increasing order)
            a = next(j for j in range(b_lo + 1) if starts[j] + window > r0)
        e1 = min(starts[b_hi - 1] + window, height)
        shares.append(RankRows((b_lo, b_hi), (a, b_hi), (r0, r1), (starts[a], e1)))
    return shares


def stitch_strips(plan: TilePlan) -> list[tuple[int, int]]:
    """``(row_off, rows)`` of the strips ``RollingStitcher`` hands out for ``plan``, in order.

    Rows become final band by band (cut at every band start) and leave the ring buffer of
    ``min(window, height)`` rows in at most two pieces (cut at its multiples).
    """
    h = plan.raster_height
    ring = min(plan.window, h)
    cuts = sorted(set(plan.row_starts) | set(range(0, h, ring)) | {h})
    return [(a, b - a) for a, b in pairwise(cuts)]


def task_plan(task: str, height: int, width: int, window: int, patch: int,
              overlap: float | None) -> tuple[TilePlan, int]:
    """The plan the task's sink makes over a ``height x width`` region, and its grid unit in pixels
    (``patch`` for embed, whose plan is on the token grid; 1 otherwise)."""
    if task == "embed":
        ov = 0.25 if overlap is None else overlap
        return plan_tiles(-(-height // patch), -(-width // patch), window // patch, ov), patch
    ov = (0.0 if task == "classify" else 0.25) if overlap is None else overlap
    return plan_tiles(height, width, window, ov), 1


# ---------------------------------------------------------------------------- batch alignment
class BatchAlignedBackend:
    """Run a rank's windows in batches of the size, and at the slots, of the single-process run.

    The rank's windows are the global plan's windows ``first_window, first_window + 1, ...``,
    arriving in that order. In the single run, window ``g`` is at slot ``g % batch_size`` of a batch
    of ``batch_size`` windows, or of ``total_windows % batch_size`` for the last, partial batch.
    Since a window's output depends on its batch's size and its slot but not on the other windows,
    each batch the rank hands over is run as one batch of that size with every window at its slot
    (consecutive windows have distinct slots), the free slots filled with zero windows: no extra
    model runs except where a rank's batch reaches into the single run's last, partial batch.
    """

    def __init__(self, inner, first_window: int, total_windows: int, batch_size: int):
        self.inner = inner
        self.next = first_window
        self.total = total_windows
        self.batch = batch_size
        self.consumed = 0
        self.inner_runs = 0

    def run(self, x: np.ndarray) -> Any:
        m, bs = len(x), self.batch
        g = np.arange(self.next, self.next + m)
        if m and g[-1] >= self.total:
            raise SarmaeError(f"internal error: window {g[-1]} beyond the plan's {self.total} windows")
        self.next += m
        self.consumed += m
        last_q = (self.total - 1) // bs
        sizes = np.where(g // bs == last_q, self.total - last_q * bs, bs)  # the size of each window's batch
        out: list[Any] = [None] * m
        for size in np.unique(sizes):
            chosen = np.nonzero(sizes == size)[0]
            for c in range(0, len(chosen), bs):  # at most bs consecutive windows: distinct slots
                sel = chosen[c:c + bs]
                slots = g[sel] % bs
                buf = np.zeros((int(size), *x.shape[1:]), x.dtype)
                buf[slots] = x[sel]
                y = self.inner.run(buf)
                self.inner_runs += 1
                for i, s in zip(sel, slots):
                    out[i] = y[s]
        if m and isinstance(out[0], np.ndarray):
            return np.stack(out)
        return out

    def describe(self) -> str:
        return self.inner.describe()


# ---------------------------------------------------------------------------- one raster
def _resolve_output(output: str | os.PathLike, task: str) -> Path:
    out = Path(output)
    if not out.suffix:
        out = out.with_suffix(".gpkg" if task in VECTOR_TASKS else ".tif")
    return out


def _extra_outputs(task: str, out: Path, opts: InferenceOptions) -> list[Path]:
    """The files a single run writes beside ``out`` (checked before any work starts)."""
    from .tasks.base import sibling

    if task == "segment":
        return ([sibling(out, "_confidence.tif")] + ([sibling(out, "_probabilities.tif")] if opts.probabilities else [])
                + ([out.with_suffix(".gpkg")] if opts.vector else []))
    if task == "embed":
        return [sibling(out, "_pca.tif")]
    return []


def _part_path(out: Path, token: str, rank: int) -> Path:
    return out.with_name(f".{out.stem}.part-{token}-{rank}{out.suffix}")


def _remove_parts(out: Path, token: str, paths: list[str] = ()) -> None:
    """Remove part files (and any temporary file of a part run) of the run ``token``."""
    for p in paths:
        Path(p).unlink(missing_ok=True)
    prefixes = (f".{out.stem}.part-{token}-", f"..{out.stem}.part-{token}-")
    with contextlib.suppress(OSError):
        for entry in os.scandir(out.parent):
            if entry.name.startswith(prefixes):
                Path(entry.path).unlink(missing_ok=True)


def run_distributed_inference(inputs: list[str] | str, output: str | os.PathLike, model,
                              options: InferenceOptions | None = None,
                              progress: ProgressFn | None = None) -> InferenceResult | None:
    """``run_inference`` over one raster, shared by the ranks of ``torchrun``.

    Every rank calls it with the same arguments. Returns the merged result on rank 0 and None on
    the others; in a plain process (no torchrun) it is ``run_inference``. Any rank's failure
    raises on every rank and leaves no output and no part file.
    """
    rank, world, _ = dist_info()
    if world == 1:
        return run_inference(inputs, output, model, options, progress=progress)
    from .writers import check_output

    t0 = time.perf_counter()
    opts = options or InferenceOptions()
    inputs = [str(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    messages: list[str] = []

    def say(msg: str) -> None:
        messages.append(msg)
        log.info(msg)
        if rank == 0 and progress is not None:
            progress(-1.0, msg)

    state: dict[str, Any] = {}

    def prepare() -> dict | None:
        from .reader import SarRaster

        pkg = state["pkg"] = _open_package(model)
        card = pkg.card
        size = opts.window or card.input_size[0]
        if size % card.patch_size:
            raise SarmaeError(f"--window {size} must be a multiple of the model's patch size {card.patch_size}")
        if rank != 0:
            return None
        out = check_output(_resolve_output(output, card.task), inputs, opts.overwrite)
        for extra in _extra_outputs(card.task, out, opts):
            check_output(extra, inputs, opts.overwrite)
        with SarRaster.open(inputs, opts.bands, opts.complex_mode) as raster:
            region = Window(0, 0, raster.height, raster.width)
            if opts.extent is not None:
                region = _clip_extent(opts.extent, raster)
        # rank 0 picks the backend (auto: timed once and cached) so that every rank runs the same one
        from .backends import choose_backend

        inner = state["backend"] = choose_backend(opts.backend, pkg, opts.device,
                                                  (opts.batch_size, card.in_chans, size, size), opts.threads, log=say)
        return {"out": str(out), "region": [region.row_off, region.col_off, region.height, region.width],
                "token": uuid.uuid4().hex[:8], "backend": inner.name}

    info = _agreed(prepare)[0]
    pkg = state["pkg"]
    card = pkg.card
    task = card.task
    out, token, region = Path(info["out"]), info["token"], Window(*info["region"])
    size = opts.window or card.input_size[0]
    plan, unit = task_plan(task, region.height, region.width, size, card.patch_size, opts.overlap)
    shares = split_rows(plan.row_starts, plan.window, plan.raster_height, world, task in BLENDED_TASKS)
    mine = shares[rank] if rank < len(shares) else None
    say(f"distributed over {world} ranks: {len(plan.windows)} window(s) in {len(plan.row_starts)} row band(s); "
        + ", ".join(f"rank {k} bands {s.own_bands[0]}-{s.own_bands[1] - 1}" for k, s in enumerate(shares)))
    own_paths: list[str] = []

    def work() -> dict | None:
        from .backends import choose_backend

        if mine is None:
            return None
        e0, e1 = mine.extent
        px0, px1 = e0 * unit, min(e1 * unit, region.height)
        part_plan, _ = task_plan(task, px1 - px0, region.width, size, card.patch_size, opts.overlap)
        a, b = mine.run_bands
        if (part_plan.row_starts != tuple(s - e0 for s in plan.row_starts[a:b])
                or part_plan.col_starts != plan.col_starts):  # the reasoning of the module docstring
            raise SarmaeError(f"internal error: the plan of rows {px0}-{px1} does not match the global plan")
        part = _part_path(out, token, rank)
        part_opts = replace(opts, extent=(region.row_off + px0, region.col_off, px1 - px0, region.width),
                            vector=False, cog=False, overwrite=False,
                            nms_iou=1.0 if task == "detect" else opts.nms_iou)
        inner = state.get("backend") or choose_backend(info["backend"], pkg, opts.device,
                                                       (opts.batch_size, card.in_chans, size, size), opts.threads,
                                                       log=say)
        ncols = len(plan.col_starts)
        backend = BatchAlignedBackend(inner, a * ncols, len(plan.windows), opts.batch_size)

        def rank_progress(fraction: float, message: str) -> None:
            if rank == 0 and progress is not None:
                progress(fraction, message if fraction < 0 else f"rank 0 of {world}: {message}")

        try:
            res = run_inference(inputs, part, pkg, part_opts, progress=rank_progress, backend=backend)
        except RasterInputError as e:
            if any(m in str(e) for m in _EMPTY_PART):
                return {"outputs": None, "empty": str(e), "model_s": 0.0, "backend": backend.describe()}
            raise
        own_paths.extend(res.outputs.values())
        messages.extend(res.log)
        if backend.consumed != (b - a) * ncols:
            raise SarmaeError(f"internal error: rank {rank} ran {backend.consumed} windows, "
                              f"expected {(b - a) * ncols}")
        return {"outputs": res.outputs, "empty": None, "model_s": res.timings.get("model_s", 0.0),
                "backend": res.provenance.get("backend"), "input_units": res.provenance.get("input_units"),
                "part": str(part)}

    try:
        parts = _agreed(work)
        t_merge = time.perf_counter()

        def merge() -> dict | None:
            if rank != 0:
                return None
            live = [p for p in parts if p is not None and p["outputs"]]
            if not live:  # every part was nodata: the single run's error
                raise RasterInputError(next(p["empty"] for p in parts if p is not None))
            say(f"merging {len(live)} part(s) into {out}")
            return _merge(task, pkg, opts, inputs, out, region, size, plan, unit, shares, parts, say).to_dict()

        merged = _agreed(merge)[0]
    finally:
        _remove_parts(out, token, own_paths)
    if rank != 0:
        return None
    result = InferenceResult(**merged)
    done = [p for p in parts if p is not None and p["outputs"]]
    result.timings = {"total_s": time.perf_counter() - t0, "model_s": float(sum(p["model_s"] for p in done)),
                      "merge_s": time.perf_counter() - t_merge}
    result.provenance = {"model": card.name, "model_sha256": card.weights.get("sha256"), "inputs": inputs,
                         "input_units": done[0]["input_units"], "backend": done[0]["backend"],
                         "software": f"sarmae {__version__}", "options": asdict(opts),
                         "distributed": {"world_size": world, "ranks": [  # rows_px: raster rows it wrote
                             {"rank": k, "bands": list(s.own_bands), "ran_bands": list(s.run_bands),
                              "rows_px": [region.row_off + s.rows[0] * unit,
                                          region.row_off + min(s.rows[1] * unit, region.height)]}
                             for k, s in enumerate(shares)]}}
    result.log = messages
    return result


def _merge(task, pkg, opts, inputs, out, region, size, plan, unit, shares, parts, say) -> InferenceResult:
    from .reader import SarRaster

    with SarRaster.open(inputs, opts.bands, opts.complex_mode) as raster:
        if task in VECTOR_TASKS:
            return _merge_features(task, pkg.card, opts, raster, region, out, size, plan, parts, say)
        return _merge_rasters(task, pkg.card, opts, raster, region, out, plan, unit, shares, parts)


def _merge_features(task, card, opts, raster, region, out, size, plan, parts, say) -> InferenceResult:
    """Detect / classify: the parts' features, in window order, through the task sink's ``finish``
    (for detect, the single run's NMS over the boxes of every window)."""
    import fiona

    from .inference import RunContext
    from .tasks import make_sink

    sink = make_sink(RunContext(raster, card, None, out, opts, size, {}, region, say))
    r0, c0 = region.row_off, region.col_off
    names = [c["name"] for c in card.classes]
    boxes, scores, labels, rows = [], [], [], []
    windows = {(w.row_off, w.col_off): w for w in plan.windows}
    for part in parts:  # rank order = window order
        if part is None or not part["outputs"]:
            continue
        path = next(iter(part["outputs"].values()))
        with fiona.open(path) as src:
            for f in src:
                p = f["properties"]
                if task == "detect":  # exact: px_* are the box corners plus integer offsets
                    x0, y0 = p["px_col"] - c0, p["px_row"] - r0
                    boxes.append((x0, y0, x0 + p["px_width"], y0 + p["px_height"]))
                    scores.append(p["score"])
                    labels.append(p["class_id"])
                else:
                    win = windows[(p["row_off"] - r0, p["col_off"] - c0)]
                    probs = np.array([p[f"p_{n}"] for n in names], np.float32)
                    rows.append((win, int(p["class_id"]), float(p["score"]), float(p["valid_fraction"]), probs))
    if task == "detect":
        if boxes:
            sink.boxes = [np.asarray(boxes, np.float64)]
            sink.scores = [np.asarray(scores, np.float32)]
            sink.labels = [np.asarray(labels, np.int64)]
    else:
        sink.rows = rows
    return sink.finish()


def _colormap(src) -> dict | None:
    try:
        return src.colormap(1)
    except ValueError:  # no colour table
        return None


def _merge_rasters(task, card, opts, raster, region, out, plan, unit, shares, parts) -> InferenceResult:
    """Segment / reconstruct / embed: copy each part's own rows into the final rasters."""
    import rasterio
    from rasterio.windows import Window as RioWindow

    from .tasks.base import Georef
    from .writers import GeoTiffWriter, check_output

    geo = Georef(raster, region, scale=unit)
    gh, gw = plan.raster_height, plan.raster_width
    live_rank = next(i for i, p in enumerate(parts) if p is not None and p["outputs"])
    live = parts[live_rank]
    part_stem = Path(live["part"]).stem
    finals = {role: out.with_name(out.stem + Path(p).name[len(part_stem):]) for role, p in live["outputs"].items()}
    roles = [r for r in live["outputs"] if r not in ("pca", "vectors")]  # recomputed from the merged rasters
    for path in finals.values():
        check_output(path, raster.paths, opts.overwrite)
    starts = [s.rows[0] for s in shares]
    k = len(card.classes)
    counts, areas, conf_sum = np.zeros(k, np.int64), np.zeros(k, np.float64), np.zeros(k, np.float64)
    sampler = _Reservoir(plan) if task == "embed" else None
    writers: dict[str, GeoTiffWriter] = {}
    with contextlib.ExitStack() as stack:
        srcs = [{role: stack.enter_context(rasterio.open(p["outputs"][role])) for role in roles}
                if p is not None and p["outputs"] else None for p in parts]
        profiles = {}
        try:
            for role in roles:
                src = srcs[live_rank][role]
                half = src.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") == "16"
                desc = list(src.descriptions) if all(src.descriptions) else None
                profiles[role] = (src.count, src.dtypes[0], src.nodata)
                writers[role] = GeoTiffWriter(finals[role], width=gw, height=gh, count=src.count, dtype=src.dtypes[0],
                                              nodata=src.nodata, colormap=_colormap(src), descriptions=desc,
                                              tags=src.tags(), cog=opts.cog, half_float=half, **geo.writer_kwargs())
            for row_off, rows in stitch_strips(plan):
                owner = bisect.bisect_right(starts, row_off) - 1
                local = row_off - shares[owner].extent[0]
                block = {}
                for role in roles:
                    if srcs[owner] is not None:
                        block[role] = srcs[owner][role].read(window=RioWindow(0, local, gw, rows))
                    else:  # that part was all nodata
                        count, dtype, nodata = profiles[role]
                        block[role] = np.full((count, rows, gw), nodata, dtype)
                if task == "segment":  # SegmentSink._write's statistics, in the same strips
                    cls, conf = block["class"][0], block["confidence"][0]
                    invalid = cls == 255
                    valid_cls = cls[~invalid]
                    counts += np.bincount(valid_cls, minlength=k)[:k]
                    row_area = np.broadcast_to(geo.row_areas(row_off, rows)[:, None], cls.shape)
                    areas += np.bincount(valid_cls, weights=row_area[~invalid], minlength=k)[:k]
                    conf_sum += np.bincount(valid_cls, weights=conf[~invalid], minlength=k)[:k]
                elif task == "embed":
                    sampler.add(block["embedding"])
                for role in roles:
                    writers[role].write_rows(row_off, block[role])
            for w in writers.values():  # all complete on disk before any is published
                w.close()
            outputs = {role: str(finals[role]) for role in roles}
            if task == "segment":
                stats = {"pixels": int(counts.sum()), "area_unit": geo.area_unit, "per_class": {}}
                for i, c in enumerate(card.classes):
                    n = int(counts[i])
                    stats["per_class"][c["name"]] = {"pixels": n, "area": float(areas[i]),
                                                     "fraction": n / max(1, int(counts.sum())),
                                                     "mean_confidence": float(conf_sum[i] / n) if n else None}
                if opts.vector:
                    from .vectorize import polygonize_classes

                    gpkg = out.with_suffix(".gpkg")
                    vec = polygonize_classes(writers["class"].tmp, gpkg, [c["name"] for c in card.classes],
                                             min_area_px=opts.min_area_px)
                    outputs["vectors"] = str(gpkg)
                    stats["vectors"] = {key: v for key, v in vec.items() if key != "path"}
            elif task == "embed":
                with rasterio.open(live["outputs"]["pca"]) as src:
                    pca_tags = src.tags()
                writers["pca"] = sampler.write_preview(writers["embedding"].tmp, finals["pca"], pca_tags, geo)
                writers["pca"].close()
                outputs["pca"] = str(finals["pca"])
                stats = {"grid": [gh, gw], "dim": sampler.dim, "stride_px": unit}
            else:
                stats = {"units": card.input["units"]}
            for w in writers.values():
                w.commit()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
    return InferenceResult(task=task, outputs=outputs, classes=card.classes if task == "segment" else [],
                           statistics=stats)


class _Reservoir:
    """The embed sink's feature sample (EmbedSink._write) and PCA preview (EmbedSink._pca_preview),
    over the merged embedding, strip by strip in the single run's strips."""

    def __init__(self, plan: TilePlan):
        from .tasks.embed import SAMPLE

        self.limit = SAMPLE
        self.rng = np.random.default_rng(0)
        self.sample: np.ndarray | None = None
        self.seen = 0
        self.dim = 0
        self.shape = (plan.raster_height, plan.raster_width)

    def add(self, strip: np.ndarray) -> None:
        self.dim = strip.shape[0]
        if self.sample is None:
            self.sample = np.zeros((0, self.dim), np.float32)
        vecs = strip.reshape(self.dim, -1).T
        vecs = vecs[~np.isnan(vecs[:, 0])]
        if len(vecs):
            self.seen += len(vecs)
            take = min(len(vecs), max(1, int(self.limit * len(vecs) / self.seen)))
            pick = vecs[self.rng.choice(len(vecs), take, replace=False)]
            self.sample = np.concatenate([self.sample, pick])
            if len(self.sample) > self.limit:
                self.sample = self.sample[self.rng.choice(len(self.sample), self.limit, replace=False)]

    def write_preview(self, embedding_tif: Path, path: Path, tags: dict, geo):
        import rasterio
        from rasterio.windows import Window as RioWindow

        from .writers import GeoTiffWriter

        mean = self.sample.mean(0)
        _, _, vt = np.linalg.svd(self.sample - mean, full_matrices=False)
        comps = np.zeros((3, self.dim), vt.dtype)
        comps[: min(3, len(vt))] = vt[:3]
        proj = (self.sample - mean) @ comps.T
        lo, hi = np.percentile(proj, 2, axis=0), np.percentile(proj, 98, axis=0)
        span = hi - lo
        scale = np.where(span > 0, 254.0 / np.where(span > 0, span, 1.0), 1.0)
        gh, gw = self.shape
        dst = GeoTiffWriter(path, width=gw, height=gh, count=3, dtype="uint8", nodata=0,
                            descriptions=["pc1", "pc2", "pc3"], tags=tags, **geo.writer_kwargs())
        try:
            with rasterio.open(embedding_tif) as src:
                for r in range(0, gh, 512):
                    h = min(512, gh - r)
                    v = src.read(window=RioWindow(0, r, gw, h)).astype(np.float32).reshape(self.dim, -1).T
                    bad = np.isnan(v[:, 0])
                    rgb = np.clip(((np.nan_to_num(v) - mean) @ comps.T - lo) * scale + 1, 1, 255).astype(np.uint8)
                    rgb[bad] = 0
                    dst.write_rows(r, rgb.T.reshape(3, h, gw))
        except BaseException:
            dst.abort()
            raise
        return dst


# ---------------------------------------------------------------------------- a batch of rasters
def run_batch(inputs: list, output_dir: str | os.PathLike, model, options: InferenceOptions | None = None,
              suffix: str = "", progress: ProgressFn | None = None, strict: bool = True) -> list[dict] | None:
    """Run ``run_inference`` over many rasters, shared by the ranks (rank r takes r, r + N, ...).

    Args:
        inputs: rasters; an item may be a list of single-band files on one grid (stacked channels).
        output_dir: folder of the outputs ``<stem of the item's first file><suffix>.tif`` (``.gpkg``
            for detect/classify); extras beside them as in a single run.
        strict: raise (on every rank) when any raster failed; the error's ``records`` holds them all.

    Returns:
        On rank 0, one record per input in input order: ``{"index", "inputs", "output", "rank",
        "result": InferenceResult.to_dict() | None, "error": {"type", "message"} | None}``;
        None on the other ranks. In a plain process the same, done by the one process.
    """
    rank, world, _ = dist_info()
    opts = options or InferenceOptions()
    items = [[str(p) for p in (x if isinstance(x, (list, tuple)) else [x])] for x in inputs]
    state: dict[str, Any] = {}

    def prepare() -> None:
        pkg = state["pkg"] = _open_package(model)
        ext = ".gpkg" if pkg.card.task in VECTOR_TASKS else ".tif"
        outs = [Path(output_dir) / f"{Path(it[0]).stem}{suffix}{ext}" for it in items]
        seen: dict[Path, int] = {}
        for i, o in enumerate(outs):
            if o in seen:
                raise SarmaeError(f"inputs {items[seen[o]][0]} and {items[i][0]} would both write {o}; "
                                  "rename one or run them separately")
            seen[o] = i
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        state["outs"] = outs

    _agreed(prepare)
    pkg, outs = state["pkg"], state["outs"]
    mine = list(range(rank, len(items), world))
    backend = None
    records = []
    for n, i in enumerate(mine):
        def batch_progress(fraction: float, message: str, n=n, i=i) -> None:
            if rank != 0 or progress is None:
                return
            if fraction < 0:
                progress(fraction, message)
            else:
                progress((n + fraction) / len(mine), f"raster {n + 1}/{len(mine)} ({Path(items[i][0]).name}): {message}")

        rec = {"index": i, "inputs": items[i], "output": str(outs[i]), "rank": rank, "result": None, "error": None}
        try:
            if backend is None:
                from .backends import choose_backend

                card = pkg.card
                size = opts.window or card.input_size[0]
                backend = choose_backend(opts.backend, pkg, opts.device, (opts.batch_size, card.in_chans, size, size),
                                         opts.threads, log=log.info)
            rec["result"] = run_inference(items[i], outs[i], pkg, opts, progress=batch_progress,
                                          backend=backend).to_dict()
        except Exception as e:
            log.warning("%s: %s", items[i][0], e)
            rec["error"] = _error_record(e)
        records.append(rec)
    gathered = sorted((r for recs in _all_gather(records) for r in recs), key=lambda r: r["index"])
    failed = [r for r in gathered if r["error"] is not None]
    if strict and failed:
        err = SarmaeError(f"{len(failed)} of {len(gathered)} raster(s) failed: " + "; ".join(
            f"{r['inputs'][0]}: {r['error']['message']}" for r in failed))
        err.records = gathered
        raise err
    return gathered if rank == 0 else None


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``[torchrun --nproc_per_node N] python -m engine.distributed --model M --output O IN...``
    (one raster, several files = stacked channels) or ``... --batch --output-dir D IN...``."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m engine.distributed", description=main.__doc__)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--output", "-o", help="main output (one raster)")
    p.add_argument("--batch", action="store_true", help="each input is a raster of its own")
    p.add_argument("--output-dir", help="--batch: output folder")
    p.add_argument("--suffix", default="", help="--batch: added to each output's stem")
    p.add_argument("--options", default="{}", help="InferenceOptions as a JSON object")
    p.add_argument("--result", help="write the result record(s) as JSON here (rank 0)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        opts = InferenceOptions.from_dict(json.loads(a.options))
        if opts.extent is not None:
            opts.extent = tuple(opts.extent)
        if a.batch:
            if not a.output_dir:
                raise SarmaeError("--batch needs --output-dir")
            res: Any = run_batch(a.inputs, a.output_dir, a.model, opts, a.suffix)
        else:
            if not a.output:
                raise SarmaeError("--output is required (or --batch --output-dir)")
            r = run_distributed_inference(a.inputs, a.output, a.model, opts)
            res = None if r is None else r.to_dict()
    except SarmaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        dist_shutdown()
    if res is not None and a.result:
        Path(a.result).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
