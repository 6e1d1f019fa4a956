"""Where caption rows come from: labelled SAR data of four kinds (``make_captions`` reads a spec).

A spec is a YAML/JSON list of sources, each a dict with ``kind`` and ``path`` plus:

- every kind: ``name`` (the ``source`` column; default the kind), ``sensor`` ("Sentinel-1"),
  ``pol`` ("VV"; "auto" for chips: VV+VH for 2-band files, else ``pol_single``), ``phrase`` (how a
  class reads in a caption, "{cls}" by default, e.g. "a {cls} military vehicle"), ``phrases``
  (per class; a LIST of phrases gives each row one of them, a seeded draw: varied wordings, so that
  a small text tower learns the words rather than one fixed phrase per class), ``rename`` (class -> class), ``drop`` (classes left out), ``min_count`` (classes with
  fewer images are left out, counted), ``group_regex`` + ``group_block`` (integer captures of the
  file name, divided by the block, make the split group: ETCI's ``x-(\\d+)_y-(\\d+)`` tile grid).
- ``chips``: labelled chips: ``class_from`` ``folder`` (MSTAR: ``<k>-<NAME>/``, a leading index
  dropped) or ``name`` (``class_regex`` on the file name; OpenSARShip ``Cargo_x1446_y3299.tif``);
  ``crop`` S: the centre S x S of each chip written as a GeoTIFF chip (MSTAR's targets fill the
  centre 64 px of 128: the model then sees them at full resolution).
- ``masks``: images with class masks found by string ``replace`` pairs on the image path, one
  mask per class (``masks: {flood: [["/AFTER/", "/MASK/"], ["after", "mask"]]}``); pixels > 0 are
  the class, < 0 nodata; the rest is ``rest`` ("land"). The caption names the class covering the
  most pixels, and a second one covering >= ``mention`` (0.15) of them ("flooded land with some
  dry land"). ``window`` cuts S x S windows (written as GeoTIFF chips) instead of whole images
  (cut windows at the test scenes' pixel size, so that a window covers the ground a scene cell
  does); ``windows_per_image`` N keeps N of each image's windows (a fixed pseudo-random choice per
  file and window: a source with many windows per image does not swamp the others).
- ``instances``: images with an instance mask (HRSID: one RGB colour per ship): ``mask`` replace
  pairs; ``window`` S: each window is "open sea" (class ``sea``) or "N ship(s) at sea" (``ship``),
  counting instances with >= ``min_pixels`` pixels in it.
- ``polygons``: ``path`` a raster, ``vector`` + ``class_field`` polygons (read, repaired and
  reprojected as fine-tuning reads them): an S x S ``window`` (default 64) centred on each polygon
  (a grid of centres inside large ones), written as a GeoTIFF chip with the raster's
  georeferencing; the split group is a block of ``group_block`` (4) windows.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from .captions import CaptionError, CaptionRow, assign_split, caption_for, hash_unit, write_table

log = logging.getLogger("sarmae.captions")

KINDS = ("chips", "masks", "instances", "polygons")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _files(src: dict) -> list[str]:
    root = Path(src["path"])
    if not root.exists():
        raise CaptionError(f"caption source {src.get('name', src['kind'])}: {root} not found")
    if root.is_file():
        return [str(root)]
    found = sorted(glob.glob(str(root / src.get("glob", "**/*")), recursive=True))
    found = [f for f in found if f.lower().endswith(IMAGE_EXT) and os.path.isfile(f)]
    if not found:
        raise CaptionError(f"caption source {src.get('name', src['kind'])}: no image under {root} "
                           f"matching {src.get('glob', '**/*')}")
    return found


def _replaced(path: str, pairs: list, what: str, src: dict) -> str:
    out = path
    for old, new in pairs:
        out = out.replace(old, new)
    if out == path:
        raise CaptionError(f"caption source {src.get('name')}: the {what} replace pairs {pairs} do not change {path}")
    return out


def _group(src: dict, path: str, default: str) -> str:
    rx = src.get("group_regex")
    if not rx:
        return default
    m = re.search(rx, Path(path).name)
    if not m:
        return default
    block = int(src.get("group_block", 1))
    return f"{src.get('name')}:" + "/".join(str(int(g) // block) for g in m.groups())


def _read(path: str, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            return ds.read(window=Window(window[1], window[0], window[3], window[2]) if window else None)


def write_window(path: str, window: tuple[int, int, int, int], out: Path) -> Path:
    """Rows ``window`` = (row, col, height, width) of ``path`` as a GeoTIFF (the window's
    georeferencing when the file has one; gray stored as RGB kept as one band); atomic."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    r, c, h, w = window
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            win = Window(c, r, w, h)
            x = ds.read(window=win)
            if x.shape[0] == 3 and (x == x[:1]).all():
                x = x[:1]
            prof = {"driver": "GTiff", "height": h, "width": w, "count": x.shape[0], "dtype": x.dtype.name,
                    "compress": "deflate"}
            if not ds.transform.is_identity:
                prof.update(crs=ds.crs, transform=ds.window_transform(win))
            if ds.nodata is not None:
                prof["nodata"] = ds.nodata
            desc = ds.descriptions[: x.shape[0]]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **prof) as dst:
            dst.write(x)
            for i, d in enumerate(desc, start=1):
                if d:
                    dst.set_band_description(i, d)
    os.replace(tmp, out)
    return out


