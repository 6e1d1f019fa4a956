"""The CFAR row of a detection evaluation: CFAR boxes over the evaluated rasters, and the area
searched (for false alarms per km^2, or per megapixel when a raster is not georeferenced in metres).

Also ``choose_cfar``: the CFAR settings (false-alarm probability, and any others asked) with the
best mAP@0.5 on TRAINING rasters + labels, so that the baseline is tuned as a learned model would be, never on the test area.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from engine.cfar import CfarConfig
from engine.cfar.scene import pixel_spacing_m, run_cfar


def search_area(rasters: list[str], opts) -> tuple[float, str]:
    """Area of the evaluated region over all rasters: (km^2, "km2") when every raster is
    georeferenced in metres, else (megapixels, "Mpx")."""
    from engine.inference import _clip_extent
    from engine.reader import SarRaster

    km2, mpx, metres = 0.0, 0.0, True
    for r in rasters:
        with SarRaster.open(r, opts.bands, opts.complex_mode) as src:
            # the region the engine processes (an extent clipped to the raster, offsets included)
            region = None if opts.extent is None else _clip_extent(opts.extent, src)
            h, w = (src.height, src.width) if region is None else (region.height, region.width)
            sp = pixel_spacing_m(src)
        mpx += h * w / 1e6
        if sp is None:
            metres = False
        else:
            km2 += h * w * sp[0] * sp[1] / 1e6
    return (km2, "km2") if metres else (mpx, "Mpx")


def truth_boxes(rasters: list[str], labels: str, class_field: str, names: list[str], opts) -> list[tuple]:
    """One box (pixel bounds) per labelled polygon, per raster, read as detection evaluation reads them."""
    from .reference import vector_reference

    shapes = vector_reference(rasters, labels, class_field, names, opts)[0]
    return [(np.asarray([g.bounds for g in polys], np.float64).reshape(-1, 4), np.asarray(cls, np.int64))
            for polys, cls in shapes]


def cfar_boxes(rasters: list[str], settings: dict | CfarConfig, opts, names: list[str]):
    """CFAR over each raster (bands, units and complex mode of the evaluation's options): the
    settings used, per raster (boxes (n, 4) in pixels, scores, class index: every box, whatever the
    settings' ``score_threshold``, which is for the operating point), and the log. Boxes get
    the model's class named ``class_name`` when it has one, else its first class."""
    cfg = settings if isinstance(settings, CfarConfig) else CfarConfig.from_dict(
        {"input_units": opts.input_units, **settings})
    k = names.index(cfg.class_name) if cfg.class_name in names else 0
    preds, log = [], [f"CFAR boxes are counted as class '{names[k]}'"]
    every = dataclasses.replace(cfg, score_threshold=0.0)  # mAP ranks every box; the threshold is the operating point
    for r in rasters:
        res = run_cfar([r], None, every, bands=opts.bands, complex_mode=opts.complex_mode)
        o = res.objects
        preds.append((o.boxes.astype(np.float64), o.scores.astype(np.float64), np.full(len(o), k, np.int64)))
        log += [f"{Path(r).name}: {line}" for line in res.log + res.warnings]
    return cfg, preds, log


PFAS = (3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)


def choose_cfar(rasters: list[str], labels: str, class_field: str, names: list[str], opts, base: dict,
                pfas: tuple[float, ...] = PFAS, grid: dict[str, tuple] | None = None,
                choose_threshold: bool = True) -> tuple[dict, list[dict]]:
    """The settings with the best mAP@0.5 (ties: F1 with every box at the pfa, then the smaller pfa)
    on the TRAINING rasters + labels: each ``pfa`` of ``pfas`` times each combination of ``grid``
    (setting -> values, e.g. ``{"min_area": (4, 25)}``); the other settings are ``base``. mAP ranks
    the objects by their CFAR score, as the test does. Returns the chosen settings and each
    candidate's scores."""
    import itertools

    from .evaluate import score_detections

    truth = truth_boxes(rasters, labels, class_field, names, opts)
    area = search_area(rasters, opts)
    keys = sorted(grid or {})
    tried = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        for pfa in pfas:
            settings = {**base, **dict(zip(keys, combo)), "pfa": pfa, "k_sigma": None}
            cfg, preds, _ = cfar_boxes(rasters, settings, opts, names)
            sc, _ = score_detections(preds, truth, names, cfg.score_threshold, area)
            tried.append({**dict(zip(keys, combo)), "pfa": pfa, "f1": sc["f1"] or 0.0, "map_50": sc["map_50"],
                          "precision": sc["precision"], "recall": sc["recall"], "preds": preds})
    best = max(tried, key=lambda t: (t["map_50"], t["f1"], -t["pfa"]))
    chosen = {k: best[k] for k in keys}
    threshold = best_f1_threshold(best["preds"], truth) if choose_threshold else base.get("score_threshold", 0.0)
    for t in tried:
        del t["preds"]
    return {**base, **chosen, "pfa": best["pfa"], "k_sigma": None, "score_threshold": threshold}, tried


def best_f1_threshold(preds: list[tuple], truth: list[tuple]) -> float:
    """The score threshold with the best F1 (IoU >= 0.5, every class together) on these predictions:
    the operating point an analyst gets. Greedy matching in score order, so the top-k boxes' matches
    are those of the whole list."""
    from .evaluate import match_boxes

    scores, flags = [], []
    for (b, s, c), (tb, tc) in zip(preds, truth):
        for k in np.unique(np.concatenate([c, tc])):
            flags.append(match_boxes(b[c == k], s[c == k], tb[tc == k]))
            scores.append(s[c == k])
    s, f = np.concatenate(scores or [np.zeros(0)]), np.concatenate(flags or [np.zeros(0, bool)])
    if not f.any():
        return 0.0
    order = np.argsort(-s, kind="stable")
    s, tp = s[order], np.cumsum(f[order])
    f1 = 2 * tp / (np.arange(1, len(s) + 1) + sum(len(t[0]) for t in truth))
    last = np.flatnonzero(np.r_[s[1:] < s[:-1], True])  # a threshold keeps every box of equal score
    k = last[np.argmax(f1[last])]
    return float(s[k])


def evaluate_cfar(rasters: list[str], labels: str, class_field: str, names: list[str], opts,
                  settings: dict) -> dict:
    """CFAR alone over ``rasters`` against one box per polygon: the metrics of a detection
    evaluation (``training.evaluate.score_detections``) at the CFAR ``score_threshold``."""
    from .evaluate import score_detections

    truth = truth_boxes(rasters, labels, class_field, names, opts)
    cfg, preds, log = cfar_boxes(rasters, settings, opts, names)
    scores, _ = score_detections(preds, truth, names, cfg.score_threshold, search_area(rasters, opts))
    return {**scores, "config": cfg.to_dict(), "log": log}
