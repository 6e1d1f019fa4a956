"""SAR values -> intensities in [0, 1] (what SARMAE works on), and fitting images to ``img_size``.

The scaling rule, decided per file from the file alone (so it is deterministic per file):

1. 8-bit chips (uint8 without a GDAL scale/offset: JPEG/PNG display images such as MSTAR, HRSID):
   ``x / 255``, whatever ``units`` says.
2. 16-bit unsigned integers without scale/offset: ``x / 65535``, unless ``units`` is given; then
   they are calibrated values in those units (rule 4).
3. Complex data (SLC) is read as ``|z|^2``: linear power, whatever ``units`` says.
4. Everything else (float, other integers, scaled integers) is calibrated backscatter: its units
   are ``units`` when given, else detected with ``engine.radiometry.detect_units`` (unit words in
   band descriptions, tags or the file name; then statistics: >= 5 % negative values -> dB).
   Statistics alone never say "amplitude" for float data here: a non-negative float chip is
   linear power (bright ship chips have a 99th percentile above 10, which the engine's rule would
   call amplitude).

Calibrated values (rules 2 with ``units``, 3, 4) are converted to dB
(``engine.radiometry.convert_units``), clipped to ``clip_db`` and mapped linearly to [0, 1]:
``(clip(db, lo, hi) - lo) / (hi - lo)``.

Invalid pixels (nodata, NaN, inf) become 0. Detection on a chip uses all its valid pixels; on a
large raster the engine's few sampled windows, once per raster.

Fitting to ``img_size`` (``fit_size``): ``resize`` interpolates bilinearly with antialiasing (the
aspect ratio is not kept: SAR chips are square in practice); ``crop`` takes a random crop where the
image is larger and zero-pads (centred) where it is smaller.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from engine.reader import SarRaster

UINT8, UINT16 = "uint8", "uint16"  # the two display/DN "units" besides the calibrated ones
GRAY_TOLERANCE = 2.0 / 255.0  # 3-band chips whose bands differ by at most this (in [0, 1]) are gray


def split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """A dataset key -> ``(epoch, index)``; plain integers belong to epoch 0."""
    if isinstance(key, tuple):
        epoch, index = key
        return int(epoch), int(index)
    return 0, int(key)


def item_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The random generator of one item: a function of (seed, epoch, index, stream) only, so
    workers and ranks that load different indices never repeat each other's draws."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(stream)])


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence INFO messages of one logger (detect_units logs every call; chips are many)."""
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def source_units(raster: SarRaster, sample: np.ndarray | None, units: str | None,
                 quiet: bool = True) -> str:
    """The unit of what ``raster.read`` returns, by the rule in the module docstring.

    Args:
        raster: the open file (after band selection).
        sample: valid values already read (any shape), or None to let the engine sample windows.
        units: the user's units for non-8-bit data (already normalised), or None for auto.
        quiet: do not log the engine's per-file detection message.

    Returns:
        "uint8", "uint16", "db", "linear_power" or "amplitude".

    Raises:
        engine.errors.RasterInputError: the units cannot be told from the values.
    """
    from engine.radiometry import detect_units

    scaled = any(s != 1.0 or o != 0.0 for s, o in zip(raster.scales, raster.offsets, strict=True))
    dtypes = set(raster.dtypes)
    if not raster.is_complex and not scaled and dtypes == {"uint8"}:
        return UINT8
    if raster.is_complex:
        return "linear_power"  # the reader returns |z|^2 (SarRaster's default complex_mode)
    if units is not None:
        return units
    if not raster.is_complex and not scaled and dtypes == {"uint16"}:
        return UINT16
    with _quiet("engine.radiometry") if quiet else contextlib.nullcontext():
        found, reason = detect_units(raster, sample)
    is_float = all(np.dtype(d).kind == "f" for d in dtypes)
    if found == "amplitude" and is_float and reason.startswith("statistics"):
        return "linear_power"
    return found


def scaling_kind(dtype: str, units: str | None) -> str:
    """How a source with this header dtype is scaled, for the model's input contract: "uint8"
    (x / 255), "uint16" (x / 65535) or "db" (calibrated, dB clipped to ``clip_db``)."""
    if dtype == UINT8:
        return UINT8
    if dtype == UINT16 and units is None:
        return UINT16
    return "db"


def to_unit(x: np.ndarray, valid: np.ndarray, units: str, clip_db: tuple[float, float]) -> np.ndarray:
    """Values in ``units`` -> float32 in [0, 1]; pixels where ``valid`` is False become 0.

    Args:
        x: (C, H, W) values as read.
        valid: (H, W) or (C, H, W) bool.
        units: from ``source_units``.
        clip_db: (low, high) dB range mapped to [0, 1] for calibrated data.
    """
    from engine.radiometry import convert_units

    if units == UINT8:
        out = np.asarray(x, np.float32) / 255.0
    elif units == UINT16:
        out = np.asarray(x, np.float32) / 65535.0
    else:
        lo, hi = clip_db
        db = convert_units(x, units, "db")
        out = (np.clip(db, lo, hi) - lo) / (hi - lo)
    out = np.clip(np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0).astype(np.float32)
    out *= np.broadcast_to(valid, out.shape)
    return out


def is_gray(x: np.ndarray, tol: float = GRAY_TOLERANCE) -> bool:
    """True when a (3, H, W) image in [0, 1] is gray stored as RGB (all bands equal within ``tol``)."""
    return x.shape[0] == 3 and bool(np.abs(x[1:] - x[:1]).max(initial=0.0) <= tol)


def fit_size(x: torch.Tensor, size: int, mode: str, rng: np.random.Generator | None = None) -> torch.Tensor:
    """(C, h, w) -> (C, size, size) by ``mode`` ("resize" or "crop", see the module docstring)."""
    c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    if mode == "resize":
        y = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear",
                                            align_corners=False, antialias=True)[0]
        return y.clamp_(0.0, 1.0)
    if mode != "crop":
        raise ValueError(f"unknown resize mode {mode!r}: use resize or crop")
    rng = rng if rng is not None else np.random.default_rng(0)
    r0 = int(rng.integers(0, h - size + 1)) if h > size else 0
    c0 = int(rng.integers(0, w - size + 1)) if w > size else 0
    crop = x[:, r0:r0 + size, c0:c0 + size]
    ch, cw = crop.shape[1:]
    if (ch, cw) == (size, size):
        return crop.contiguous()
    out = x.new_zeros((c, size, size))
    top, left = (size - ch) // 2, (size - cw) // 2
    out[:, top:top + ch, left:left + cw] = crop
    return out
