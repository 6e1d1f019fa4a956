"""Where training chips come from: blocks for the spatial train/validation split and chip
windows inside them (see ``labels.build_chips``).

Each raster is tiled into square blocks of 2-4 chip sizes; whole blocks go to validation (seeded),
and every chip window lies entirely inside one block, so no validation pixel is ever seen in
training. Training chips are centred on labelled polygons (or cells of a class raster, balanced
over classes), jittered by up to a quarter chip, plus background chips / detection negatives.
For segmentation and detection the held-out blocks are tiled edge to edge instead (chips touching
a label, or every chip with a background class / for detection), so the validation score that
picks the best epoch counts false alarms away from the labels as a whole scene would.
Classification chips are centred inside their polygon (a grid of points inside large ones) and
carry its class; background chips (a named background class) touch no other labelled class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .common import FinetuneError

IGNORE = 255  # mask value excluded from the loss and the metrics
BACKGROUND = -2  # anchor class of a chip placed anywhere (background class, or a detection negative)


@dataclass
class _Labels:
    classes: list[str]
    shapes: list[tuple[list, list[int]]] | None  # vector: per raster (pixel-space polygons, class index)
    cmaps: list[np.ndarray] | None  # label raster: per raster (H, W) uint8 class index, 255 = ignore
    background: str | None
    counts: list[int] | None  # vector: labelled polygons per class over the rasters
    source: str = ""  # the label file's name, for messages
    unknown: dict[str, int] = field(default_factory=dict)  # vector: features of classes not asked for
    f: int = 1  # presence cell side in px (set with the chip size)
    presence: list[np.ndarray] = field(default_factory=list)  # per raster (K, H/f, W/f) bool: classes per cell


def plan_blocks(height: int, width: int, size: int, block_chips: int) -> list[tuple[int, int, int, int]]:
    """Square blocks of ``block_chips * size`` px tiling the raster, as (r0, c0, r1, c1); a remainder
    narrower than one chip joins the previous block, so every block holds at least one chip
    (unless the raster itself is smaller than a chip: then it is one block, read padded)."""
    def edges(n: int) -> list[tuple[int, int]]:
        starts = list(range(0, n, block_chips * size))
        if len(starts) > 1 and n - starts[-1] < size:
            starts.pop()
        return list(zip(starts, starts[1:] + [n]))

    return [(r0, c0, r1, c1) for r0, r1 in edges(height) for c0, c1 in edges(width)]


def split_blocks(present: list[np.ndarray], labelled: list[bool], val_fraction: float,
                 rng: np.random.Generator, weights: list[float] | None = None) -> np.ndarray:
    """Validation flag per block: labelled blocks holding ~val_fraction of the labels (``weights``:
    the amount of labels per block, e.g. objects; default one per block), >= 1 block in each split,
    chosen among 50 seeded shuffles so that training keeps as many classes as possible (a class
    found in one block only stays in training: without it nothing can be fitted, while a
    validation set without it is reported as weak), then so that as many classes as possible
    appear in both splits, then so that the held-out share of the labels is closest to
    ``val_fraction`` (labels are often clustered: a dense harbour in one block must not take most
    of the objects)."""
    lab = np.flatnonzero(labelled)
    w = np.ones(len(labelled)) if weights is None else np.asarray(weights, float)
    w = np.where(w[lab] > 0, w[lab], 1e-6)
    best, best_score = None, None
    for _ in range(50):
        order = rng.permutation(len(lab))
        share = np.cumsum(w[order]) / w.sum()
        n = 1 + int(np.argmin(np.abs(share[:-1] - val_fraction)))  # 1 .. len(lab) - 1 blocks held out
        val, tr = lab[order[:n]], lab[order[n:]]
        in_tr = np.any([present[i] for i in tr], 0)
        cover = int(np.sum(np.any([present[i] for i in val], 0) & in_tr))
        score = (int(in_tr.sum()), cover, -abs(share[n - 1] - val_fraction))
        if best_score is None or score > best_score:
            best, best_score = val, score
    flags = rng.random(len(labelled)) < val_fraction  # unlabelled blocks: background chips only
    flags[lab] = False
    flags[best] = True
    return flags


def _presence(f: int, k: int, shape: tuple[int, int], geoms=None, cls=None, cmap=None) -> np.ndarray:
    """(K, ceil(H/f), ceil(W/f)) bool: which classes touch each f x f cell."""
    from affine import Affine
    from rasterio.features import rasterize

    hc, wc = -(-shape[0] // f), -(-shape[1] // f)
    out = np.zeros((k, hc, wc), bool)
    for c in range(k):
        if cmap is not None:
            pad = np.full((hc * f, wc * f), IGNORE, np.uint8)
            pad[:shape[0], :shape[1]] = cmap
            out[c] = (pad == c).reshape(hc, f, wc, f).any((1, 3))
        else:
            g = [geoms[i] for i in range(len(geoms)) if cls[i] == c]
            if g:
                out[c] = rasterize(g, (hc, wc), transform=Affine.scale(f), all_touched=True, dtype=np.uint8) > 0
    return out


def _anchor_points(g, size: int, inside: bool = False) -> list[tuple[float, float]]:
    """(row, col) chip centres for one pixel-space polygon: its centre when it fits in half a chip,
    else a grid of stride size/2 over the cells it touches (``inside``: the grid points inside it,
    or one point inside a thin polygon)."""
    import shapely

    x0, y0, x1, y1 = g.bounds
    h = size / 2
    if max(x1 - x0, y1 - y0) <= h:
        return [((y0 + y1) / 2, (x0 + x1) / 2)]
    xs, ys = np.meshgrid(np.arange(x0 + h / 2, x1 + h / 2, h), np.arange(y0 + h / 2, y1 + h / 2, h))
    if inside:
        ok = shapely.contains_xy(g, xs, ys)
        if not ok.any():
            p = g.representative_point()
            return [(p.y, p.x)]
    else:
        ok = shapely.intersects(g, shapely.box(xs - h / 2, ys - h / 2, xs + h / 2, ys + h / 2))
    return list(zip(ys[ok].tolist(), xs[ok].tolist()))


def _balanced(klass: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n sorted indices into ``klass``, as even over its values as their counts allow (seeded):
    the rarest classes keep all their chips, the others share what is left."""
    groups = sorted((rng.permutation(np.flatnonzero(klass == c)) for c in np.unique(klass)), key=len)
    take, left = [], n
    for j, g in enumerate(groups):
        m = min(len(g), left // (len(groups) - j))
        take.append(g[:m])
        left -= m
    return np.sort(np.concatenate(take))


def _windows(rasters: list, lab: _Labels, size: int, task: str, val_fraction: float, rng: np.random.Generator,
             background_share: float, max_chips: int, block_chips: int | None, notes: list[str],
             evaluation: bool = False):
    """Chip windows (raster, row, col), their validation flags, the blocks (with flags) and the class
    each chip is centred on (the label of a classification chip; chips placed anywhere: the
    background class, or -1 without one). ``evaluation``: no split, every chip is held out and
    centred without jitter."""
    f, k = lab.f, len(lab.classes)
    for bc in ([block_chips] if block_chips else [3, 2, 1]):
        blocks = [(i, *b) for i, r in enumerate(rasters) for b in plan_blocks(r.height, r.width, size, bc)]
        bpres = [lab.presence[i][:, r0 // f:-(-r1 // f), c0 // f:-(-c1 // f)].any((1, 2)) for i, r0, c0, r1, c1 in blocks]
        labelled = [bool(p.any()) for p in bpres]
        if sum(labelled) >= 4 or evaluation:
            break
    block_of = _block_locator(blocks, rasters)
    if evaluation:
        val = np.ones(len(blocks), bool)
    elif sum(labelled) < 2:
        raise FinetuneError(f"the labels of {lab.source} fall in {sum(labelled)} block of {bc}x{bc} chips ({size} px "
                            "each): a spatially separate validation set is impossible. Label a wider area, or add a "
                            "raster")
    else:
        weights = np.zeros(len(blocks))  # labels per block: detection objects (by centroid), or labelled area
        if lab.shapes and task == "detect":
            for i in range(len(rasters)):
                for g in lab.shapes[i][0]:
                    p = g.centroid
                    weights[block_of(i, p.y, p.x)] += 1
        else:
            weights = np.array([lab.presence[i][:, r0 // f:-(-r1 // f), c0 // f:-(-c1 // f)].any(0).sum()
                                for i, r0, c0, r1, c1 in blocks], float)
        val = split_blocks(bpres, labelled, val_fraction, rng, weights)
        notes.append(f"spatial split: blocks of {bc * size} px; {int(val[np.flatnonzero(labelled)].sum())} of "
                     f"{sum(labelled)} labelled blocks, {100 * weights[val].sum() / max(weights.sum(), 1):.0f} % of the "
                     f"{'objects' if lab.shapes and task == 'detect' else 'labelled area'}, held out for validation")
    tile_val = task in ("segment", "detect") and not evaluation  # validation = whole held-out blocks, tiled
    held = [np.zeros(pr.shape[1:], bool) for pr in lab.presence]  # per raster: presence cells in a held-out block
    for (i, r0, c0, r1, c1), v in zip(blocks, val):
        if v and tile_val:
            held[i][r0 // f:-(-r1 // f), c0 // f:-(-c1 // f)] = True
    anchors = []  # chip centres: (raster, row, col, class index or BACKGROUND)
    for i, r in enumerate(rasters):
        if lab.shapes:
            anchors += [(i, y, x, c) for g, c in zip(*lab.shapes[i]) for y, x in _anchor_points(g, size, task == "classify")
                        if -size / 4 <= y < r.height + size / 4 and -size / 4 <= x < r.width + size / 4]
            continue
        p = lab.presence[i] & ~held[i]  # class raster: balanced over classes, as many chips as the area needs
        have = [j for j in range(k) if p[j].any()]
        budget = -(-int(p.any(0).sum()) * f * f // max(1, size * size // 4))
        for j in have:
            rc = np.argwhere(p[j])
            anchors += [(i, (a + 0.5) * f, (b + 0.5) * f, j) for a, b in rc[rng.permutation(len(rc))[:-(-budget // len(have))]]]
    if tile_val:  # anchors in held-out blocks: those blocks are tiled instead
        anchors = [a for a in anchors if not val[block_of(*a[:3])]]
    if lab.background or task == "detect":  # background chips / detection negatives, anywhere
        area = np.array([(r1 - r0) * (c1 - c0) * (not (v and tile_val)) for (_, r0, c0, r1, c1), v in zip(blocks, val)],
                        float)
        for b in rng.choice(len(blocks), round(len(anchors) * background_share / (1 - background_share)), p=area / area.sum()):
            i, r0, c0, r1, c1 = blocks[b]
            anchors.append((i, rng.uniform(r0, r1), rng.uniform(c0, c1), BACKGROUND))
    if len(anchors) > max_chips:
        kinds = np.array([a[3] for a in anchors])
        pick = _balanced(kinds, max_chips, rng) if task == "classify" else \
            np.sort(rng.choice(len(anchors), max_chips, replace=False))
        anchors = [anchors[j] for j in pick]
        notes.append(f"{len(anchors)} chips kept of {len(kinds)} candidates (--max-chips {max_chips}"
                     + (", balanced over classes)" if task == "classify" else ")"))
    bg = lab.classes.index(lab.background) if lab.background else -1
    jit = 0 if evaluation else size // 4
    wins, split, klass, touching = [], [], [], 0
    for i, cr, cc, kk in anchors:  # the anchor's block; the jittered window is clamped inside it
        b = block_of(i, cr, cc)
        _, r0, c0, r1, c1 = blocks[b]
        jr, jc = rng.integers(-jit, jit + 1, 2)
        r, c = int(np.clip(round(cr - size / 2) + jr, r0, max(r0, r1 - size))), \
            int(np.clip(round(cc - size / 2) + jc, c0, max(c0, c1 - size)))
        if task == "classify" and kk == BACKGROUND:  # a background chip must touch no other labelled class
            near = lab.presence[i][:, r // f:-(-(r + size) // f), c // f:-(-(c + size) // f)].any((1, 2))
            near[bg] = False
            if near.any():
                touching += 1
                continue
        wins.append((i, r, c))
        split.append(bool(val[b]))
        klass.append(bg if kk == BACKGROUND else kk)
    if touching:
        notes.append(f"{touching} background chip(s) dropped: they touched a labelled polygon")
    if tile_val:
        tiles = _tiles(blocks, val, lab, size, everywhere=bool(lab.background) or task == "detect")
        cap = max(1, round(max_chips * val_fraction))
        msg = f"validation: {len(tiles)} chip(s) tiling the held-out blocks"
        if len(tiles) > cap:
            tiles = [tiles[j] for j in np.sort(rng.choice(len(tiles), cap, replace=False))]
            msg += f", {cap} kept at random (--max-chips x the validation fraction)"
        notes.append(msg + " (scored as a scene is: background and far-from-label areas included)")
        wins += tiles
        split += [True] * len(tiles)
        klass += [-1] * len(tiles)
    return wins, np.array(split, bool), [(*b, bool(v)) for b, v in zip(blocks, val)], np.array(klass, np.int64)


def _block_locator(blocks: list, rasters: list):
    """A function (raster i, row, col) -> index of the block holding that point (clamped into the
    raster), by bisection on raster i's block edges: ``blocks`` hold each raster's ``plan_blocks``
    in order (rows of blocks, left to right), so a look-up costs no scan over every block."""
    grid: dict[int, list] = {}
    for b, (i, r0, c0, _, _) in enumerate(blocks):
        g = grid.setdefault(i, [b, set(), set()])
        g[1].add(r0)
        g[2].add(c0)
    edges = {i: (first, np.array(sorted(rs)), np.array(sorted(cs))) for i, (first, rs, cs) in grid.items()}

    def locate(i: int, row: float, col: float) -> int:
        first, rs, cs = edges[i]
        r = int(np.searchsorted(rs, min(max(row, 0), rasters[i].height - 1), "right")) - 1
        c = int(np.searchsorted(cs, min(max(col, 0), rasters[i].width - 1), "right")) - 1
        return first + r * len(cs) + c

    return locate


def _tiles(blocks: list, val: np.ndarray, lab: _Labels, size: int, everywhere: bool) -> list[tuple[int, int, int]]:
    """Chip windows (raster, row, col) covering every held-out block without gaps (the last row /
    column of chips shifted back inside the block). Unless ``everywhere`` (a background class, or
    detection, where every pixel is labelled), only chips touching a labelled pixel are kept."""
    def starts(a: int, b: int) -> list[int]:
        s = list(range(a, max(a, b - size) + 1, size))
        return s + [b - size] if b - size > s[-1] else s

    f, out = lab.f, []
    for (i, r0, c0, r1, c1), v in zip(blocks, val):
        if not v:
            continue
        for r in starts(r0, r1):
            for c in starts(c0, c1):
                if everywhere or lab.presence[i][:, r // f:-(-(r + size) // f), c // f:-(-(c + size) // f)].any():
                    out.append((i, r, c))
    return out
