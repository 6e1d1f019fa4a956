"""Training chips from labelled polygons (or a class raster) over SAR rasters: ``build_chips``.

labels -> each raster's CRS -> its pixel space (x = column, y = row) -> blocks of 2-4 chip sizes
tile each raster, whole blocks go to validation (seeded) -> chip windows centred on labelled cells
(+ jitter) and background chips, each entirely inside one block, so no validation pixel is ever
seen in training -> inputs read through ``engine`` SarRaster + Radiometry with the encoder's input
contract (exactly what ``sarmae infer`` feeds the model) -> masks (``rasterize``, 255 = ignore),
boxes (polygon bounds, labels 1..K) or one class per chip (the class of the polygon / class-raster
cell it is centred on; a named background class for chips touching no label). Chips live in memory
as float16 (analyst scale). ``evaluation=True``: every chip is held out (no split), for
``sarmae evaluate``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .common import FinetuneError
from .sampling import IGNORE, _Labels, _presence, _windows  # noqa: F401  (IGNORE is re-exported)

log = logging.getLogger("sarmae.finetune")
MIN_SAMPLES = 5  # fewer labelled instances / chips of a class than this -> warning


@dataclass
class ChipSet:
    """Chips in memory, their targets and where they came from."""

    classes: list[str]
    x: torch.Tensor  # (N, C, S, S) float16 normalised model input
    split: np.ndarray  # (N,) bool: True = validation
    windows: list[tuple[int, int, int]]  # (raster index, row_off, col_off) of each S x S chip
    blocks: list[tuple[int, int, int, int, int, bool]]  # (raster, r0, c0, r1, c1, validation)
    masks: torch.Tensor | None = None  # segment: (N, S, S) uint8 class index, 255 = ignore
    boxes: list[np.ndarray] | None = None  # detect: per chip (n, 4) float32 x0, y0, x1, y1 in chip px
    box_labels: list[np.ndarray] | None = None  # detect: per chip (n,) int64 in 1..K
    labels: np.ndarray | None = None  # classify: (N,) int64 class index per chip
    unknown_classes: dict[str, int] = field(default_factory=dict)  # vector: features of classes not asked for
    log: list[str] = field(default_factory=list)  # what was decided (reprojection, repairs, split)
    warnings: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # radiometry per raster
    contract: dict = field(default_factory=dict)  # the input contract the chips were read with


def _name(v) -> str | None:
    """A class value as a name ('water', 3 -> '3', 3.0 -> '3'); None when empty."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    return s or None


def read_vector(path: str, class_field: str, classes: list[str] | None, background: str | None,
                notes: list[str], warns: list[str]) -> tuple[list, list[int], list[str], str | None, dict[str, int]]:
    """Polygons (repaired), class index per polygon, class names, the layer's CRS (WKT) and the
    feature count of each class value not in ``classes`` (skipped)."""
    import fiona
    from shapely import make_valid, unary_union
    from shapely.geometry import shape

    if not Path(path).exists():
        raise FinetuneError(f"label file not found: {path}")
    try:
        layers = fiona.listlayers(path)
        with fiona.open(path, layer=layers[0]) as src:
            fields, crs = list(src.schema["properties"]), (src.crs_wkt or None)
            records = [(f.geometry, dict(f.properties)) for f in src]
    except Exception as e:  # fiona's errors are many (DriverError, FionaValueError, ...)
        raise FinetuneError(f"{path} is not a vector file fiona can read ({e}); give a GeoPackage, "
                            "Shapefile or GeoJSON") from e
    where = f"{path}" + (f" (layer '{layers[0]}' of {len(layers)})" if len(layers) > 1 else "")
    if not records:
        raise FinetuneError(f"{where}: the label layer is empty; draw and label some polygons first")
    if class_field not in fields:
        raise FinetuneError(f"{where}: no field '{class_field}' to read classes from; the layer has: "
                            f"{', '.join(fields) or 'no attribute field'}")
    geoms, names = [], []
    empty = bad = repaired = not_poly = 0
    for geom, props in records:
        name = _name(props.get(class_field))
        if name is None:
            empty += 1
            continue
        g = shape(geom) if geom is not None else None
        if g is None or g.is_empty or g.geom_type not in ("Polygon", "MultiPolygon"):
            not_poly += 1
            continue
        if not g.is_valid:
            g = make_valid(g)
            g = unary_union([p for p in getattr(g, "geoms", [g]) if p.geom_type in ("Polygon", "MultiPolygon")])
            if g.is_empty:
                bad += 1
                continue
            repaired += 1
        geoms.append(g)
        names.append(name)
    for n, what in ((empty, "with an empty class value"), (not_poly, "without a polygon geometry"),
                    (bad, "with an invalid geometry that could not be repaired")):
        if n:
            warns.append(f"{where}: skipped {n} feature(s) {what}")
    if repaired:
        notes.append(f"{where}: repaired {repaired} invalid polygon(s) with make_valid")
    found = sorted(set(names))
    unknown: dict[str, int] = {}
    if classes:
        unknown = {n: names.count(n) for n in found if n not in classes}
        if unknown:
            warns.append(f"{where}: skipped features of classes not in {classes}: "
                         + ", ".join(f"'{k}' ({v})" for k, v in unknown.items()))
        keep = [i for i, n in enumerate(names) if n in classes]
        geoms, names, classes = [geoms[i] for i in keep], [names[i] for i in keep], list(classes)
    else:
        classes = found
    if not geoms:
        others = ", ".join(f"'{k}' ({v})" for k, v in unknown.items()) or "none"
        raise FinetuneError(f"{where}: no usable labelled polygon in field '{class_field}' ({len(records)} "
                            f"features: {empty} with empty class values, {not_poly} not polygons, {bad} invalid"
                            + (f", none of classes {classes}; other classes found: {others}" if classes else "")
                            + ")")
    if background and background not in classes:
        classes = [background, *classes]
    notes.append(f"{where}: {len(geoms)} labelled polygon(s), classes {classes}")
    return geoms, [classes.index(n) for n in names], classes, crs, unknown


