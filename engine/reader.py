"""Read SAR rasters window by window: one multi-band file or single-band files stacked as channels.

``SarRaster`` keeps one open rasterio dataset per file for its lifetime and reads only the windows it
is asked for (never the whole raster), inside a ``rasterio.Env`` that bounds GDAL's block cache
(``GDAL_CACHEMAX``, 256 MB unless the environment says otherwise). Every read returns float32
channels plus a validity mask: declared nodata, NaN and +-inf are invalid and replaced by 0, so no
NaN reaches the model. Complex bands (SLC) become intensity ``|z|^2`` or amplitude ``|z|``.

Channels are named by polarisation when the file says so (band description, band tag such as
``POLARISATION``, or, for a single-band file, its name: OPERA's ``..._VV.tif``), else ``band<i>``.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engine.errors import RasterInputError

if TYPE_CHECKING:  # pragma: no cover
    from rasterio.io import DatasetReader

    from engine.tiling import Window

POLARISATIONS = ("VV", "VH", "HH", "HV")
MIN_SIDE = 2  # a raster must be at least 2x2 pixels (a 1x1 "image" is a value, not SAR imagery)
DEFAULT_CACHEMAX_MB = 256
_POL_TAG_KEYS = ("POLARISATION", "POLARIZATION", "POLARISATIONS", "POL", "POLARIMETRIC_INTERP")


def gdal_cachemax_mb() -> int:
    """The GDAL block cache bound in MB: ``GDAL_CACHEMAX`` from the environment when it is a number
    (GDAL reads values below 100000 as megabytes, larger ones as bytes) or ends in MB/GB; else 256."""
    raw = os.environ.get("GDAL_CACHEMAX", "").strip().upper()
    m = re.fullmatch(r"(\d+)\s*(MB|GB)?", raw)
    if m is None:
        return DEFAULT_CACHEMAX_MB
    value = int(m.group(1))
    if m.group(2) is None and value >= 100000:  # bytes
        value //= 1 << 20
    elif m.group(2) == "GB":
        value *= 1024
    return value if value > 0 else DEFAULT_CACHEMAX_MB


def gdal_env_options() -> dict[str, Any]:
    """GDAL options used around every open and read: a bounded block cache.

    ``rasterio.Env`` hands an integer ``GDAL_CACHEMAX`` to ``GDALSetCacheMax`` as BYTES, so the
    bound (``gdal_cachemax_mb``) is given in bytes: ``GDAL_CACHEMAX=256`` would be a 256-byte cache,
    which flushes every block (the writers' unfinished tiles too) at each read.
    """
    return {"GDAL_CACHEMAX": gdal_cachemax_mb() << 20}


def name_tokens(text: str) -> list[str]:
    """Upper-case alphanumeric tokens of a name: 'Sigma0_VV_db' -> ['SIGMA0', 'VV', 'DB']."""
    return [t for t in re.split(r"[^A-Za-z0-9]+", text.upper()) if t]


def _polarisation_in(text: str | None) -> str | None:
    """The single polarisation named in ``text`` (as a token), else None (none or ambiguous)."""
    found = {t for t in name_tokens(text or "") if t in POLARISATIONS}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class _Channel:
    """One source band: which open file, which 1-based band, and what it is called."""

    file: int  # index into SarRaster.paths
    band: int  # 1-based band index in that file
    name: str  # polarisation ("VV") when known, else description, else "band<i>"
    polarisation: str | None
    description: str | None


class SarRaster:
    """One or more rasters on the same grid, read as float32 channels window by window.

    Use ``SarRaster.open(...)`` (also a context manager); see the module docstring for the rules.
    Reads are serialised by a lock (GDAL datasets are not thread-safe), so one IO thread may read
    while another computes.
    """

    def __init__(self, paths: list[str], datasets: list[DatasetReader], channels: list[_Channel],
                 complex_mode: Literal["intensity", "amplitude"]):
        self.paths = paths
        self._ds = datasets
        self._channels = channels
        self.complex_mode = complex_mode
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, paths: list[str] | str, bands: list[int | str] | None = None,
             complex_mode: Literal["intensity", "amplitude"] = "intensity") -> SarRaster:
        """Open rasters and select channels.

        Args:
            paths: one multi-band file, or several files on the same grid whose bands are stacked
                as channels in the order given.
            bands: channels to keep, in order: 1-based indexes over the stacked bands, or names
                (polarisation VV/VH/HH/HV, case-insensitive, or a band description). None keeps all.
            complex_mode: complex bands become "intensity" (|z|^2, linear power) or "amplitude" (|z|).

        Raises:
            RasterInputError: a file is missing, not a raster, too small, on another grid, or lacks
                a requested band; the message names the file and what to do.
        """
        import rasterio

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [str(p) for p in paths]
        if not paths:
            raise RasterInputError("No input raster given: pass at least one file.")
        if complex_mode not in ("intensity", "amplitude"):
            raise RasterInputError(f"complex_mode must be 'intensity' or 'amplitude', not {complex_mode!r}")
        datasets: list[DatasetReader] = []
        try:
            with rasterio.Env(**gdal_env_options()):
                for p in paths:
                    datasets.append(_open_one(p))
            for p, ds in zip(paths[1:], datasets[1:], strict=True):
                _check_same_grid(paths[0], datasets[0], p, ds)
            all_channels = [ch for i, ds in enumerate(datasets) for ch in _channels_of(i, paths[i], ds)]
            chosen = _select(all_channels, bands, paths)
        except BaseException:
            for ds in datasets:
                ds.close()
            raise
        return cls(paths, datasets, chosen, complex_mode)

    def close(self) -> None:
        """Close every open dataset (idempotent)."""
        for ds in self._ds:
            ds.close()

    @property
    def closed(self) -> bool:
        return all(ds.closed for ds in self._ds)

    def __enter__(self) -> SarRaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SarRaster({', '.join(Path(p).name for p in self.paths)}: {self.width}x{self.height}, "
                f"{'+'.join(self.band_names)}, {self.dtype})")

    # --------------------------------------------------------------- properties
    @property
    def _first(self) -> DatasetReader:
        return self._ds[0]

    @property
    def height(self) -> int:
        return int(self._first.height)

    @property
    def width(self) -> int:
        return int(self._first.width)

    @property
    def count(self) -> int:
        """Number of channels after band selection."""
        return len(self._channels)

    def _per_channel(self, attr: str) -> list[Any]:
        """A per-band rasterio attribute (``dtypes``, ``nodatavals``, ...) for each selected channel."""
        return [getattr(self._ds[c.file], attr)[c.band - 1] for c in self._channels]

    @property
    def dtypes(self) -> list[str]:
        """Source data type of each selected channel (before conversion to float32)."""
        return self._per_channel("dtypes")

    @property
    def dtype(self) -> str:
        """Source data type of the first selected channel."""
        return self.dtypes[0]

    @property
    def is_complex(self) -> bool:
        return any("complex" in d for d in self.dtypes)

    @property
    def crs(self) -> Any:
        """The rasterio CRS of the grid, or None."""
        return self._first.crs

    @property
    def transform(self) -> Any:
        """The affine pixel -> CRS transform (identity when georeferenced by GCPs or not at all)."""
        return self._first.transform

    @property
    def gcps(self) -> list[Any]:
        """Ground control points (empty unless the file is georeferenced by GCPs)."""
        return list(self._first.gcps[0])

    @property
    def gcp_crs(self) -> Any:
        return self._first.gcps[1]

    @property
    def no_crs(self) -> bool:
        """True when the raster has neither a CRS nor GCPs: work happens in pixel space."""
        return self.crs is None and not self.gcps

    @property
    def georeferencing(self) -> str:
        """'transform', 'gcps', 'none', or 'identity' (a CRS with an identity transform: radar geometry)."""
        from affine import Affine

        if self.gcps:
            return "gcps"
        if self.crs is None:
            return "none"
        return "identity" if self.transform == Affine.identity() else "transform"

    @property
    def nodata(self) -> list[float | None]:
        """Declared nodata value per selected channel (None when not declared)."""
        return self._per_channel("nodatavals")

    @property
    def scales(self) -> list[float]:
        """GDAL scale per selected channel; ``read`` returns ``raw * scale + offset``."""
        return [float(1.0 if s is None else s) for s in self._per_channel("scales")]

    @property
    def offsets(self) -> list[float]:
        return [float(0.0 if o is None else o) for o in self._per_channel("offsets")]

    @property
    def band_names(self) -> list[str]:
        """Channel names: polarisation when known, else the band description, else 'band<i>'."""
        return [c.name for c in self._channels]

    @property
    def polarisations(self) -> list[str | None]:
        return [c.polarisation for c in self._channels]

    @property
    def descriptions(self) -> list[str | None]:
        return [c.description for c in self._channels]

    @property
    def block_shape(self) -> tuple[int, int]:
        """(rows, cols) of the first channel's storage blocks: windows aligned to it read fastest."""
        rows, cols = self._per_channel("block_shapes")[0]
        return int(rows), int(cols)

    def tags(self) -> list[dict[str, str]]:
        """Metadata of each selected channel: its band tags merged over its file's dataset tags."""
        return [{**self._ds[c.file].tags(), **self._ds[c.file].tags(c.band)} for c in self._channels]

    def describe(self) -> str:
        """A one-line summary for logs."""
        crs = self.crs.to_string() if self.crs is not None else "no CRS"
        geo = {"gcps": f"{len(self.gcps)} GCPs", "none": "pixel space (no CRS, no GCPs)",
               "identity": f"{crs} with an identity transform (radar geometry)", "transform": crs}
        return (f"{', '.join(Path(p).name for p in self.paths)}: {self.width}x{self.height} px, "
                f"{self.count} channel(s) {'+'.join(self.band_names)}, {self.dtype}, "
                f"{geo[self.georeferencing]}, nodata {self.nodata}")

    # -------------------------------------------------------------------- reading
    def read(self, window: Window, pad_to: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read one window of every selected channel.

        Args:
            window: ``Window(row_off, col_off, height, width)`` inside the raster.
            pad_to: optional (height, width) >= the window's: the result is zero-padded at the
                bottom/right to that size, and the padding is marked invalid.

        Returns:
            ``x`` float32 (C, h, w) and ``valid`` bool (h, w) (h, w = ``pad_to`` when given).
            Invalid pixels (nodata in any channel, NaN, +-inf, GDAL mask, padding) hold 0 in ``x``.
        """
        import rasterio
        from rasterio.enums import MaskFlags
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window as RioWindow

        r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        if h <= 0 or w <= 0 or r0 < 0 or c0 < 0 or r0 + h > self.height or c0 + w > self.width:
            raise ValueError(f"window {window} is not inside the {self.height}x{self.width} raster {self.paths[0]}")
        out_h, out_w = pad_to if pad_to is not None else (h, w)
        if out_h < h or out_w < w:
            raise ValueError(f"pad_to {pad_to} is smaller than the window {h}x{w}")
        x = np.zeros((self.count, out_h, out_w), dtype=np.float32)
        valid = np.zeros((out_h, out_w), dtype=bool)
        ok = np.ones((h, w), dtype=bool)
        rio_win = RioWindow(c0, r0, w, h)  # rasterio's order: col_off, row_off, width, height
        got = []  # (channel, values, mask, nodata, scale, offset): only GDAL's calls hold the lock
        with self._lock, rasterio.Env(**gdal_env_options()):
            for f, ds in enumerate(self._ds):
                picks = [(k, c.band) for k, c in enumerate(self._channels) if c.file == f]
                if not picks:
                    continue
                indexes = sorted({b for _, b in picks})
                try:
                    raw = ds.read(indexes, window=rio_win)
                    masks = None
                    if any(MaskFlags.per_dataset in ds.mask_flag_enums[b - 1] or MaskFlags.alpha
                           in ds.mask_flag_enums[b - 1] for b in indexes):
                        masks = ds.read_masks(indexes, window=rio_win)
                except RasterioIOError as e:  # a truncated or damaged file: GDAL fails on its blocks
                    raise RasterInputError(
                        f"{self.paths[f]}: reading rows {r0}..{r0 + h - 1}, columns {c0}..{c0 + w - 1} failed "
                        f"({_gdal_reason(e)}); the file is truncated or damaged: copy it again (or re-export it) "
                        "and check it with 'gdalinfo -checksum'") from e
                got += [(k, raw[indexes.index(b)], None if masks is None else masks[indexes.index(b)],
                         ds.nodatavals[b - 1], ds.scales[b - 1], ds.offsets[b - 1]) for k, b in picks]
        converted = False  # values changed on the way to float32 (they may overflow: checked below)
        for k, arr, mask, nodata, scale, offset in got:  # outside the lock: other threads read meanwhile
            ok &= _valid_of(arr, nodata)
            if mask is not None:
                ok &= mask > 0
            converted |= np.iscomplexobj(arr) or scale not in (None, 1.0) or offset not in (None, 0.0)
            x[k, :h, :w] = self._to_float(arr, scale, offset)
        if converted:  # scale/offset or |z|^2 may overflow float32
            ok &= np.isfinite(x[:, :h, :w]).all(axis=0)
        if not ok.all():
            x[:, :h, :w][:, ~ok] = 0.0
        valid[:h, :w] = ok
        return x, valid

    def _to_float(self, arr: np.ndarray, scale: float, offset: float) -> np.ndarray:
        """Source values -> float32: complex -> intensity/amplitude, then GDAL scale/offset."""
        with np.errstate(over="ignore", invalid="ignore"):
            if np.iscomplexobj(arr):
                mag2 = arr.real.astype(np.float64) ** 2 + arr.imag.astype(np.float64) ** 2
                out = mag2 if self.complex_mode == "intensity" else np.sqrt(mag2)
            else:
                out = arr
            if scale not in (None, 1.0) or offset not in (None, 0.0):
                out = out * (1.0 if scale is None else scale) + (0.0 if offset is None else offset)
            return np.asarray(out, dtype=np.float32)


def _gdal_reason(e: BaseException) -> str:
    """GDAL's own reason for a failed read: rasterio's message, or its cause's when the message is
    only 'Read failed. See previous exception' (first line, shortened)."""
    texts = [str(x) for x in (e, e.__cause__, e.__context__) if x is not None and str(x)]
    useful = [t for t in texts if "See previous exception" not in t] or texts or [type(e).__name__]
    return useful[0].splitlines()[0][:300]


def _valid_of(arr: np.ndarray, nodata: float | None) -> np.ndarray:
    """True where ``arr`` (source dtype) is neither the declared nodata nor NaN/inf."""
    ok = np.isfinite(arr) if arr.dtype.kind in "fc" else np.ones(arr.shape, dtype=bool)
    if nodata is not None and not np.isnan(nodata) and arr.dtype.kind != "c":
        with np.errstate(invalid="ignore", over="ignore"):
            nd = np.array(nodata).astype(arr.dtype)
        if nd == nodata:  # a nodata the dtype cannot hold (e.g. -1 in uint8) matches nothing
            ok &= arr != nd
    return ok


def _open_one(path: str) -> DatasetReader:
    """Open one file, or raise RasterInputError saying what is wrong and what to do."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    gdal_path = path.startswith("/vsi") or "://" in path or re.match(r"[A-Za-z][A-Za-z0-9_]+:", path) is not None
    # the last: a GDAL subdataset name, DRIVER:file:name (e.g. netcdf:scene.nc:VV; not a Windows drive)
    if not gdal_path and not Path(path).exists():
        raise RasterInputError(f"Input raster not found: {path} (working directory {os.getcwd()}). "
                               "Check the path and that the file exists.")
    if path.lower().endswith(".npy"):
        raise RasterInputError(f"{path} is a NumPy array, not a raster. Save it as a GeoTIFF first "
                               "(see engine.reader.npy_complex_to_geotiff for a real/imag SLC array).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except RasterioIOError as e:
        raise RasterInputError(f"{path} is not a raster GDAL can read ({e}). Give a GeoTIFF, VRT, "
                               "JPEG/PNG or another GDAL-readable image.") from e
    if ds.count == 0 and ds.subdatasets:  # a container (NetCDF, HDF5, GeoPackage tiles...): name its rasters
        subs = list(ds.subdatasets)
        ds.close()
        shown = "\n  ".join(subs[:20]) + (f"\n  ... and {len(subs) - 20} more" if len(subs) > 20 else "")
        raise RasterInputError(f"{path} is a container of {len(subs)} raster(s) (subdatasets), not a raster itself; "
                               f"give one of them as the input, e.g. '{subs[0]}':\n  {shown}")
    if ds.width < MIN_SIDE or ds.height < MIN_SIDE or ds.count == 0:
        size = f"{ds.width}x{ds.height} px, {ds.count} band(s)"
        ds.close()
        raise RasterInputError(f"{path} is too small to be SAR imagery worth running a model on "
                               f"({size}; need at least {MIN_SIDE}x{MIN_SIDE} px and one band). "
                               "Check that this is the image and not a metadata or quick-look file.")
    return ds


def _check_same_grid(path_a: str, a: DatasetReader, path_b: str, b: DatasetReader) -> None:
    """Stacked files must share size, CRS, transform and GCPs; otherwise name both files."""
    problems = []
    if (a.width, a.height) != (b.width, b.height):
        problems.append(f"size {a.width}x{a.height} vs {b.width}x{b.height}")
    if a.crs != b.crs:
        problems.append(f"CRS {a.crs} vs {b.crs}")
    if not a.transform.almost_equals(b.transform):
        problems.append(f"transform {tuple(a.transform)[:6]} vs {tuple(b.transform)[:6]}")
    gcp_a = [(g.row, g.col, g.x, g.y) for g in a.gcps[0]]
    gcp_b = [(g.row, g.col, g.x, g.y) for g in b.gcps[0]]
    if len(gcp_a) != len(gcp_b) or (gcp_a and not np.allclose(gcp_a, gcp_b)):
        problems.append(f"GCPs differ ({len(gcp_a)} vs {len(gcp_b)} points)")
    if problems:
        raise RasterInputError(f"{path_a} and {path_b} are not on the same grid ({'; '.join(problems)}), "
                               "so their bands cannot be stacked as channels. Resample one onto the "
                               "other's grid first (e.g. gdalwarp -te/-tr, or a VRT).")


def _channels_of(file: int, path: str, ds: DatasetReader) -> list[_Channel]:
    """Name each band of one file: description, band/dataset tags, then the file name."""
    out = []
    for b in range(1, ds.count + 1):
        desc = ds.descriptions[b - 1] or None
        pol = _polarisation_in(desc) if desc else None
        if pol is None:
            tags = {k.upper(): v for k, v in {**ds.tags(), **ds.tags(b)}.items()}
            pol = next((p for k in _POL_TAG_KEYS if (p := _polarisation_in(tags.get(k))) is not None), None)
        if pol is None and ds.count == 1:
            pol = _polarisation_in(Path(path).stem)
        out.append(_Channel(file, b, pol or desc or f"band{b}", pol, desc))
    return out


def _select(channels: list[_Channel], bands: list[int | str] | None, paths: list[str]) -> list[_Channel]:
    """Pick channels by 1-based index over the stack, or by polarisation/description name.

    A name matches polarisations first, then descriptions; asking twice for a name present in
    several files (VV of two dates) takes them in file order.
    """
    if bands is None:
        return list(channels)
    if len(bands) == 0:
        raise RasterInputError(f"no band selected from {', '.join(paths)}: give at least one band.")

    def have() -> str:
        return "; ".join(f"{k + 1}: {c.name} ({Path(paths[c.file]).name} band {c.band})"
                         for k, c in enumerate(channels))

    chosen = []
    for sel in bands:
        if isinstance(sel, str) and sel.strip().isdigit():
            sel = int(sel.strip())
        if isinstance(sel, (int, np.integer)) and not isinstance(sel, bool):
            if not 1 <= sel <= len(channels):
                raise RasterInputError(f"band {sel} is not in {', '.join(paths)}: it has "
                                       f"{len(channels)} band(s) ({have()}). Bands are numbered from 1.")
            chosen.append(channels[sel - 1])
            continue
        key = str(sel).strip().upper()
        match = [c for c in channels if c.polarisation == key] or \
                [c for c in channels if (c.description or "").upper() == key or c.name.upper() == key]
        if not match:
            raise RasterInputError(
                f"{'polarisation' if key in POLARISATIONS else 'band'} {sel!s} is not in "
                f"{', '.join(paths)}: it has {have()}. Choose one of these with --bands, or give the "
                "file holding that polarisation (one file per polarisation is fine).")
        # the k-th request for a name takes the k-th match (VV of date 1, then VV of date 2, ...)
        chosen.append(next((c for c in match if c not in chosen), match[0]))
    return chosen


def npy_complex_to_geotiff(npy_path: str, tif_path: str) -> str:
    """Save a (H, W, 2) real/imag float array (.npy SLC crop) as a complex64 GeoTIFF in pixel space.

    The array is memory-mapped and written in row blocks, so large files are never loaded whole.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    arr = np.load(npy_path, mmap_mode="r")
    if arr.ndim != 3 or arr.shape[2] != 2:
        raise RasterInputError(f"{npy_path} holds an array of shape {arr.shape}; expected (height, "
                               "width, 2) with the real and imaginary parts of an SLC.")
    h, w = arr.shape[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tif_path, "w", driver="GTiff", width=w, height=h, count=1, dtype="complex64",
                           tiled=True, blockxsize=256, blockysize=256) as dst:
            for r in range(0, h, 256):
                part = arr[r:r + 256]
                z = (part[..., 0] + 1j * part[..., 1]).astype(np.complex64)
                dst.write(z, 1, window=((r, r + part.shape[0]), (0, w)))
    return tif_path
