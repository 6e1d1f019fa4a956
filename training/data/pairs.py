"""SAR chips paired with co-registered optical images (for SARC), from a JSON index.

The index, in the reference layout::

    {"paired": [{"sar": "s1/0001.tif", "optical": "s2/0001.tif"}, ...],
     "unpaired": ["s1_only/0002.tif", "more_chips/", ...]}

A plain JSON list of ``{"sar", "optical"}`` objects is also accepted (all paired). Relative paths
are relative to the JSON file. Unpaired entries may be chip files or folders (read like chip
folders). Every listed path must exist: otherwise an error lists the first missing ones.

The SAR side is read like a chip (``chips.py``: scaling rule, channels). The optical side:

- bands: those described as B4, B3, B2 (Sentinel-2 red, green, blue) when the file names its
  bands, else bands 4, 3, 2 of a file with 12 or more bands (Sentinel-2 L1C/L2A order: B1, B2,
  B3, B4, ...), else the first 3 bands of a 3- or 4-band file (RGB, RGBA, RGB+NIR), and a single
  band is replicated; other band counts are refused;
- values to [0, 1]: 8-bit / 255; other integers are reflectance x 10000: / 10000, clipped; floats
  are taken as reflectance and clipped; nodata -> 0;
- resized to the SAR chip's size when they differ, fitted to ``img_size`` together with the SAR
  chip (the same crop box in crop mode), then normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.chips import (
    ChipDatasetBase,
    ChipInfo,
    map_channels,
    read_chip,
    report_bad,
    scan_chip,
    scan_chips,
)
from training.data.config import DataConfig, DataError
from training.data.scaling import fit_size, scaling_kind

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RGB_NAMES = ("B4", "B3", "B2")


@dataclass(frozen=True)
class PairIndex:
    """The resolved index: absolute paths, every one checked to exist."""

    paired: list[tuple[str, str]]  # (sar, optical)
    unpaired: list[str]  # chip files or folders


def load_pair_index(path: str | Path) -> PairIndex:
    """Read and check the JSON index (see the module docstring).

    Raises:
        DataError: the file is missing or malformed, or lists paths that do not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pair index not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"pair index {path} is not valid JSON: {e}") from e
    if isinstance(doc, list):
        doc = {"paired": doc, "unpaired": []}
    if not isinstance(doc, dict) or set(doc) - {"paired", "unpaired"}:
        raise DataError(f"pair index {path}: expected {{\"paired\": [...], \"unpaired\": [...]}} or a "
                        f"list of {{\"sar\", \"optical\"}} objects")
    base = path.parent

    def resolve(p: Any, where: str) -> str:
        if not isinstance(p, str) or not p:
            raise DataError(f"pair index {path}: {where} must be a path string, not {p!r}")
        return str(p if Path(p).is_absolute() else base / p)

    paired = []
    for k, item in enumerate(doc.get("paired", [])):
        if not isinstance(item, dict) or not {"sar", "optical"} <= set(item):
            raise DataError(f"pair index {path}: paired item {k} must have 'sar' and 'optical', not {item!r}")
        paired.append((resolve(item["sar"], f"paired[{k}].sar"), resolve(item["optical"], f"paired[{k}].optical")))
    unpaired = [resolve(p, f"unpaired[{k}]") for k, p in enumerate(doc.get("unpaired", []))]
    missing = [p for pair in paired for p in pair if not Path(p).exists()]
    missing += [p for p in unpaired if not Path(p).exists()]
    if missing:
        raise DataError(f"pair index {path} lists {len(missing)} missing file(s): "
                        f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    return PairIndex(paired, unpaired)


def optical_bands(path: str) -> tuple[int, ...]:
    """The 1-based RGB bands of an optical image (rule in the module docstring)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            n, desc = ds.count, [(d or "").upper() for d in ds.descriptions]
    if all(name in desc for name in _RGB_NAMES):
        return tuple(desc.index(name) + 1 for name in _RGB_NAMES)
    if n >= 12:
        return (4, 3, 2)
    if n in (3, 4):
        return (1, 2, 3)
    if n == 1:
        return (1, 1, 1)
    raise DataError(f"optical image {path} has {n} bands: expected 1 (gray), 3-4 (RGB) or a "
                    "Sentinel-2 stack of 12-13 bands")


def read_optical(path: str, bands: tuple[int, ...]) -> np.ndarray:
    """(3, h, w) float32 reflectance-like values in [0, 1], not yet normalised."""
    from engine.reader import SarRaster
    from engine.tiling import Window

    with SarRaster.open(path, bands=list(bands)) as r:
        x, valid = r.read(Window(0, 0, r.height, r.width))
        dtype = np.dtype(r.dtype)
    if dtype == np.uint8:
        x = x / 255.0
    elif dtype.kind in "iu":
        x = x / 10000.0
    return (np.clip(x, 0.0, 1.0) * valid).astype(np.float32)


class PairedChipDataset(ChipDatasetBase):
    """SAR/optical pairs. Items: ``{"sar": (in_chans, S, S) in [0, 1], "optical": (3, S, S)
    ImageNet-normalised, "paired": True, "source": sar path}``; keys ``(epoch, index)`` or ``index``."""

    def __init__(self, pairs: list[tuple[str, str]], cfg: DataConfig) -> None:
        sar_infos, bad_sar = scan_chips([s for s, _ in pairs], cfg, what="paired SAR chip")
        by_path = {i.path: i for i in sar_infos}
        self.pairs: list[tuple[ChipInfo, str, tuple[int, ...]]] = []
        bad = list(bad_sar)
        for s, o in pairs:
            if s not in by_path:
                continue
            try:
                scan_chip(o)
            except (OSError, DataError) as e:
                bad.append(o)
                log.debug("skipping pair with unreadable optical image %s: %s", o, e)
                continue
            self.pairs.append((by_path[s], o, optical_bands(o)))
        report_bad(bad, len(pairs), cfg.max_bad_fraction, "pair")
        super().__init__(cfg, len(self.pairs), len(bad))
        self.channel_groups: dict[int, list[str]] = {}
        for info, _, _ in self.pairs:
            self.channel_groups.setdefault(1 if info.gray else len(info.bands), []).append(info.path)
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def source(self, index: int) -> str:
        info, opt, _ = self.pairs[index]
        return f"{info.path} + {opt}"

    def scaling_counts(self) -> dict[str, int]:
        """SAR chips per scaling kind ("uint8", "uint16", "db"; see ``scaling.scaling_kind``)."""
        return dict(Counter(scaling_kind(i.dtype, self.cfg.units) for i, _, _ in self.pairs))

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        info, opt_path, bands = self.pairs[index]
        sar = torch.from_numpy(map_channels(read_chip(info, self.cfg), self.cfg.in_chans))
        opt = torch.from_numpy(read_optical(opt_path, bands))
        if opt.shape[1:] != sar.shape[1:]:
            opt = torch.nn.functional.interpolate(opt[None], size=tuple(sar.shape[1:]), mode="bilinear",
                                                  align_corners=False, antialias=True)[0].clamp_(0, 1)
        both = fit_size(torch.cat([sar, opt]), self.cfg.img_size, self.cfg.resize, rng)
        c = self.cfg.in_chans
        return {"sar": both[:c].contiguous(), "optical": ((both[c:] - self._mean) / self._std).contiguous(),
                "paired": torch.tensor(True), "source": info.path}
