"""Radiometry: from what the file holds to the model's normalised input.

A model package's ``model.json`` states its input contract (key ``"input"``)::

    {"bands": ["VV", "VH"], "units": "db", "clip": [-30.0, 5.0],
     "mean": [0.5, 0.5], "std": [0.5, 0.5], "nodata": "mask"}

The file's units are detected (``detect_units``) or given by the user (``--input-units``), converted
to the contract's units (``convert_units``), clipped, scaled to [0, 1] and standardised:
``x = (clip(x, lo, hi) - lo) / (hi - lo)``, then ``x = (x - mean) / std``; invalid pixels become 0.
Conversions that have no meaning (8-bit display values <-> calibrated units) are refused.

A contract may add ``"standardise": {"per": "window", "centre": "median", "spread": "iqr" | dB}``
(``standardise_windows``): each window's bands in decibels, minus that window's median, divided by
its interquartile range (or a fixed number of dB). A gain (another sensor's calibration, another
incidence angle, an 8-bit stretch) is an offset in dB, so the model's input no longer depends on it.
Training applies the same function to the same input (``training.finetune.common.model_input``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.card import check_standardise
from engine.errors import PackageError, RasterInputError

if TYPE_CHECKING:  # pragma: no cover
    from engine.reader import SarRaster

log = logging.getLogger(__name__)

UNITS = ("linear_power", "amplitude", "db", "uint8")
UNIT_LABEL = {"linear_power": "linear power", "amplitude": "amplitude", "db": "dB", "uint8": "8-bit display"}
_ALIASES = {"linear": "linear_power", "power": "linear_power", "intensity": "linear_power",
            "linear_power": "linear_power", "amplitude": "amplitude", "magnitude": "amplitude",
            "db": "db", "decibel": "db", "uint8": "uint8", "display": "uint8", "byte": "uint8"}
POWER_FLOOR = 1e-10  # linear power floor before log10: 1e-10 -> -100 dB (never -inf)
# Metadata words that name a unit, strongest first (a 'Sigma0_VV_db' band is in dB).
_UNIT_WORDS = (("db", ("DB", "DECIBEL", "DECIBELS")),
               ("amplitude", ("AMPLITUDE", "MAGNITUDE")),
               ("linear_power", ("LINEAR", "INTENSITY", "POWER", "SIGMA0", "GAMMA0", "BETA0")))


def normalise_units(name: str) -> str:
    """Canonical unit name from a user's spelling ('dB', 'linear', 'intensity', ...)."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _ALIASES:
        raise RasterInputError(f"unknown input units '{name}': use one of {', '.join(UNITS)}")
    return _ALIASES[key]


def convert_units(x: np.ndarray, src_units: str, dst_units: str) -> np.ndarray:
    """Convert values between linear power, amplitude and dB (float32 out).

    ``db = 10 log10(power) = 20 log10(amplitude)``, ``power = amplitude^2``. Power is floored at
    1e-10 (-100 dB) before the log so zeros never become -inf; 0 dB is ordinary data (power 1).
    8-bit display values ("uint8") have no calibrated unit: they only feed a uint8 model.

    Raises:
        RasterInputError: one side is "uint8" and the other is not.
    """
    src, dst = normalise_units(src_units), normalise_units(dst_units)
    if src == dst:
        return np.asarray(x, dtype=np.float32)
    if "uint8" in (src, dst):
        raise RasterInputError(
            f"cannot convert {UNIT_LABEL[src]} values to {UNIT_LABEL[dst]}: 8-bit display images "
            "(JPEG/PNG, 0-255) have no calibrated unit. If the file is actually calibrated, say so "
            "with --input-units (linear_power, amplitude or db); otherwise use a model trained on "
            "8-bit chips (input units 'uint8').")
    x64 = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        power = {"linear_power": lambda: x64, "amplitude": lambda: x64 * x64,
                 "db": lambda: 10.0 ** (x64 / 10.0)}[src]()
        if dst == "linear_power":
            out = power
        elif dst == "amplitude":
            out = np.sqrt(np.maximum(power, 0.0))
        else:
            out = 10.0 * np.log10(np.maximum(power, POWER_FLOOR))
    return out.astype(np.float32)


STANDARDISE_FLOOR = 1e-3  # [0, 1]-scaled amplitude / power floor before the log: zeros never become -inf
STANDARDISE_CLIP = 6.0  # standardised values are clipped to +-6 spreads (zero pixels, saturated targets)
MIN_SPREAD_DB = 1.0  # a flat window's spread is floored at 1 dB (no division by ~0)