def _grid(h: int, w: int, s: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(0, h - s + 1, s) for c in range(0, w - s + 1, s)]


def _chips(src: dict) -> list[tuple[str, str, str]]:
    """(image, class, group) of labelled chips."""
    out = []
    rx = re.compile(src.get("class_regex", r"^([A-Za-z][A-Za-z ]*?)_"))
    for f in _files(src):
        if src.get("class_from", "folder") == "folder":
            cls = re.sub(r"^\d+[-_ ]", "", Path(f).parent.name)
        else:
            m = rx.search(Path(f).name)
            if not m:
                continue
            cls = m.group(1)
        out.append((f, cls, _group(src, f, f)))
    return out


def _centre(path: str, s: int, folder: Path) -> str:
    """The centre s x s of a chip as a GeoTIFF chip in ``folder`` (the whole chip when smaller)."""
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as ds:
            h, w = ds.height, ds.width
    if h <= s and w <= s:
        return path
    r, c = max(0, (h - s) // 2), max(0, (w - s) // 2)
    out = folder / Path(path).parent.name / f"{Path(path).stem}_centre{s}.tif"
    return str(write_window(path, (r, c, min(s, h), min(s, w)), out))


def _shares(masks: dict[str, np.ndarray], rest: str) -> dict[str, float] | None:
    first = next(iter(masks.values()))
    valid = np.ones(first.shape, bool)
    for m in masks.values():
        valid &= m >= 0
    n = int(valid.sum())
    if n < 0.5 * valid.size:
        return None
    share, covered = {}, np.zeros(first.shape, bool)
    for k, m in masks.items():
        pos = (m > 0) & valid & ~covered
        share[k] = float(pos.sum()) / n
        covered |= pos
    share[rest] = 1.0 - sum(share.values())
    return share


def _pick(v, rng: np.random.Generator) -> str:
    """A phrase: ``v`` itself, or one of a list of wordings drawn with ``rng``."""
    return v if isinstance(v, str) else str(v[int(rng.integers(len(v)))])


def _mask_rows(src: dict, chips_dir: Path, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """(image, class, group, phrase) of images / windows with class masks."""
    rest, mention, s = src.get("rest", "land"), float(src.get("mention", 0.15)), src.get("window")
    phrases = {rest: rest, **src.get("phrases", {})}
    out = []
    for f in _files(src):
        masks = {}
        for k, pairs in src["masks"].items():
            mp = _replaced(f, pairs, f"mask '{k}'", src)
            if not os.path.isfile(mp):
                raise CaptionError(f"caption source {src.get('name')}: mask {mp} of {f} not found")
            masks[k] = _read(mp)[0].astype(np.int32)
        h, w = next(iter(masks.values())).shape
        wins = [(r, c, s, s) for r, c in _grid(h, w, int(s))] if s else [None]
        if s and src.get("windows_per_image"):
            wins = sorted(wins, key=lambda v, f=f: hash_unit(0, f"{Path(f).name}:{v[0]}/{v[1]}"))
            wins = sorted(wins[:int(src["windows_per_image"])])
        for win in wins:
            sub = {k: (m[win[0]:win[0] + win[2], win[1]:win[1] + win[3]] if win else m) for k, m in masks.items()}
            share = _shares(sub, rest)
            if share is None:
                continue
            ranked = sorted(share, key=lambda k: -share[k])
            cls = ranked[0]
            phrase = _pick(phrases.get(cls, cls), rng)
            if share[ranked[1]] >= mention:
                phrase += f" with some {_pick(phrases.get(ranked[1], ranked[1]), rng)}"
            image, group = f, _group(src, f, f)
            if win:
                image = str(write_window(f, win, chips_dir / src["name"] / f"{Path(f).stem}_r{win[0]}_c{win[1]}.tif"))
                group = _group(src, f, f"{f}:{win[0] // (2 * win[2])}/{win[1] // (2 * win[3])}")
            out.append((image, cls, group, phrase))
    return out


def _instance_rows(src: dict, chips_dir: Path) -> list[tuple[str, str, str, str]]:
    s, min_px = int(src.get("window", 200)), int(src.get("min_pixels", 10))
    out = []
    for f in _files(src):
        if "instance" in Path(f).name:
            continue
        mp = _replaced(f, src["mask"], "instance mask", src)
        if not os.path.isfile(mp):
            raise CaptionError(f"caption source {src.get('name')}: instance mask {mp} of {f} not found")
        m = _read(mp).astype(np.int64)
        ids = m[0] * 65536 + m[1] * 256 + m[2] if m.shape[0] >= 3 else m[0]
        for r, c in _grid(*ids.shape, s):
            counts = Counter(ids[r:r + s, c:c + s].ravel().tolist())
            n = sum(1 for k, v in counts.items() if k != 0 and v >= min_px)
            cls = "ship" if n else "sea"
            phrase = "open sea" if not n else ("a ship at sea" if n == 1 else
                                               f"{NUMBERS[n] if n < len(NUMBERS) else 'many'} ships at sea")
            chip = write_window(f, (r, c, s, s), chips_dir / src["name"] / f"{Path(f).stem}_r{r}_c{c}.tif")
            out.append((str(chip), cls, _group(src, f, f), phrase))
    return out


def _polygon_rows(src: dict, chips_dir: Path) -> list[tuple[str, str, str]]:
    from engine.reader import SarRaster

    from ..finetune.labels import read_vector, to_pixels
    from ..finetune.sampling import _anchor_points

    s, block = int(src.get("window", 64)), int(src.get("group_block", 4))
    if not src.get("vector") or not src.get("class_field"):
        raise CaptionError(f"caption source {src.get('name')}: polygons need 'vector' and 'class_field'")
    notes: list[str] = []
    geoms, cls, classes, crs, _ = read_vector(src["vector"], src["class_field"], None, None, notes, notes)
    with SarRaster.open(src["path"]) as r:
        px, h, w = to_pixels(geoms, crs, r, notes), r.height, r.width
    for n in notes:
        log.info("%s", n)
    out = []
    for g, k in zip(px, cls):
        for y, x in _anchor_points(g, s, inside=True):  # (row, col)
            r0, c0 = int(round(y - s / 2)), int(round(x - s / 2))
            if r0 < 0 or c0 < 0 or r0 + s > h or c0 + s > w:
                continue
            chip = write_window(src["path"], (r0, c0, s, s),
                                chips_dir / src["name"] / f"{Path(src['path']).stem}_r{r0}_c{c0}.tif")
            out.append((str(chip), classes[k], f"{src['name']}:{r0 // (block * s)}/{c0 // (block * s)}"))
    return out


def _pol(src: dict, image: str) -> str:
    pol = src.get("pol", "VV")
    if pol != "auto":
        return pol
    return "VV+VH" if _read_count(image) == 2 else src.get("pol_single", "VV")


def _read_count(path: str) -> int:
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as ds:
            return ds.count


def source_rows(src: dict, chips_dir: Path, rng: np.random.Generator) -> tuple[list[CaptionRow], dict]:
    """One source's rows (class filters applied) and its counts."""
    src = {"name": src.get("kind"), **src}
    kind = src.get("kind")
    if kind not in KINDS:
        raise CaptionError(f"caption source {src.get('name')}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if "path" not in src:
        raise CaptionError(f"caption source {src['name']}: no 'path'")
    if kind == "chips":
        items = [(_centre(f, int(src["crop"]), chips_dir / src["name"]) if src.get("crop") else f, c, g, None)
                 for f, c, g in _chips(src)]
    elif kind == "masks":
        items = _mask_rows(src, chips_dir, rng)
    elif kind == "instances":
        items = _instance_rows(src, chips_dir)
    else:
        items = [(f, c, g, None) for f, c, g in _polygon_rows(src, chips_dir)]
    rename, drop = src.get("rename", {}), set(src.get("drop", []))
    items = [(f, rename.get(c, c), g, p) for f, c, g, p in items]
    counts = Counter(c for _, c, _, _ in items)
    small = {c for c, n in counts.items() if n < int(src.get("min_count", 1))}
    left_out = {c: counts[c] for c in sorted(small | (drop & set(counts)))}
    phrase, phrases = src.get("phrase", "{cls}"), src.get("phrases", {})
    rows = []
    for f, c, g, p in items:
        if c in left_out:
            continue
        text = p or (_pick(phrases[c], rng) if c in phrases else phrase.format(cls=c))
        cap = caption_for(text, src.get("sensor", "Sentinel-1"), _pol(src, f), rng)
        rows.append(CaptionRow(f, cap, c, src["name"], g))
    info = {"rows": len(rows), "classes": dict(Counter(r.klass for r in rows)), "left_out_classes": left_out}
    if not rows:
        raise CaptionError(f"caption source {src['name']} ({src['path']}): no row left "
                           f"(classes left out: {left_out or 'none'})")
    return rows, info


def load_spec(path: str | Path) -> list[dict]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CaptionError(f"caption spec not found: {p}")
    spec = yaml.safe_load(p.read_text())
    spec = spec.get("sources") if isinstance(spec, dict) else spec
    if not isinstance(spec, list) or not all(isinstance(s, dict) for s in spec):
        raise CaptionError(f"{p}: a caption spec is a list of sources (or {{sources: [...]}}), each a mapping "
                           "with kind and path")
    base = p.parent
    for s in spec:  # relative paths are relative to the spec file
        for k in ("path", "vector"):
            if k in s and not Path(s[k]).is_absolute():
                s[k] = str(base / s[k])
    return spec


def make_captions(sources: list[dict], output: str | Path, chips_dir: str | Path | None = None, seed: int = 0,
                  val_fraction: float = 0.2, overwrite: bool = False) -> dict:
    """Build the caption table of ``sources`` (module docstring) at ``output``; window chips go to
    ``chips_dir`` (default ``<output stem>_chips`` beside it). Returns counts per source."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise CaptionError(f"{output} exists; pass --overwrite to replace it or choose another output")
    chips = Path(chips_dir) if chips_dir else output.with_name(output.stem + "_chips")
    rng = np.random.default_rng(seed)
    rows, info = [], {}
    names = [s.get("name", s.get("kind")) for s in sources]
    if len(set(names)) != len(names):
        raise CaptionError(f"caption sources need distinct names (got {names}); set 'name' on each")
    for s in sources:
        r, i = source_rows(s, chips, rng)
        rows += r
        info[s.get("name", s.get("kind"))] = i
        log.info("%s: %d rows, classes %s", s.get("name", s.get("kind")), i["rows"], i["classes"])
    assign_split(rows, val_fraction, seed)
    write_table(rows, output, overwrite=overwrite)
    return {"table": str(output), "chips_dir": str(chips), "rows": len(rows),
            "val_rows": sum(r.split == "val" for r in rows), "sources": info}
