"""The CFAR row of a detection evaluation: CFAR boxes over the evaluated rasters, and the area
searched (for false alarms per km^2, or per megapixel when a raster is not georeferenced in metres).

Also ``choose_cfar``: the CFAR settings (false-alarm probability) with the best F1 on TRAINING
rasters + labels, so that the baseline is tuned as a learned model would be, never on the test area.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.cfar import CfarConfig
from engine.cfar.scene import pixel_spacing_m, run_cfar


def search_area(rasters: list[str], opts) -> tuple[float, str]:
    """Area of the evaluated region over all rasters: (km^2, "km2") when every raster is
    georeferenced in metres, else (megapixels, "Mpx")."""
    from engine.reader import SarRaster

    km2, mpx, metres = 0.0, 0.0, True
    for r in rasters:
        with SarRaster.open(r, opts.bands, opts.complex_mode) as src:
            h, w = (src.height, src.width) if opts.extent is None else (
                min(opts.extent[2], src.height), min(opts.extent[3], src.width))
            sp = pixel_spacing_m(src)
        mpx += h * w / 1e6
        if sp is None:
            metres = False
        else:
            km2 += h * w * sp[0] * sp[1] / 1e6
    return (km2, "km2") if metres else (mpx, "Mpx")


def cfar_boxes(rasters: list[str], settings: dict | CfarConfig, opts, names: list[str]):
    """CFAR over each raster (bands, units and complex mode of the evaluation's options): the
    settings used, per raster (boxes (n, 4) in pixels, scores, class index), and the log. Boxes get
    the model's class named ``class_name`` when it has one, else its first class."""
    cfg = settings if isinstance(settings, CfarConfig) else CfarConfig.from_dict(
        {"input_units": opts.input_units, **settings})
    k = names.index(cfg.class_name) if cfg.class_name in names else 0
    preds, log = [], [f"CFAR boxes are counted as class '{names[k]}'"]
    for r in rasters:
        res = run_cfar([r], None, cfg, bands=opts.bands, complex_mode=opts.complex_mode)
        o = res.objects
        preds.append((o.boxes.astype(np.float64), o.scores.astype(np.float64), np.full(len(o), k, np.int64)))
        log += [f"{Path(r).name}: {line}" for line in res.log + res.warnings]
    return cfg, preds, log


def choose_cfar(rasters: list[str], labels: str, class_field: str, names: list[str], opts, base: dict,
                pfas: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9)) -> tuple[dict, list[dict]]:
    """The ``pfa`` with the best F1 (every box at the pfa) on the TRAINING rasters + labels; the
    other settings are ``base``. Returns the chosen settings and each candidate's scores."""
    from .evaluate import score_detections
    from .reference import vector_reference

    shapes, _, _, _ = vector_reference(rasters, labels, class_field, names, opts)
    truth = [(np.asarray([g.bounds for g in polys], np.float64).reshape(-1, 4), np.asarray(cls, np.int64))
             for polys, cls in shapes]
    area = search_area(rasters, opts)
    tried = []
    for pfa in pfas:
        settings = {**base, "pfa": pfa, "k_sigma": None}
        cfg, preds, _ = cfar_boxes(rasters, settings, opts, names)
        sc, _ = score_detections(preds, truth, names, cfg.score_threshold, area)
        tried.append({"pfa": pfa, "f1": sc["f1"] or 0.0, "map_50": sc["map_50"], "precision": sc["precision"],
                      "recall": sc["recall"]})
    best = max(tried, key=lambda t: (t["f1"], t["map_50"], -t["pfa"]))  # ties: the fewer false alarms
    return {**base, "pfa": best["pfa"], "k_sigma": None}, tried


def evaluate_cfar(rasters: list[str], labels: str, class_field: str, names: list[str], opts,
                  settings: dict) -> dict:
    """CFAR alone over ``rasters`` against one box per polygon: the metrics of a detection
    evaluation (``training.evaluate.score_detections``) at the CFAR ``score_threshold``."""
    from .evaluate import score_detections
    from .reference import vector_reference

    shapes, _, _, _ = vector_reference(rasters, labels, class_field, names, opts)
    truth = [(np.asarray([g.bounds for g in polys], np.float64).reshape(-1, 4), np.asarray(cls, np.int64))
             for polys, cls in shapes]
    cfg, preds, log = cfar_boxes(rasters, settings, opts, names)
    scores, _ = score_detections(preds, truth, names, cfg.score_threshold, search_area(rasters, opts))
    return {**scores, "config": cfg.to_dict(), "log": log}
