"""Scale-out over ``torchrun``: one large raster shared by N processes (``run_distributed_inference``).

Every rank calls it with the same arguments (``engine.process_group`` joins them; in a plain process
it is ``run_inference``). The merged outputs equal a single-process run with the same options, bit
for bit (DESIGN.md, "Scale-out"):

1. The task plans its windows (``Task.plan``: pixels, or tokens for embed). The plan's row bands
   are split into N contiguous groups (``split_rows``); rank k owns the output rows of its group.
2. Each rank runs ``run_inference`` with ``extent`` = the rows of every band that touches its rows
   (blended tasks also recompute the bands above that overlap its first rows), at full width, into
   hidden part files beside the output, with the task's ``part_options``. A plan over that extent
   reproduces the global bands, shifted: each owned row gets the same windows, weights and order;
   ``BatchAlignedBackend`` runs each window in the batch size and slot of the single run.
3. After an exchange of every rank's status (also the barrier), rank 0 calls the task's ``merge``
   (``engine.tasks.merging``), which writes the final outputs. Part files are removed, also on
   failure. Exceptions to bitwise equality are the task's to state (embed's PCA preview).

Compare with a single run on as many threads as one rank (torchrun sets ``OMP_NUM_THREADS=1``).
Parts go through the file system: on several nodes the output folder must be shared.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from .aligned_backend import BatchAlignedBackend
from .batch import run_batch
from .errors import NoValidDataError, SarmaeError
from .inference import _clip_extent, _open_package, _record, run_inference
from .process_group import agreed, dist_info, dist_shutdown
from .reader import SarRaster
from .tasks import task_for
from .tasks.merging import MergeJob, part_path, remove_parts
from .tiling import Window
from .types import InferenceOptions, InferenceResult, ProgressFn, RunContext

__all__ = ["BatchAlignedBackend", "RankRows", "dist_info", "dist_shutdown", "run_batch", "run_distributed_inference",
           "split_rows"]

log = logging.getLogger("sarmae.distributed")


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


# ---------------------------------------------------------------------------- one raster
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
        pkg = state["pkg"] = _open_package(model)
        card = pkg.card
        if not task_for(card).windowed:
            raise SarmaeError(f"{model}: {card.architecture.name} reads whole rasters by strips and is not split over "
                              "torchrun ranks: run it without torchrun (or give each rank its rasters: run_batch)")
        from .options import check_options, check_window

        check_options(opts)
        size = check_window(opts, card, 0)  # the raster's width is not known yet: the window's own memory
        if rank != 0:
            return None
        task = task_for(card)
        out = check_output(task.output_path(output), inputs, opts.overwrite)
        for extra in task.extra_outputs(out, opts):
            check_output(extra, inputs, opts.overwrite)
        with SarRaster.open(inputs, opts.bands, opts.complex_mode) as raster:
            region = Window(0, 0, raster.height, raster.width)
            if opts.extent is not None:
                region = _clip_extent(opts.extent, raster)
        # rank 0 picks the backend (auto: timed once and cached) so that every rank runs the same one
        from .backends import make_backend

        inner = state["backend"] = make_backend(task_for(card), pkg, opts, size, log=say)
        return {"out": str(out), "region": [region.row_off, region.col_off, region.height, region.width],
                "token": uuid.uuid4().hex[:8], "backend": inner.name}

    info = agreed(prepare)[0]
    pkg = state["pkg"]
    card = pkg.card
    task = task_for(card)
    out, token, region = Path(info["out"]), info["token"], Window(*info["region"])
    size = opts.window or card.input_size[0]
    plan, unit = task.plan(card, region.height, region.width, size, opts.overlap)
    shares = split_rows(plan.row_starts, plan.window, plan.raster_height, world, task.blended)
    mine = shares[rank] if rank < len(shares) else None
    say(f"distributed over {world} ranks: {len(plan.windows)} window(s) in {len(plan.row_starts)} row band(s); "
        + ", ".join(f"rank {k} bands {s.own_bands[0]}-{s.own_bands[1] - 1}" for k, s in enumerate(shares)))
    own_paths: list[str] = []

    def work() -> dict | None:
        from .backends import make_backend

        if mine is None:
            return None
        e0, e1 = mine.extent
        px0, px1 = e0 * unit, min(e1 * unit, region.height)
        part_plan, _ = task.plan(card, px1 - px0, region.width, size, opts.overlap)
        a, b = mine.run_bands
        if (part_plan.row_starts != tuple(s - e0 for s in plan.row_starts[a:b])
                or part_plan.col_starts != plan.col_starts):  # the reasoning of the module docstring
            raise SarmaeError(f"internal error: the plan of rows {px0}-{px1} does not match the global plan")
        part = part_path(out, token, rank)
        part_opts = task.part_options(replace(opts, extent=(region.row_off + px0, region.col_off, px1 - px0,
                                                             region.width), vector=False, cog=False, overwrite=False))
        inner = state.get("backend") or make_backend(task, pkg, opts, size, log=say, kind=info["backend"])
        ncols = len(plan.col_starts)
        backend = BatchAlignedBackend(inner, a * ncols, len(plan.windows), opts.batch_size)

        def rank_progress(fraction: float, message: str) -> None:
            if rank == 0 and progress is not None:
                progress(fraction, message if fraction < 0 else f"rank 0 of {world}: {message}")

        try:
            res = run_inference(inputs, part, pkg, part_opts, progress=rank_progress, backend=backend)
        except NoValidDataError as e:  # for one part of a raster, not an error
            return {"outputs": None, "empty": str(e), "model_s": 0.0, "backend": backend.describe()}
        own_paths.extend(res.outputs.values())
        messages.extend(res.log)
        if backend.consumed != (b - a) * ncols:
            raise SarmaeError(f"internal error: rank {rank} ran {backend.consumed} windows, "
                              f"expected {(b - a) * ncols}")
        return {"outputs": res.outputs, "empty": None, "model_s": res.timings.get("model_s", 0.0),
                "backend": res.provenance.get("backend"), "input_units": res.provenance.get("input_units"),
                "part": str(part)}

    try:
        parts = agreed(work)
        t_merge = time.perf_counter()

        def merge() -> dict | None:
            if rank != 0:
                return None
            live = [p for p in parts if p is not None and p["outputs"]]
            if not live:  # every part was nodata: the single run's error
                raise NoValidDataError(next(p["empty"] for p in parts if p is not None))
            say(f"merging {len(live)} part(s) into {out}")
            from .publish import Publication

            with (SarRaster.open(inputs, opts.bands, opts.complex_mode) as raster,
                  Publication([out, *task.extra_outputs(out, opts)], overwrite=opts.overwrite, say=say)):
                ctx = RunContext(raster, card, None, out, opts, size, {}, region, say)
                starts, extents = [s.rows[0] for s in shares], [s.extent[0] for s in shares]
                return task.merge(MergeJob(ctx, plan, unit, starts, extents, parts)).to_dict()

        merged = agreed(merge)[0]
    finally:
        remove_parts(out, token, own_paths)
    if rank != 0:
        return None
    result = InferenceResult(**merged)
    done = [p for p in parts if p is not None and p["outputs"]]
    result.provenance = {"input_units": done[0]["input_units"], "backend": done[0]["backend"]}
    result = _record(result, t0, float(sum(p["model_s"] for p in done)), card, inputs, opts, messages)
    result.timings["merge_s"] = time.perf_counter() - t_merge
    result.provenance["distributed"] = {"world_size": world, "ranks": [  # rows_px: raster rows it wrote
        {"rank": k, "bands": list(s.own_bands), "ran_bands": list(s.run_bands),
         "rows_px": [region.row_off + s.rows[0] * unit, region.row_off + min(s.rows[1] * unit, region.height)]}
        for k, s in enumerate(shares)]}
    return result


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
        from .publish import write_bytes_atomic

        write_bytes_atomic(Path(a.result), json.dumps(res, indent=1, default=str).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
