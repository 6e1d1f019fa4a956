"""A raster's CLIP image embeddings on a grid of cells, cached per (file, model, bands, grid), so that
a second phrase or class list costs only the text tower.

Grid: cell (i, j) covers pixels ``[i s, (i + 1) s) x [j s, (j + 1) s)`` of the raster (of its
``--extent`` part, pixels counted from the extent's corner) (``s`` the stride,
the window by default; the last row and column of cells may be cut by the raster's edge); its
embedding is the image tower's on the ``window``-px square centred on the cell, shifted back inside
the raster (a raster smaller than a window is padded as nodata). ``stride = window (1 - overlap)``:
``--overlap 0.5`` gives cells half a window wide, a map four times as fine for four times the windows.

Cache: ``<cache dir>/<raster stem>_<key>.npz`` (``emb`` (R, C, D) float32 unit vectors, NaN on cells
without data; ``valid`` (R, C) the valid fraction of each cell's own pixels), ``key`` = sha256 of the inputs' absolute
paths, sizes and mtimes, the weights' sha256, the bands, units, complex mode, window, stride and
the precision (the int8 image tower, ``sarmae export --precision int8``, has its own cache files).
The cache dir is ``$SARMAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/sarmae/clip`` (``~/.cache``); files
are written to a temporary sibling and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import NoValidDataError, SarmaeError
from ..tiling import Window

if TYPE_CHECKING:
    from ..types import CancelFn, InferenceOptions, ProgressFn

CACHE_VERSION = 1


@dataclass
class SceneEmbeddings:
    emb: np.ndarray  # (R, C, D) float32 unit-norm image embeddings; NaN where a cell has no data
    valid: np.ndarray  # (R, C) float32 fraction of valid pixels in each cell (0: no data, no result)
    window: int  # px of a cell's window (the model's input)
    stride: int  # px of a cell
    path: Path | None  # the cache file
    cached: bool  # read from the cache (no image tower ran)
    region: Window | None = None  # the part of the raster embedded (``--extent``; None: all of it)

    @property
    def has_data(self) -> np.ndarray:
        return self.valid > 0


def plan_cells(height: int, width: int, window: int, stride: int) -> tuple[int, int, list[Window]]:
    """(rows, cols, the cells' windows in row-major order): see the module docstring."""
    rows, cols = -(-height // stride), -(-width // stride)

    def start(i: int, size: int) -> int:
        s = i * stride + (stride - window) // 2
        return max(0, min(s, size - window)) if size >= window else 0

    return rows, cols, [Window(start(i, height), start(j, width), window, window)
                        for i in range(rows) for j in range(cols)]


def cache_dir() -> Path:
    env = os.environ.get("SARMAE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sarmae" / "clip"


def cache_key(inputs: list[str], weights_sha256: str, opts: InferenceOptions, window: int, stride: int,
              precision: str = "fp32", region: Window | None = None) -> str:
    files = []
    for p in inputs:
        st = os.stat(p)
        files.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    what = {"v": CACHE_VERSION, "files": files, "weights": weights_sha256, "bands": [str(b) for b in opts.bands or []],
            "units": opts.input_units, "complex": opts.complex_mode, "window": window, "stride": stride}
    if precision != "fp32":  # the int8 image tower's embeddings are not the fp32 tower's
        what["precision"] = precision
    if region is not None:  # --extent: a grid on that part of the raster
        what["region"] = [region.row_off, region.col_off, region.height, region.width]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as z:
            return z["emb"], z["valid"]
    except (OSError, KeyError, ValueError):
        return None  # absent or damaged: computed again


def _write_cache(path: Path, emb: np.ndarray, valid: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, emb=emb, valid=valid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def scene_embeddings(raster: Any, radiometry: Any, package: Any, task: Any, opts: InferenceOptions,
                     say, progress: ProgressFn | None = None, should_cancel: CancelFn | None = None,
                     use_cache: bool = True) -> SceneEmbeddings:
    """The embeddings of the whole open ``raster`` (``engine.reader.SarRaster``), from the cache
    or through the image tower (the engine's reader thread, radiometry and backend)."""
    from ..backends import make_backend
    from ..inference import _clip_extent, iter_batches
    from ..precision import resolve_precision
    from ..types import RunContext

    card = package.card
    window = card.input_size[0]
    if opts.window and opts.window != window:
        raise SarmaeError(f"--window {opts.window}: '{card.name}' embeds windows of its input size, {window} px; "
                          "choose the cell size with --overlap (cells of window x (1 - overlap) px)")
    overlap = opts.overlap or 0.0
    if not 0.0 <= overlap < 1.0:
        raise SarmaeError(f"--overlap {overlap}: give a fraction in [0, 1) (cells of window x (1 - overlap) px)")
    stride = max(1, int(round(window * (1.0 - overlap))))
    full = Window(0, 0, raster.height, raster.width)
    region = _clip_extent(opts.extent, raster) if opts.extent is not None else full
    rows, cols, windows = plan_cells(region.height, region.width, window, stride)  # relative to the region
    precision = resolve_precision(opts.precision, package, opts.device)[0] if opts.precision != "fp32" else "fp32"
    key = cache_key(list(raster.paths), card.weights.get("sha256", ""), opts, window, stride, precision,
                    None if region == full else region)
    path = cache_dir() / f"{Path(raster.paths[0]).stem}_{key}.npz"
    hit = _read_cache(path) if use_cache else None
    if hit is not None and hit[0].shape[:2] == (rows, cols):
        say(f"image embeddings: cached ({path})")
        return SceneEmbeddings(hit[0], hit[1], window, stride, path, True, region)
    ctx = RunContext(raster, card, radiometry, path, opts, window, {}, region, say)
    backend = make_backend(task, package, opts, window, log=say)
    say(f"image embeddings: {rows} x {cols} cells of {stride} px ({len(windows)} windows of {window} px), "
        f"backend {backend.describe()}")
    parts, valid, done = [], [], 0
    for wins, x, v in iter_batches(ctx, windows, opts.batch_size, should_cancel):
        parts.append(np.asarray(backend.run(x), np.float32).reshape(len(wins), -1))
        for b in range(len(wins)):  # the valid fraction of the cell's own pixels
            i, j = divmod(done + b, cols)
            r0, c0 = i * stride - wins[b].row_off, j * stride - wins[b].col_off
            valid.append(v[b, max(r0, 0):r0 + stride, max(c0, 0):c0 + stride].mean())
        done += len(wins)
        if progress is not None:
            progress(0.95 * done / len(windows), f"{done}/{len(windows)} windows")
    emb = np.concatenate(parts).reshape(rows, cols, -1)
    frac = np.asarray(valid, np.float32).reshape(rows, cols)
    if not (frac > 0).any():
        raise NoValidDataError(f"{raster.paths[0]}: every window is nodata; nothing to embed")
    emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    emb[frac == 0] = np.nan
    if use_cache:
        _write_cache(path, emb, frac)
    return SceneEmbeddings(emb, frac, window, stride, path if use_cache else None, False, region)