def to_pixels(geoms: list, layer_crs: str | None, raster, notes: list[str]) -> list:
    """Label polygons in the raster's pixel space (x = column, y = row), reprojected when needed."""
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.transform import from_gcps
    from rasterio.warp import transform_geom
    from shapely.affinity import affine_transform
    from shapely.geometry import mapping, shape

    name = Path(raster.paths[0]).name
    geo = raster.georeferencing
    if geo in ("none", "identity"):
        t = Affine.identity()
        if max(g.bounds[3] for g in geoms) <= 0:  # drawn in QGIS over an image shown with y = -row
            t = Affine(1, 0, 0, 0, -1, 0)
        notes.append(f"{name} has no map georeferencing: label coordinates taken as pixel coordinates"
                     + (" (y = -row)" if t.e < 0 else ""))
    else:
        t, dst = (from_gcps(raster.gcps), raster.gcp_crs) if geo == "gcps" else (raster.transform, raster.crs)
        if geo == "gcps":
            notes.append(f"{name} is georeferenced by GCPs: labels placed with the affine fitted to them")
        if layer_crs is None:
            notes.append(f"the labels have no CRS: assumed to be {dst.to_string()} like {name}")
        elif CRS.from_wkt(layer_crs) != dst:
            src = CRS.from_wkt(layer_crs)
            geoms = [shape(g) for g in transform_geom(src, dst, [mapping(g) for g in geoms])]
            notes.append(f"reprojected {len(geoms)} label polygon(s) from {src.to_string()} to {dst.to_string()} "
                         f"(the CRS of {name})")
    inv = ~t
    return [affine_transform(g, [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f]) for g in geoms]


def vector_labels(path: str, class_field: str, classes: list[str] | None, background: str | None, rasters: list,
                  notes: list[str], warns: list[str]) -> tuple[list[tuple[list, list[int]]], list[str], dict[str, int]]:
    """``read_vector`` + ``to_pixels`` for each raster: per raster (its pixel-space polygons that touch
    it, their class index), the class names and the feature count of each class not in ``classes``.
    FinetuneError when every label lies outside every raster."""
    from shapely.geometry import box

    geoms, cls, classes, crs, unknown = read_vector(path, class_field, classes, background, notes, warns)
    shapes = []
    for r in rasters:
        px = to_pixels(geoms, crs, r, notes)
        keep = [i for i, g in enumerate(px) if g.intersects(box(0, 0, r.width, r.height))]
        shapes.append(([px[i] for i in keep], [cls[i] for i in keep]))
    if not any(s[0] for s in shapes):
        _outside(path, geoms, crs, rasters)
    return shapes, classes, unknown


