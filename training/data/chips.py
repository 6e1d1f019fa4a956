"""Folders of SAR chips (PNG, JPEG, TIFF) as a dataset of [0, 1] images of ``img_size``.

Construction scans every file cheaply before training starts: the header is opened with rasterio
(GDAL reads PNG and JPEG too) and JPEG/PNG files must end with their end marker (FFD9 / IEND), which
catches truncated downloads without decoding. Unreadable files are skipped with a count; more than
``max_bad_fraction`` of them is an error. Files that fail to decode during training are counted too
and replaced by another (deterministic) random item.

Channels (alpha bands dropped) become exactly ``in_chans``:

- 1 band: replicated to ``in_chans``; 3 equal bands (gray stored as RGB, e.g. HRSID) count as 1 band
  (decided on up to 16 probed files; such chips are read as the mean of their bands);
- 2 bands (dual pol): put in the order co-pol, cross-pol (VV, VH), then kept for ``in_chans`` 2,
  the co-pol band alone for ``in_chans`` 1. The order comes from the polarisation names when the file
  gives them, else the brighter band (larger median) is the co-pol one: cross-pol backscatter is
  5-15 dB lower (OpenSARShip stores VH before VV, Sen1Floods11 VV before VH);
- 3 distinct bands: only for ``in_chans`` 3; more than 3 bands: refused (use the raster path).

With ``in_chans`` > 1, single-band chips (which would be replicated) cannot be mixed with chips that
carry real extra channels: the error lists example files of each band count.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.config import DataConfig, DataError
from training.data.scaling import (
    fit_size,
    is_gray,
    item_rng,
    scaling_kind,
    source_units,
    split_key,
    to_unit,
)

log = logging.getLogger(__name__)

CHIP_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MAX_GRAY_PROBES = 16  # 3-band files read at construction to tell gray-as-RGB from colour
MAX_READ_RETRIES = 10  # replacement items tried after a decoding error during training
_END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND"}


@dataclass(frozen=True)
class ChipInfo:
    """What the header scan learnt about one chip."""

    path: str
    bands: tuple[int, ...]  # 1-based bands kept (alpha bands dropped)
    height: int
    width: int
    dtype: str = "float32"  # header dtype of the first kept band
    gray: bool = False  # 3 equal bands: read as one band


def find_chips(roots: str | Path | list[str | Path]) -> list[str]:
    """Chip files under folders (recursive, sorted), plus files and glob matches given directly.

    Raises:
        DataError: a path does not exist, or a folder holds no chip.
    """
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    out: list[str] = []
    for root in roots:
        root = str(root)
        matches = sorted(glob.glob(root, recursive=True)) if glob.has_magic(root) else [root]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise DataError(f"chip path not found: {root} (working directory {os.getcwd()})")
        for m in matches:
            if os.path.isdir(m):
                found = sorted(str(p) for p in Path(m).rglob("*")
                               if p.is_file() and p.suffix.lower() in CHIP_EXTENSIONS)
                if not found:
                    raise DataError(f"no chip found in the folder {m}: looked recursively for "
                                    f"{', '.join(CHIP_EXTENSIONS)} files")
                out.extend(found)
            else:
                out.append(m)
    return out


def scan_chip(path: str) -> ChipInfo:
    """Open one chip's header (no decoding). Raises OSError/DataError when it is unusable."""
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.errors import NotGeoreferencedWarning

    marker = _END_MARKERS.get(Path(path).suffix.lower())
    if marker is not None:
        with open(path, "rb") as f:
            f.seek(max(os.path.getsize(path) - 16, 0))
            if marker not in f.read():
                raise OSError(f"{path} is truncated (no end marker)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            bands = tuple(b for b in range(1, ds.count + 1) if ds.colorinterp[b - 1] != ColorInterp.alpha)
            if not bands or ds.width < 2 or ds.height < 2:
                raise DataError(f"{path} has no image band ({ds.count} band(s), {ds.width}x{ds.height} px)")
            return ChipInfo(path, bands, ds.height, ds.width, ds.dtypes[bands[0] - 1])


def read_chip(info: ChipInfo, cfg: DataConfig) -> np.ndarray:
    """One chip in [0, 1] with its native bands: (n, h, w) float32, gray-as-RGB as one band."""
    from engine.reader import SarRaster
    from engine.tiling import Window

    with SarRaster.open(info.path, bands=list(info.bands)) as r:
        x, valid = r.read(Window(0, 0, r.height, r.width))
        units = source_units(r, x[:, valid], cfg.units)
        pols = r.polarisations
    y = to_unit(x, valid, units, cfg.clip_db)
    if info.gray:
        return y.mean(axis=0, keepdims=True)
    if y.shape[0] == 2 and cross_pol_first(x, valid, pols):
        return y[::-1].copy()
    return y


def cross_pol_first(x: np.ndarray, valid: np.ndarray, pols: list[str | None]) -> bool:
    """True when band 1 of a dual-pol (2, h, w) image is the cross-pol one (by name, else darker)."""
    if all(p is not None for p in pols) and pols[0] != pols[1]:
        return pols[0] in ("VH", "HV")
    if not valid.any():
        return False
    m0, m1 = (float(np.median(b[valid])) for b in x)
    return m0 < m1


def map_channels(x: np.ndarray, in_chans: int) -> np.ndarray:
    """(n, h, w) -> (in_chans, h, w): one band replicated, else the first ``in_chans`` bands."""
    if x.shape[0] == 1:
        return np.repeat(x, in_chans, axis=0)
    if x.shape[0] < in_chans:
        raise DataError(f"{x.shape[0]} band(s) cannot become {in_chans} channels")
    return x[:in_chans]


def check_mixing(groups: dict[int, list[str]], in_chans: int) -> None:
    """Refuse single-band sources (replicated) next to sources with real extra channels."""
    if in_chans > 1 and 1 in groups and any(n > 1 for n in groups):
        raise DataError(
            f"the SAR inputs mix band counts that cannot share in_chans={in_chans}: "
            f"{describe_groups(groups)}. Replicating single-band images would pretend they carry "
            "the other channels. Use in_chans 1 (the co-pol band of dual-pol images), or separate the data.")


def describe_groups(groups: dict[int, list[str]]) -> str:
    """'1 band: 12 files (a.png, b.png, ...); 2 bands: 3 files (...)'."""
    parts = []
    for n, paths in sorted(groups.items()):
        ex = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        parts.append(f"{n} band(s): {len(paths)} file(s) ({ex})")
    return "; ".join(parts)


def scan_chips(paths: list[str], cfg: DataConfig, what: str = "chip") -> tuple[list[ChipInfo], list[str]]:
    """Scan headers, probe 3-band files for gray, check channels; return (good chips, bad paths).

    Raises:
        DataError: too many unreadable files, or channel counts that cannot become ``in_chans``.
    """
    infos, bad = [], []
    for p in paths:
        try:
            infos.append(scan_chip(p))
        except (OSError, DataError) as e:
            bad.append(p)
            log.debug("skipping unreadable %s %s: %s", what, p, e)
    three = [k for k, i in enumerate(infos) if len(i.bands) == 3]
    if three:
        probes = sorted({three[int(j)] for j in np.linspace(0, len(three) - 1, min(MAX_GRAY_PROBES, len(three)))})
        gray = True
        for k in probes:
            try:
                gray &= is_gray(read_chip(infos[k], cfg))
            except (OSError, ValueError) as e:
                log.debug("probe of %s failed: %s", infos[k].path, e)
        if gray:
            infos = [replace(i, gray=True) if len(i.bands) == 3 else i for i in infos]
    report_bad(bad, len(paths), cfg.max_bad_fraction, what)
    groups: dict[int, list[str]] = {}
    for i in infos:
        groups.setdefault(1 if i.gray else len(i.bands), []).append(i.path)
    refused = {n: p for n, p in groups.items()
               if n > 3 or (n == 3 and cfg.in_chans < 3) or (1 < n < cfg.in_chans)}
    if refused:
        raise DataError(
            f"{what}s whose bands cannot become in_chans={cfg.in_chans}: {describe_groups(refused)}. "
            "Chips have 1 band (replicated), 2 (VV/VH) or 3 (in_chans 3 only). Set in_chans to "
            "match, or give large multiband rasters as files (their first in_chans bands are used).")
    check_mixing(groups, cfg.in_chans)
    return infos, bad


def report_bad(bad: list[str], total: int, max_fraction: float, what: str) -> None:
    """Log skipped files; raise DataError when they are more than ``max_fraction`` of ``total``."""
    if not bad:
        return
    ex = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
    if len(bad) > max_fraction * total:
        raise DataError(f"{len(bad)} of {total} {what} files are unreadable or truncated (more than "
                        f"max_bad_fraction={max_fraction:g}): {ex}. Fix or remove them.")
    log.warning("skipped %d unreadable %s file(s) of %d: %s", len(bad), what, total, ex)


class ChipDatasetBase(Dataset):
    """Keys ``(epoch, index)`` or ``index``; a decoding failure is counted and replaced by another
    random item; past ``max_bad_fraction`` of the files (scan + read failures) it is an error."""

    def __init__(self, cfg: DataConfig, n_items: int, n_bad_scanned: int) -> None:
        self.cfg = cfg
        self._n = n_items
        self._bad_scanned = n_bad_scanned
        self.failed: set[int] = set()  # items that failed to decode in this process

    def __len__(self) -> int:
        return self._n

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def source(self, index: int) -> str:  # pragma: no cover
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        if not 0 <= index < self._n:
            raise IndexError(f"index {index} out of range for {self._n} items")
        i = index
        for attempt in range(MAX_READ_RETRIES + 1):
            try:
                return self.load(i, item_rng(self.cfg.seed, epoch, index))
            except DataError:
                raise
            except (OSError, ValueError) as e:
                self.failed.add(i)
                log.warning("could not read %s (%s); using another item", self.source(i), e)
                total = self._n + self._bad_scanned
                if len(self.failed) + self._bad_scanned > self.cfg.max_bad_fraction * total:
                    raise DataError(f"{len(self.failed) + self._bad_scanned} of {total} files are "
                                    f"unreadable (more than max_bad_fraction="
                                    f"{self.cfg.max_bad_fraction:g}); last: {self.source(i)}: {e}") from e
                i = int(item_rng(self.cfg.seed, epoch, index, stream=100 + attempt).integers(self._n))
        raise DataError(f"{MAX_READ_RETRIES + 1} reads in a row failed, last {self.source(i)}")


class ChipFolderDataset(ChipDatasetBase):
    """Unpaired SAR chips from folders, files or glob patterns (see the module docstring).

    Items: ``{"sar": (in_chans, S, S) in [0, 1], "optical": zeros (3, S, S), "paired": False,
    "source": path}`` with S = ``cfg.img_size``.
    """

    def __init__(self, roots: str | Path | list[str | Path], cfg: DataConfig) -> None:
        paths = find_chips(roots)
        infos, bad = scan_chips(paths, cfg)
        super().__init__(cfg, len(infos), len(bad))
        self.chips = infos
        self.channel_groups: dict[int, list[str]] = {}
        for i in infos:
            self.channel_groups.setdefault(1 if i.gray else len(i.bands), []).append(i.path)
        log.info("%d chip(s) from %s%s", len(infos), ", ".join(str(r) for r in
                 ([roots] if isinstance(roots, (str, Path)) else roots))[:200],
                 f" ({len(bad)} unreadable skipped)" if bad else "")

    def source(self, index: int) -> str:
        return self.chips[index].path

    def scaling_counts(self) -> dict[str, int]:
        """Chips per scaling kind ("uint8", "uint16", "db"; see ``scaling.scaling_kind``)."""
        return dict(Counter(scaling_kind(i.dtype, self.cfg.units) for i in self.chips))

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        info, s = self.chips[index], self.cfg.img_size
        x = torch.from_numpy(map_channels(read_chip(info, self.cfg), self.cfg.in_chans))
        return {"sar": fit_size(x, s, self.cfg.resize, rng), "optical": torch.zeros(()).expand(3, s, s),
                "paired": torch.tensor(False), "source": info.path}
