"""Merging the per-rank parts of a torchrun run (``engine.distributed``) into a single run's outputs.

Each task's ``merge`` uses these: ``RasterMerge`` copies rasters strip by strip (the single run's
strips, so that statistics computed while copying accumulate in the same order) from the part that
owns each strip; ``part_features`` reads the vector parts' features in window order.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ..tiling import TilePlan
from ..types import RunContext
from .georef import Georef


@dataclass
class MergeJob:
    """What rank 0 merges.

    Attributes:
        ctx: the run over the whole region (``output``: the final main output; ``radiometry`` None).
        plan: the task's plan over the region; ``unit`` its grid unit in pixels.
        starts: per rank with a share, the first plan row it owns (increasing, from 0).
        extents: per rank with a share, the first plan row of the extent it ran (part row 0).
        parts: per rank, ``{"outputs": {role: path}, "part": main part path}``, or None / ``outputs``
            None when that rank had nothing or its part was all nodata.
    """

    ctx: RunContext
    plan: TilePlan
    unit: int
    starts: list[int]
    extents: list[int]
    parts: list[dict | None]

    def live(self) -> list[dict]:
        return [p for p in self.parts if p is not None and p.get("outputs")]


def stitch_strips(plan: TilePlan) -> list[tuple[int, int]]:
    """``(row_off, rows)`` of the strips ``RollingStitcher`` hands out for ``plan``, in order.

    Rows become final band by band (cut at every band start) and leave the ring buffer of
    ``min(window, height)`` rows in at most two pieces (cut at its multiples).
    """
    h = plan.raster_height
    ring = min(plan.window, h)
    cuts = sorted(set(plan.row_starts) | set(range(0, h, ring)) | {h})
    return [(a, b - a) for a, b in pairwise(cuts)]


def _colormap(src) -> dict | None:
    try:
        return src.colormap(1)
    except ValueError:  # no colour table
        return None


class RasterMerge:
    """The final rasters of the roles the parts wrote (but ``recomputed``), filled from the parts.

    ``copy(on_strip)`` writes every strip and closes the writers (complete on disk, not published);
    the task then makes what it recomputes (from ``writers[role].tmp``), and ``commit`` publishes
    all, ``abort`` removes all.
    """

    def __init__(self, job: MergeJob, recomputed: tuple[str, ...] = ()):
        from ..writers import check_output

        self.job = job
        ctx = job.ctx
        self.geo = Georef(ctx.raster, ctx.region, scale=job.unit)
        live = job.live()[0]
        part_stem = Path(live["part"]).stem
        out = ctx.output
        self.finals = {role: out.with_name(out.stem + Path(p).name[len(part_stem):])
                       for role, p in live["outputs"].items()}
        self.roles = [r for r in live["outputs"] if r not in recomputed]
        self.live = live
        for path in self.finals.values():
            check_output(path, ctx.raster.paths, ctx.options.overwrite)
        self.writers: dict[str, Any] = {}

    def part_tags(self, role: str) -> dict:
        import rasterio

        with rasterio.open(self.live["outputs"][role]) as src:
            return src.tags()

    def copy(self, on_strip: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> None:
        import rasterio
        from rasterio.windows import Window as RioWindow

        from ..writers import GeoTiffWriter

        job, plan = self.job, self.job.plan
        gh, gw = plan.raster_height, plan.raster_width
        with contextlib.ExitStack() as stack:
            srcs = [{role: stack.enter_context(rasterio.open(p["outputs"][role])) for role in self.roles}
                    if p is not None and p.get("outputs") else None for p in job.parts]
            first = next(s for s in srcs if s is not None)
            profiles = {}
            for role in self.roles:
                src = first[role]
                half = src.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") == "16"
                desc = list(src.descriptions) if all(src.descriptions) else None
                profiles[role] = (src.count, src.dtypes[0], src.nodata)
                self.writers[role] = GeoTiffWriter(
                    self.finals[role], width=gw, height=gh, count=src.count, dtype=src.dtypes[0], nodata=src.nodata,
                    colormap=_colormap(src), descriptions=desc, tags=src.tags(), cog=job.ctx.options.cog,
                    half_float=half, **self.geo.writer_kwargs())
            for row_off, rows in stitch_strips(plan):
                owner = bisect.bisect_right(job.starts, row_off) - 1
                local = row_off - job.extents[owner]
                block = {}
                for role in self.roles:
                    if srcs[owner] is not None:
                        block[role] = srcs[owner][role].read(window=RioWindow(0, local, gw, rows))
                    else:  # that part was all nodata
                        count, dtype, nodata = profiles[role]
                        block[role] = np.full((count, rows, gw), nodata, dtype)
                if on_strip is not None:
                    on_strip(row_off, block)
                for role in self.roles:
                    self.writers[role].write_rows(row_off, block[role])
        for w in self.writers.values():  # all complete on disk before any is published
            w.close()

    def outputs(self) -> dict[str, str]:
        return {role: str(self.finals[role]) for role in self.roles}

    def commit(self) -> None:
        for w in self.writers.values():
            w.commit()

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def part_features(job: MergeJob) -> Iterator[dict]:
    """The properties of every feature of the vector parts, in rank order (= window order)."""
    import fiona

    for part in job.live():
        with fiona.open(next(iter(part["outputs"].values()))) as src:
            for f in src:
                yield dict(f["properties"])


def part_path(out: Path, token: str, rank: int) -> Path:
    return out.with_name(f".{out.stem}.part-{token}-{rank}{out.suffix}")


def remove_parts(out: Path, token: str, paths: list[str] = ()) -> None:
    """Remove part files (and any temporary file of a part run) of the run ``token``."""
    for p in paths:
        Path(p).unlink(missing_ok=True)
    prefixes = (f".{out.stem}.part-{token}-", f"..{out.stem}.part-{token}-")
    with contextlib.suppress(OSError):
        for entry in os.scandir(out.parent):
            if entry.name.startswith(prefixes):
                Path(entry.path).unlink(missing_ok=True)