def rasterize_polygons(geoms: list, cls: list[int], shape: tuple[int, int], row_off: int = 0, col_off: int = 0,
                       fill: int = IGNORE) -> np.ndarray:
    """Pixel-space polygons -> (H, W) uint8 class index of the ``shape`` window at (row_off, col_off):
    pixels whose centre is inside, later features on top, ``fill`` elsewhere. Training masks and
    evaluation references are both made here."""
    from affine import Affine
    from rasterio.features import rasterize

    if not geoms:
        return np.full(shape, fill, np.uint8)
    return rasterize(list(zip(geoms, cls)), shape, fill=fill, transform=Affine.translation(col_off, row_off),
                     all_touched=False, dtype=np.uint8)


def read_class_map(path: str, raster, notes: list[str]) -> np.ndarray:
    """A class raster on ``raster``'s grid: (H, W) int32 values, -1 where nodata / negative."""
    import rasterio
    from rasterio.warp import Resampling, reproject

    name = Path(raster.paths[0]).name
    try:
        with warnings.catch_warnings():  # pixel-space label rasters (PNG masks) are fine here
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except Exception as e:
        raise FinetuneError(f"label raster {path} cannot be read ({e})") from e
    with ds:
        nodata = ds.nodata
        if (ds.width, ds.height) == (raster.width, raster.height) and ds.crs == raster.crs and \
                ds.transform.almost_equals(raster.transform):
            arr = ds.read(1).astype(np.float32)
        elif ds.crs is not None and raster.crs is not None:
            arr = np.full((raster.height, raster.width), np.nan, np.float32)
            reproject(rasterio.band(ds, 1), arr, src_nodata=nodata, dst_transform=raster.transform,
                      dst_crs=raster.crs, dst_nodata=np.nan, resampling=Resampling.nearest)
            notes.append(f"label raster {Path(path).name} reprojected onto the grid of {name} (nearest)")
        else:
            raise FinetuneError(f"label raster {path} ({ds.width}x{ds.height}, CRS {ds.crs}) is not on the grid of "
                                f"{name} ({raster.width}x{raster.height}, CRS {raster.crs}) and one has no CRS, "
                                "so they cannot be aligned; write the labels on the raster's grid")
    bad = ~np.isfinite(arr) | (arr < 0) | ((arr == nodata) if nodata is not None else False)
    return np.where(bad, -1, np.round(np.nan_to_num(arr, nan=-1))).astype(np.int32)


def training_contract(contract: dict, data_units: str, source: str) -> tuple[dict, str | None]:
    """The input contract a fine-tuned model gets for data in ``data_units``, and a note when it is
    not the encoder's. 8-bit display values (PNG/JPEG chips, quick-looks) carry no calibrated unit,
    so they cannot be converted to dB and back: with a calibrated encoder, the model is fine-tuned
    (and saved) with an 8-bit contract, 0..255 scaled to [0, 1] then the encoder's mean / std, which
    is how SARMAE pretraining scales 8-bit chips beside clipped dB rasters. Calibrated data with an
    8-bit encoder get a dB contract (default clip) the same way. Otherwise the encoder's stands."""
    from engine.package import DEFAULT_CLIP
    from engine.radiometry import UNIT_LABEL, normalise_units

    want, have = normalise_units(contract["units"]), normalise_units(data_units)
    if (want == "uint8") == (have == "uint8"):
        return contract, None
    units = "uint8" if have == "uint8" else "db"
    new = {**contract, "units": units, "clip": list(DEFAULT_CLIP[units])}
    lo, hi = new["clip"]
    return new, (f"{source} holds {UNIT_LABEL[have]} values and the encoder expects {UNIT_LABEL[want]}: the model is "
                 f"fine-tuned and saved with a {UNIT_LABEL[units]} input contract ({lo:g}..{hi:g} scaled to [0, 1], the "
                 "encoder's mean/std), so sarmae infer feeds it such data; if the file is calibrated, say so with "
                 "--input-units")


def open_input(path: str, contract: dict, bands: list | None, input_units: str | None, notes: list[str],
               adapt: bool = False):
    """SarRaster (bands picked by the contract's names when the file has them), its Radiometry, and
    the contract used (``adapt``: ``training_contract`` for the file's units, else ``contract``)."""
    from engine.errors import SarmaeError
    from engine.radiometry import Radiometry, detect_units
    from engine.reader import SarRaster

    try:
        raster = SarRaster.open(path, bands)
        want = [b.upper() for b in contract["bands"]]
        have = [b.upper() for b in raster.band_names]
        if bands is None and want != have and all(b in have for b in want):
            raster.close()
            raster = SarRaster.open(path, list(contract["bands"]))
            notes.append(f"{Path(path).name}: bands {'+'.join(contract['bands'])} picked by name (give the same "
                         f"--bands {','.join(contract['bands'])} to sarmae infer)")
        if adapt and all(re.fullmatch(r"band\d+", b) for b in contract["bands"]) and \
                len(raster.band_names) == len(contract["bands"]):  # channels adapted from the encoder's: the data names them
            contract = {**contract, "bands": list(raster.band_names)}
        if adapt:
            contract, note = training_contract(contract, input_units or detect_units(raster)[0], Path(path).name)
            if note:
                notes.append(note)
        return raster, Radiometry.for_raster(contract, raster, input_units), contract
    except SarmaeError as e:
        raise FinetuneError(f"{path}: {e}") from e