def standardise_windows(x: np.ndarray, contract: Any, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-window, per-band standardisation in decibels (the contract's ``standardise``).

    ``x``: model input as the contract's clip/mean/std make it, (C, H, W) or (N, C, H, W); ``valid``:
    (H, W) or (N, H, W), the pixels the statistics come from (None: all). Per window and band:
    ``L`` = the value in dB (dB contracts: the clipped value itself; amplitude and 8-bit display values:
    ``20 log10``, linear power ``10 log10`` of the [0, 1]-scaled value, floored at
    ``STANDARDISE_FLOOR``), then ``(L - median(L)) / spread``, spread = the interquartile range in dB
    (at least ``MIN_SPREAD_DB``) or the fixed dB of ``spread``, clipped to +-``STANDARDISE_CLIP``.
    A gain g dB adds g to every ``L`` of the window, which the median removes (up to clipping at
    the contract's range). With ``smooth`` (px) the standardised window is then low-passed by a
    Gaussian of that sigma (a multilook in dB: the model keys less on the speckle of one processing
    chain, which fresh speckle or any resampling changes). Invalid pixels come out 0. Returns float32
    of ``x``'s shape.
    """
    spec = contract["standardise"]
    problem = check_standardise(spec)
    if problem:
        raise PackageError(f"model input contract: 'standardise' {problem}")
    one = x.ndim == 3
    xs = np.asarray(x, np.float32)[None] if one else np.asarray(x, np.float32)
    n, c = xs.shape[:2]
    mean = np.asarray(contract["mean"], np.float32)[:c].reshape(1, c, 1, 1)
    std = np.asarray(contract["std"], np.float32)[:c].reshape(1, c, 1, 1)
    v = np.clip(xs * std + mean, 0.0, 1.0)  # [0, 1] scaled, as clipped
    units = normalise_units(contract["units"])
    if units == "db":
        lo, hi = (float(b) for b in contract["clip"])
        db = lo + v * (hi - lo)
    else:
        db = (10.0 if units == "linear_power" else 20.0) * np.log10(np.maximum(v, STANDARDISE_FLOOR))
    flat = db.reshape(n, c, -1)
    if valid is not None:
        ok = np.broadcast_to(np.asarray(valid, bool).reshape(n, 1, -1), flat.shape)
        flat = np.where(ok, flat, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-invalid windows: NaN statistics, zeros out
        q25, med, q75 = (np.nanpercentile if valid is not None else np.percentile)(flat, [25, 50, 75], axis=-1)
    spread = spec.get("spread", "iqr")
    scale = np.maximum(q75 - q25, MIN_SPREAD_DB) if spread == "iqr" else np.full_like(med, float(spread))
    out = np.clip((db - med[..., None, None]) / scale[..., None, None], -STANDARDISE_CLIP, STANDARDISE_CLIP)
    out = np.nan_to_num(out, nan=0.0)
    if spec.get("smooth"):
        from scipy.ndimage import gaussian_filter

        s = float(spec["smooth"])
        out = gaussian_filter(out.astype(np.float32, copy=False), sigma=(0, 0, s, s), mode="mirror", truncate=3.0)
    if valid is not None:
        out = np.where(np.asarray(valid, bool).reshape(n, 1, *xs.shape[2:]), out, 0.0)
    out = out.astype(np.float32, copy=False)
    return out[0] if one else out


def sample_windows(height: int, width: int, size: int = 256, n: int = 5) -> list[Any]:
    """Up to ``n`` windows of at most ``size`` px spread over the raster (centre, then quadrants)."""
    from engine.tiling import Window

    h, w = min(size, height), min(size, width)
    centres = [(0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)][:n]
    out = []
    for fr, fc in centres:
        r = min(max(int(fr * height) - h // 2, 0), height - h)
        c = min(max(int(fc * width) - w // 2, 0), width - w)
        win = Window(r, c, h, w)
        if win not in out:
            out.append(win)
    return out


def grid_windows(height: int, width: int, size: int = 32, n: int = 16) -> list[Any]:
    """An n x n grid of small windows spread evenly over the raster (the fallback sample)."""
    from engine.tiling import Window

    h, w = min(size, height), min(size, width)
    rows = sorted({int(r) for r in np.linspace(0, height - h, n)})
    cols = sorted({int(c) for c in np.linspace(0, width - w, n)})
    return [Window(r, c, h, w) for r in rows for c in cols]


def detect_units(raster: SarRaster, sample: np.ndarray | None = None) -> tuple[str, str]:
    """Guess the units of what ``raster.read`` returns; give the reason (also logged).

    The heuristic, first rule that applies:

    1. complex bands (SLC): the reader returns |z|^2 ("linear_power") or |z| ("amplitude")
       according to its ``complex_mode``;
    2. uint8 without a scale/offset: "uint8", an 8-bit display image (JPEG/PNG, quick-looks);
    3. band descriptions, band/dataset tags or the file name containing a unit word:
       dB/decibel -> "db", amplitude/magnitude -> "amplitude",
       linear/intensity/power/sigma0/gamma0/beta0 -> "linear_power" (dB wins: 'Sigma0_VV_db');
    4. statistics of valid pixels (``sample``, else a few windows spread over the raster, never the
       whole raster; when those hold no valid pixel, a sparse 16 x 16 grid of small windows over
       the whole area): >= 5 % negative values and median in [-50, 15] -> "db"; values symmetric
       about 0 -> refused (real/imaginary parts?); non-negative with 99th percentile <= 10 ->
       "linear_power"; non-negative and larger (uint16 DN, amplitudes) -> "amplitude".

    Rule 4 cannot tell a float amplitude below ~10 from linear power (it says linear power):
    callers let the user override with ``--input-units``.

    Args:
        raster: the open raster (after band selection).
        sample: optional values already read, any shape, invalid pixels as NaN or removed.

    Raises:
        RasterInputError: no valid pixel to look at, or statistics that fit no unit.
    """
    units, reason = _detect(raster, sample)
    log.info("input units: %s (%s)", UNIT_LABEL[units], reason)
    return units, reason


def _detect(raster: SarRaster, sample: np.ndarray | None) -> tuple[str, str]:
    """The rules of ``detect_units``, without the logging."""
    if raster.is_complex:
        units = "linear_power" if raster.complex_mode == "intensity" else "amplitude"
        what = "|z|^2, i.e. intensity" if units == "linear_power" else "|z|, i.e. amplitude"
        return units, f"complex {raster.dtype} bands (SLC): the reader returns {what}"
    if all(d == "uint8" for d in raster.dtypes) and not _is_scaled(raster):
        return "uint8", "uint8 pixels: an 8-bit display image with no calibrated unit"
    hint = _metadata_hint(raster)
    if hint is not None:
        return hint
    from_windows = sample is None
    if sample is None:
        parts = [x[:, v] for x, v in (raster.read(w) for w in sample_windows(raster.height, raster.width))]
        sample = np.concatenate([p.ravel() for p in parts])
    vals = np.asarray(sample, dtype=np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    if vals.size == 0 and from_windows:
        # mostly-empty rasters (mosaics, swath edges): a sparse grid of small windows over the whole area
        parts = [x[:, v] for x, v in (raster.read(w) for w in grid_windows(raster.height, raster.width))]
        vals = np.concatenate([p.ravel() for p in parts]).astype(np.float64)
        vals = vals[np.isfinite(vals)]
    where = ", ".join(Path(p).name for p in raster.paths)
    if vals.size == 0:
        raise RasterInputError(f"{where}: no valid pixel in the sampled windows, so the units cannot be "
                               "detected. Check the nodata value, or give --input-units.")
    neg = float(np.mean(vals < 0))
    med, p99 = float(np.median(vals)), float(np.percentile(vals, 99))
    q25, q75 = np.percentile(vals, [25, 75])
    stats = f"{vals.size} sampled pixels: {neg:.0%} negative, median {med:.3g}, 99th percentile {p99:.3g}"
    if 0.35 < neg < 0.65 and abs(med) < 0.1 * float(q75 - q25):
        raise RasterInputError(f"{where}: values are symmetric about 0 ({stats}), like the real and "
                               "imaginary parts of complex data, not backscatter. Give the complex "
                               "raster, or --input-units if you know the unit.")
    if neg >= 0.05 and -50.0 <= med <= 15.0:
        return "db", f"statistics: {stats} -> dB"
    if neg < 0.001 and p99 <= 10.0:
        return "linear_power", f"statistics: {stats} -> linear power"
    if neg < 0.001:
        return "amplitude", f"statistics: {stats} (large non-negative values) -> amplitude"
    raise RasterInputError(f"{where}: cannot tell the units from the values ({stats}). "
                           "Give --input-units (linear_power, amplitude, db or uint8).")


def _is_scaled(raster: SarRaster) -> bool:
    """True when GDAL scale/offset turn the stored integers into physical values."""
    return any(s != 1.0 or o != 0.0 for s, o in zip(raster.scales, raster.offsets, strict=True))


def _metadata_hint(raster: SarRaster) -> tuple[str, str] | None:
    """Units named by band descriptions, tags (keys and values) or file names, strongest first."""
    from engine.reader import name_tokens

    texts = [(f"band description '{d}'", d) for d in raster.descriptions if d]
    for tags in raster.tags():
        texts += [(f"tag {k}={v!r}", f"{k} {v}") for k, v in tags.items() if not k.startswith("STATISTICS_")]
    texts += [(f"file name '{Path(p).name}'", Path(p).stem) for p in raster.paths]
    for units, words in _UNIT_WORDS:
        for where, text in texts:
            found = [t for t in name_tokens(text) if t in words]
            if found:
                return units, f"{where} says '{found[0].lower()}'"
    return None


class Radiometry:
    """Turns reader output (C, h, w) into the model's normalised input, per its contract.

    Args:
        contract: the ``"input"`` dict of model.json (bands, units, clip, mean, std, nodata).
        src_units: units of the values the reader returns (see ``detect_units``).
        band_names: the raster's channel names, in order (``SarRaster.band_names``).
        reason: why ``src_units`` was chosen, for ``describe()``.
        source: file name(s) for error messages.

    Raises:
        PackageError: the contract itself is malformed.
        RasterInputError: the raster's channels or units do not meet the contract.
    """

    def __init__(self, contract: dict[str, Any], src_units: str, band_names: Sequence[str],
                 reason: str = "", source: str = "the input"):
        self.bands = [str(b) for b in contract.get("bands", [])]
        # the model's channels: the bands, or (a CLIP package) band names and "mean" of the scaled bands
        self.channels = [str(c) for c in contract.get("channels") or self.bands]
        n, m = len(self.bands), len(self.channels)
        try:
            self.units = normalise_units(contract["units"])
            lo, hi = (float(v) for v in contract["clip"])
            ranges = np.asarray(contract.get("band_clip") or [[lo, hi]] * n, np.float32).reshape(n, 2)
            mean = np.broadcast_to(np.asarray(contract.get("mean", [0.0]), np.float32), (m,))
            std = np.broadcast_to(np.asarray(contract.get("std", [1.0]), np.float32), (m,))
            self._sources = [-1 if c == "mean" else self.bands.index(c) for c in self.channels]
        except (KeyError, TypeError, ValueError, RasterInputError) as e:
            raise PackageError(f"model input contract {contract!r} is malformed ({e}); it needs "
                               "bands, units, clip [lo, hi], mean and std per band") from e
        if (n == 0 or not lo < hi or np.any(ranges[:, 0] >= ranges[:, 1]) or np.any(std <= 0)
                or contract.get("nodata", "mask") != "mask" or contract.get("stretch") not in (None, "minmax")):
            raise PackageError(f"model input contract {contract!r} is malformed: needs at least one "
                               "band, clip low < high, std > 0, nodata 'mask' and stretch minmax or none")
        self.clip, self.stretch = (lo, hi), contract.get("stretch")
        self._lo, self._hi = ranges[:, :1, None].copy(), ranges[:, 1:, None].copy()
        self.mean, self.std = mean.reshape(m, 1, 1).copy(), std.reshape(m, 1, 1).copy()
        self.src_units, self.reason = normalise_units(src_units), reason
        self.band_names = list(band_names)
        self.contract = dict(contract)
        self.standardise = contract.get("standardise")
        if self.standardise is not None and check_standardise(self.standardise):
            raise PackageError(f"model input contract: 'standardise' {check_standardise(self.standardise)}")
        self._check_bands(source)
        dd = contract.get("display_db")  # 8-bit display values read as [lo, hi] dB, as the model was trained
        self.display_db = (float(dd[0]), float(dd[1])) if dd and self.src_units == "uint8" and self.units == "db" \
            else None
        if self.display_db is None:
            convert_units(np.zeros(1, np.float32), self.src_units, self.units)  # refuses uint8 mismatches

    @classmethod
    def for_raster(cls, contract: dict[str, Any], raster: SarRaster, input_units: str | None = None) -> Radiometry:
        """Build from an open raster: detect its units unless ``input_units`` overrides them."""
        if input_units:
            units, reason = normalise_units(input_units), "given with --input-units"
            log.info("input units: %s (%s)", UNIT_LABEL[units], reason)
        else:
            units, reason = detect_units(raster)
        return cls(contract, units, raster.band_names, reason, ", ".join(Path(p).name for p in raster.paths))

    def _check_bands(self, source: str) -> None:
        want, have = self.bands, self.band_names
        want_s = "+".join(want)
        have_s = f"{len(have)} band{'s' if len(have) != 1 else ''} ({'+'.join(have)})"
        if len(want) != len(have):
            raise RasterInputError(
                f"the model wants {want_s} ({len(want)} channel(s)), {source} has {have_s}. Choose the "
                "bands with --bands, or give one file per polarisation on the same grid.")
        pols = {"VV", "VH", "HH", "HV"}
        for k, (w, h) in enumerate(zip(want, have, strict=True)):
            if w.upper() in pols and h.upper() in pols and w.upper() != h.upper():
                hint = f" Reorder with --bands {','.join(want)}." if sorted(
                    x.upper() for x in want) == sorted(x.upper() for x in have) else ""
                raise RasterInputError(f"the model wants {want_s}, {source} has {have_s}: channel "
                                       f"{k + 1} is {h}, not {w}.{hint}")

    def apply(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(C, h, w) reader values + (h, w) valid mask -> (C, h, w) float32 model input."""
        if x.ndim != 3 or x.shape[0] != len(self.bands) or valid.shape != x.shape[1:]:
            raise ValueError(f"expected x (C={len(self.bands)}, h, w) and valid (h, w), "
                             f"got {x.shape} and {valid.shape}")
        if self.display_db is not None:
            lo, hi = self.display_db
            y = lo + np.asarray(x, np.float32) / 255.0 * (hi - lo)
        else:
            y = convert_units(x, self.src_units, self.units)
        y = (np.clip(y, self._lo, self._hi) - self._lo) / (self._hi - self._lo)  # [0, 1] per band
        if self.stretch == "minmax" and valid.any():  # each band of the window over [0, 1], 8-bit levels
            v = y[:, valid]
            lo, hi = v.min(axis=1)[:, None, None], v.max(axis=1)[:, None, None]
            y = np.round((y - lo) / np.maximum(hi - lo, 1e-12) * 255.0) / 255.0
        if self.channels != self.bands:  # (C_bands, h, w) -> (C_model, h, w)
            y = np.stack([y.mean(axis=0) if i < 0 else y[i] for i in self._sources])
        y = (y - self.mean) / self.std
        if self.standardise is not None:  # per window, from its valid pixels (the module docstring)
            y = standardise_windows(y, self.contract, valid)
        y[:, ~valid] = 0.0
        return y.astype(np.float32, copy=False)

    def describe(self) -> str:
        """Short human summary for logs and provenance."""
        src = f"input units: {UNIT_LABEL[self.src_units]}" + (f" ({self.reason})" if self.reason else "")
        if self.display_db is not None:
            src += (f", read as {self.display_db[0]:g}..{self.display_db[1]:g} dB (the range the model's 8-bit "
                    "training chips stood for: an approximation, not a calibration)")
        elif self.src_units != self.units:
            src += f", converted to {UNIT_LABEL[self.units]}"
        unit = " dB" if self.units == "db" else ""
        clip = f"{self.clip[0]:g}..{self.clip[1]:g}{unit}"
        if np.any(self._lo.ravel() != self.clip[0]) or np.any(self._hi.ravel() != self.clip[1]):  # per band
            clip = ", ".join(f"{b} {lo:g}..{hi:g}" for b, lo, hi in zip(self.bands, self._lo.ravel(), self._hi.ravel(),
                                                                      strict=True)) + unit
        if self.stretch:
            clip += f", {self.stretch} stretch per window"
        if self.channels != self.bands:
            clip += f"; channels {'+'.join(self.channels)}"
        out = f"{src}; clip {clip}; mean/std {_fmt(self.mean)}/{_fmt(self.std)}"
        if self.standardise is not None:
            spread = self.standardise.get("spread", "iqr")
            out += (f"; then per window: dB minus its median, divided by "
                    f"{'its interquartile range' if spread == 'iqr' else f'{spread:g} dB'}")
        return out


def _fmt(a: np.ndarray) -> str:
    """'0.5' when every channel has the same value, else '0.4,0.6'."""
    return f"{a.flat[0]:g}" if np.all(a == a.flat[0]) else ",".join(f"{v:g}" for v in a.flat)
