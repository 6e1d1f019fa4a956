"""Random ``img_size`` windows from large SAR rasters, scaled to [0, 1].

Each raster gives ``windows_per_raster`` items per epoch; item ``i`` belongs to raster
``i // windows_per_raster``. The window of an item is drawn from a generator seeded with
``(seed, epoch, index)`` only, so it is the same whichever worker or rank loads it, different for
every index, and different from epoch to epoch. A window with more than ``max_nodata`` invalid
pixels (nodata, NaN) is redrawn, up to 20 times, then it is an error naming the raster.

Rasters go through ``engine.reader.SarRaster``: the first ``in_chans`` bands are used (a single-band
raster is replicated), complex bands become ``|z|^2``. Units are decided once per raster at
construction by the rule of ``scaling.py`` (the engine's detection on a few sampled windows), then
values -> dB -> ``clip_db`` -> [0, 1]. Rasters smaller than ``img_size`` are zero-padded at the
bottom/right; the padding does not count as nodata.

Open rasters are kept per process (at most 32, least recently used closed first) and never pickled,
so the dataset can be sent to DataLoader workers.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.chips import map_channels, report_bad
from training.data.config import DataConfig, DataError
from training.data.scaling import UINT8, UINT16, item_rng, source_units, split_key, to_unit

if TYPE_CHECKING:  # pragma: no cover
    from engine.reader import SarRaster

log = logging.getLogger(__name__)

MAX_WINDOW_TRIES = 20  # windows drawn before a raster counts as (almost) all nodata
MAX_OPEN = 32  # open rasters kept per process


@dataclass(frozen=True)
class RasterInfo:
    """One usable raster: its size, the bands read and the units of their values."""

    path: str
    height: int
    width: int
    bands: tuple[int, ...]  # 1-based; one band (replicated) or the first in_chans bands
    units: str  # uint8 | uint16 | db | linear_power | amplitude (scaling.source_units)


def expand_paths(paths: list[str | Path]) -> list[str]:
    """Paths with glob patterns expanded (sorted); a pattern that matches nothing is an error."""
    out: list[str] = []
    for p in map(str, paths):
        if glob.has_magic(p):
            found = sorted(glob.glob(p, recursive=True))
            if not found:
                raise DataError(f"no file matches {p} (working directory {os.getcwd()})")
            out.extend(found)
        else:
            out.append(p)
    return out


def scan_raster(path: str, cfg: DataConfig) -> RasterInfo:
    """Open one raster, choose its bands and decide its units (RasterInputError if unusable)."""
    from engine.reader import SarRaster

    with SarRaster.open(path) as r:
        n = r.count
    if 1 < n < cfg.in_chans:
        raise DataError(f"{path} has {n} bands, which cannot become in_chans={cfg.in_chans} channels: "
                        "give a raster with at least that many bands, or a single-band one.")
    bands = (1,) if n == 1 else tuple(range(1, cfg.in_chans + 1))
    with SarRaster.open(path, bands=list(bands)) as r:
        units = source_units(r, None, cfg.units, quiet=False)
        return RasterInfo(path, r.height, r.width, bands, units)


class RasterWindowDataset(Dataset):
    """Random windows of large rasters (see the module docstring).

    Items: ``{"sar": (in_chans, S, S) in [0, 1], "optical": zeros (3, S, S), "paired": False,
    "source": "path@row,col"}`` with S = ``cfg.img_size``. Keys are ``(epoch, index)`` or ``index``.
    """

    def __init__(self, paths: list[str | Path], cfg: DataConfig) -> None:
        from engine.errors import RasterInputError

        self.cfg = cfg
        files = expand_paths(paths)
        if not files:
            raise DataError("no raster given")
        self.rasters: list[RasterInfo] = []
        bad = []
        for p in files:
            try:
                self.rasters.append(scan_raster(p, cfg))
            except RasterInputError as e:
                bad.append(p)
                log.debug("skipping unreadable raster %s: %s", p, e)
        report_bad(bad, len(files), cfg.max_bad_fraction, "raster")
        self.channel_groups: dict[int, list[str]] = {}
        for info in self.rasters:
            self.channel_groups.setdefault(len(info.bands), []).append(info.path)
        self._open: OrderedDict[int, SarRaster] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rasters) * self.cfg.windows_per_raster

    def scaling_counts(self) -> dict[str, int]:
        """Items per scaling kind ("uint8", "uint16", "db"; see ``scaling.scaling_kind``)."""
        out: dict[str, int] = {}
        for r in self.rasters:
            kind = r.units if r.units in (UINT8, UINT16) else "db"
            out[kind] = out.get(kind, 0) + self.cfg.windows_per_raster
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # open datasets stay in the process that opened them
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the rasters this process opened."""
        for r in getattr(self, "_open", {}).values():
            r.close()
        self._open = OrderedDict()

    def _raster(self, k: int) -> SarRaster:
        """The open raster ``k`` of this process (reopened after a fork)."""
        from engine.reader import SarRaster

        if self._pid != os.getpid():  # forked worker: never use the parent's GDAL handles
            self._open, self._pid = OrderedDict(), os.getpid()
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        info = self.rasters[k]
        self._open[k] = SarRaster.open(info.path, bands=list(info.bands))
        if len(self._open) > MAX_OPEN:
            self._open.popitem(last=False)[1].close()
        return self._open[k]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from engine.tiling import Window

        epoch, index = split_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        k = index // self.cfg.windows_per_raster
        info, s = self.rasters[k], self.cfg.img_size
        raster = self._raster(k)
        rng = item_rng(self.cfg.seed, epoch, index)
        h, w = min(s, info.height), min(s, info.width)
        worst = 0.0
        for _ in range(MAX_WINDOW_TRIES):
            r0 = int(rng.integers(0, info.height - h + 1))
            c0 = int(rng.integers(0, info.width - w + 1))
            x, valid = raster.read(Window(r0, c0, h, w), pad_to=(s, s))
            bad = 1.0 - float(valid[:h, :w].mean())
            if bad <= self.cfg.max_nodata:
                break
            worst = max(worst, bad)
        else:
            raise DataError(f"{info.path}: {MAX_WINDOW_TRIES} random {h}x{w} windows all had more than "
                            f"max_nodata={self.cfg.max_nodata:g} invalid pixels (up to {worst:.0%}). "
                            "Check its nodata value, raise max_nodata, or leave the raster out.")
        y = map_channels(to_unit(x, valid, info.units, self.cfg.clip_db), self.cfg.in_chans)
        return {"sar": torch.from_numpy(np.ascontiguousarray(y)), "optical": torch.zeros(()).expand(3, s, s),
                "paired": torch.tensor(False), "source": f"{info.path}@{r0},{c0}"}
