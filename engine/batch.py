"""A batch of rasters shared by the ranks of ``torchrun``: ``run_batch``.

Rank r processes rasters ``r, r + N, r + 2N, ...`` with ``run_inference`` (one backend per rank,
reused), each to ``<output_dir>/<stem><suffix>.tif`` (``.gpkg`` for vector tasks); rank 0 gathers
the result records in input order. In a plain process one process does them all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import SarmaeError
from .inference import _open_package, run_inference
from .process_group import agreed, all_gather, dist_info, error_record
from .tasks import task_for
from .types import InferenceOptions, ProgressFn

log = logging.getLogger("sarmae.distributed")


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
        ext = task_for(pkg.card).output_suffix
        outs = [Path(output_dir) / f"{Path(it[0]).stem}{suffix}{ext}" for it in items]
        seen: dict[Path, int] = {}
        for i, o in enumerate(outs):
            if o in seen:
                raise SarmaeError(f"inputs {items[seen[o]][0]} and {items[i][0]} would both write {o}; "
                                  "rename one or run them separately")
            seen[o] = i
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        state["outs"] = outs

    agreed(prepare)
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
            if backend is None and task_for(pkg.card).windowed:  # CFAR reads rasters itself: no backend
                from .backends import make_backend

                backend = make_backend(task_for(pkg.card), pkg, opts, opts.window or pkg.card.input_size[0],
                                       log=log.info)
            rec["result"] = run_inference(items[i], outs[i], pkg, opts, progress=batch_progress,
                                          backend=backend).to_dict()
        except Exception as e:
            log.warning("%s: %s", items[i][0], e)
            rec["error"] = error_record(e)
        records.append(rec)
    gathered = sorted((r for recs in all_gather(records) for r in recs), key=lambda r: r["index"])
    failed = [r for r in gathered if r["error"] is not None]
    if strict and failed:
        err = SarmaeError(f"{len(failed)} of {len(gathered)} raster(s) failed: " + "; ".join(
            f"{r['inputs'][0]}: {r['error']['message']}" for r in failed))
        err.records = gathered
        raise err
    return gathered if rank == 0 else None