def build_chips(rasters: list[str] | str, contract: dict, size: int, task: str, *, labels: str | None = None,
                class_field: str | None = None, label_raster: str | None = None, classes: list[str] | None = None,
                background: str | None = None, val_fraction: float = 0.2, seed: int = 0, batch_size: int = 1,
                bands: list | None = None, input_units: str | None = None, background_share: float = 0.25,
                max_chips: int = 2000, block_chips: int | None = None, evaluation: bool = False) -> ChipSet:
    """Sample, split and read training chips (see the module docstring); FinetuneError on bad input.

    Args:
        task: "segment" (masks), "detect" (boxes; background chips are negatives) or "classify"
            (one class per chip: the polygon / class-raster cell it is centred on).
        labels / class_field: vector labels; or label_raster: a class raster (value v -> classes[v],
            or "class_<v>"; nodata and negative values are ignored).
        background: with vector labels, the class of unlabelled pixels (segment) or of chips that
            touch no labelled polygon (classify); else unlabelled pixels are ignored.
        batch_size: fewer training chips than this is an error.
        background_share: share of chips placed anywhere (background class or detection negatives).
        block_chips: block side in chip sizes (None: 3, else 2, else 1 when that gives too few labelled blocks).
        evaluation: no split (every chip held out, centred without jitter), one class is enough.
    """
    paths = [str(p) for p in ([rasters] if isinstance(rasters, (str, Path)) else rasters)]
    if not paths:
        raise FinetuneError("no raster given: pass at least one raster to train on")
    notes: list[str] = []
    warns: list[str] = []
    rng = np.random.default_rng(seed)
    with contextlib.ExitStack() as stack:
        opened = []
        for p in paths:  # the first raster settles the contract (training); the others must meet it
            raster, radiometry, contract = open_input(p, contract, bands, input_units, notes,
                                                      adapt=not evaluation and not opened)
            opened.append((raster, radiometry))
            stack.callback(raster.close)
        lab = _load_labels([r for r, _ in opened], labels, class_field, label_raster, classes, background, notes, warns)
        if lab.background is None and background and labels is None:
            notes.append(f"background '{background}' ignored: a label raster names every labelled pixel itself")
        lab.f = f = max(1, size // 8)
        lab.presence = [_presence(f, len(lab.classes), (r.height, r.width), *(lab.shapes[i] if lab.shapes else
                                  (None, None)), cmap=lab.cmaps[i] if lab.cmaps else None) for i, (r, _) in enumerate(opened)]
        present = [c for j, c in enumerate(lab.classes) if any(p[j].any() for p in lab.presence)]
        present += [lab.background] if lab.background and lab.background not in present else []
        over = ", ".join(Path(p).name for p in paths)
        if task in ("segment", "classify") and len(present) < 2 and not evaluation:
            raise FinetuneError(f"only one class ({', '.join(present) or 'none'}) in {lab.source} over {over}: "
                                f"{'segmentation' if task == 'segment' else 'classification'} needs two. Label "
                                "another class" + (
                                    ", or name a background class (--background) for the unlabelled areas around "
                                    "your polygons" if labels is not None else " in the label raster"))
        wins, split, blocks, klass = _windows([r for r, _ in opened], lab, size, task, val_fraction, rng,
                                              background_share, max_chips, block_chips, notes, evaluation)
        n_tr = int((~split).sum())
        if not evaluation and (n_tr < batch_size or not split.any()):
            raise FinetuneError(f"only {n_tr} training and {int(split.sum())} validation chip(s) of {size} px from "
                                f"{lab.source} over {over}, for a batch size of {batch_size}: lower the batch size "
                                "(--batch-size), or label more (and more spread out) areas")
        if not wins:
            raise FinetuneError(f"no chip of {size} px could be placed from {lab.source} over {over}")
        chips = _read(opened, lab, wins, size, task)
        chips.split, chips.blocks, chips.log, chips.warnings = split, blocks, notes, warns
        chips.unknown_classes = lab.unknown
        chips.contract = contract
        if task == "classify":
            chips.labels = klass
            got = sorted({lab.classes[k] for k in klass[~split]})
            if len(got) < 2 and not evaluation:
                raise FinetuneError(f"the training chips from {lab.source} hold only {', '.join(got) or 'no class'}: "
                                    "classification needs two classes in training; label more areas of the other "
                                    "classes (away from the validation blocks), or add a raster")
    if not evaluation:
        _warn_counts(chips, lab.counts if task == "detect" else None)
    for m in notes:
        log.info(m)
    for m in chips.warnings:
        log.warning(m)
    return chips


def _load_labels(rasters: list, labels: str | None, class_field: str | None, label_raster: str | None,
                 classes: list[str] | None, background: str | None, notes: list[str], warns: list[str]) -> _Labels:
    """Vector labels in each raster's pixel space, or the class raster on each raster's grid."""
    if labels is not None:
        shapes, classes, unknown = vector_labels(labels, class_field, classes, background, rasters, notes, warns)
        counts = [sum(c == j for _, cl in shapes for c in cl) for j in range(len(classes))]
        return _Labels(classes, shapes, None, background, counts, Path(labels).name, unknown)
    raw = [read_class_map(label_raster, r, notes) for r in rasters]
    values = sorted(set().union(*(np.unique(m[m >= 0]).tolist() for m in raw)))
    if not values:
        raise FinetuneError(f"label raster {label_raster} holds no class value >= 0 over the raster(s)")
    if classes and values[-1] >= len(classes):
        raise FinetuneError(f"label raster {label_raster} holds value {values[-1]} but only {len(classes)} class "
                            f"names were given ({', '.join(classes)}); value v is class number v (from 0)")
    index = {v: v for v in values} if classes else {v: i for i, v in enumerate(values)}
    classes = list(classes) if classes else [f"class_{v}" for v in values]
    if len(classes) >= IGNORE:
        raise FinetuneError(f"label raster {label_raster}: {len(classes)} classes; at most {IGNORE - 1} are supported")
    lut = np.full(values[-1] + 1, IGNORE, np.uint8)
    lut[list(index)] = list(index.values())
    cmaps = [np.where(m >= 0, lut[np.clip(m, 0, values[-1])], IGNORE).astype(np.uint8) for m in raw]
    notes.append(f"label raster {Path(label_raster).name}: values {values} -> classes {classes}; nodata/negative ignored")
    return _Labels(classes, None, cmaps, None, None, Path(label_raster).name)


def _read(opened: list, lab: _Labels, wins: list, s: int, task: str) -> ChipSet:
    """Read each chip through the raster's Radiometry; masks (segment) or boxes (detect)."""
    from shapely import STRtree
    from shapely.geometry import box

    from engine.tiling import Window

    x = torch.empty(len(wins), opened[0][0].count, s, s, dtype=torch.float16)
    masks = torch.full((len(wins), s, s), IGNORE, dtype=torch.uint8) if task == "segment" else None
    boxes: list | None = [] if task == "detect" else None
    box_labels: list = []
    trees = [STRtree(g) for g, _ in lab.shapes] if lab.shapes else []
    bg = lab.classes.index(lab.background) if lab.background else IGNORE
    for n, (i, r, c) in enumerate(wins):
        raster, rad = opened[i]
        h, w = min(s, raster.height - r), min(s, raster.width - c)
        xi, valid = raster.read(Window(r, c, h, w), pad_to=(s, s))
        x[n] = torch.from_numpy(rad.apply(xi, valid))
        hits = sorted(trees[i].query(box(c, r, c + s, r + s)).tolist()) if trees else []
        if masks is not None:
            m = np.full((s, s), bg if lab.shapes else IGNORE, np.uint8)
            if hits:  # later features on top
                m = rasterize_polygons([lab.shapes[i][0][q] for q in hits], [lab.shapes[i][1][q] for q in hits],
                                       (s, s), r, c, fill=bg)
            elif lab.cmaps:
                m[:h, :w] = lab.cmaps[i][r:r + h, c:c + w]
            m[~valid] = IGNORE
            masks[n] = torch.from_numpy(m)
        if boxes is not None:
            bx, lb = chip_boxes([lab.shapes[i][0][q].bounds for q in hits], [lab.shapes[i][1][q] for q in hits], r, c, h, w)
            boxes.append(bx)
            box_labels.append(lb)
    inputs = [f"{Path(r.paths[0]).name}: {rad.describe()}" for r, rad in opened]
    return ChipSet(lab.classes, x, np.zeros(len(wins), bool), wins, [], masks, boxes,
                   box_labels if boxes is not None else None, inputs=inputs)


def chip_provenance(chips: ChipSet) -> dict:
    """What a package records about the chips it was trained on (provenance)."""
    val = chips.split
    return {"inputs": chips.inputs, "train_chips": int((~val).sum()), "val_chips": int(val.sum()),
            "val_blocks": sum(b[-1] for b in chips.blocks), "blocks": len(chips.blocks),
            "split": "spatial blocks (whole blocks held out for validation)", "log": chips.log,
            "warnings": chips.warnings}


def chip_boxes(bounds: list[tuple], cls: list[int], r: int, c: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Polygon bounds (pixel space) -> chip boxes clipped to the chip's data (h x w at its top-left);
    boxes under 2 px or with less than half their area inside are dropped. Labels are 1..K."""
    out, lab = [], []
    for (x0, y0, x1, y1), k in zip(bounds, cls):
        x0, x1, y0, y1 = x0 - c, x1 - c, y0 - r, y1 - r
        area = max(x1 - x0, 1e-9) * max(y1 - y0, 1e-9)
        cx0, cx1, cy0, cy1 = max(x0, 0), min(x1, w), max(y0, 0), min(y1, h)
        if cx1 - cx0 >= 2 and cy1 - cy0 >= 2 and (cx1 - cx0) * (cy1 - cy0) >= 0.5 * area:
            out.append((cx0, cy0, cx1, cy1))
            lab.append(k + 1)
    return np.array(out, np.float32).reshape(-1, 4), np.array(lab, np.int64)


def _outside(path: str, geoms: list, crs: str | None, rasters: list) -> None:
    """Raise: every label lies outside every raster (both extents and CRSs in the message)."""
    from rasterio.crs import CRS
    from shapely import unary_union

    lb = unary_union(geoms).bounds
    lcrs = CRS.from_wkt(crs).to_string() if crs else "no CRS"
    from rasterio.transform import array_bounds, from_gcps

    def extent(r) -> str:
        t = from_gcps(r.gcps) if r.georeferencing == "gcps" else r.transform
        crs = r.gcp_crs if r.georeferencing == "gcps" else r.crs
        b = tuple(round(v, 6) for v in array_bounds(r.height, r.width, t))
        return f"{Path(r.paths[0]).name} spans {b} in {crs.to_string() if crs else 'pixel space'}"

    ext = "; ".join(extent(r) for r in rasters)
    raise FinetuneError(f"all labels in {path} lie outside the raster(s): labels span "
                        f"{tuple(round(v, 6) for v in lb)} in {lcrs}; {ext}. Check that the labels were drawn "
                        "on these rasters and that their CRS is declared correctly")


def _warn_counts(chips: ChipSet, instances: list[int] | None) -> None:
    """Warn about classes absent from a split, or with fewer than MIN_SAMPLES of what the task learns
    from: ``instances`` (detection: labelled polygons per class, one box each) when given, else
    training chips (segmentation, and classification, where one large polygon gives many chips)."""
    k = len(chips.classes)
    for split, name in ((False, "training"), (True, "validation")):
        sel = np.flatnonzero(chips.split == split)
        if chips.labels is not None:
            have = np.bincount(chips.labels[sel], minlength=k)
        elif chips.masks is not None:
            have = np.zeros(k + 1, int)
            for n in sel:
                have[np.unique(chips.masks[n].numpy()).clip(max=k)] += 1
        else:
            have = np.zeros(k + 2, int)
            for n in sel:
                have[np.unique(chips.box_labels[n])] += 1
            have = have[1:]
        for j, c in enumerate(chips.classes):
            if have[j] == 0:
                chips.warnings.append(f"class '{c}' appears in no {name} chip")
            elif instances is None and not split and have[j] < MIN_SAMPLES:
                chips.warnings.append(f"class '{c}' appears in only {have[j]} training chip(s): label more of it")
    for j, n in enumerate(instances or []):
        if 0 < n < MIN_SAMPLES:
            chips.warnings.append(f"class '{chips.classes[j]}' has only {n} labelled polygon(s) "
                                  f"(fewer than {MIN_SAMPLES}): the model will hardly learn it; label more")
