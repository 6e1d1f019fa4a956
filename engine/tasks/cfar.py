"""CFAR as a method of the detect task (``detect.cfar``): a ship detector with no network and no weights.

Its package is model.json alone (``cfar_card`` makes one; ``sarmae init --task detect --method cfar``)::

    {"task": "detect", "architecture": {"name": "cfar", "cfar": {CfarConfig settings}},
     "classes": [{"name": "target", ...}], "output": "boxes", "weights": {}}

The engine, ``sarmae infer`` and the worker run it like any other detector: the same GeoPackage
layer ('detections', with class_id, class_name, score, px_* fields, plus the CFAR ratio, pixel
count, area and length in metres) and the same result record. It is not windowed: it reads the
raster itself by strips of rows (``engine.cfar.scene.run_cfar``: memory flat in the raster height,
values converted to linear power, never run on dB). Run options: ``score_threshold`` (default the
card's), ``nms_iou``, ``bands`` (the first is used), ``input_units``, ``complex_mode``, ``threads``, and
``water_mask`` (+ ``water_class``): a mask raster on the input's grid, or a segmentation package
run first through the engine, its water class by name.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from ..cfar import CfarConfig, CfarConfigError
from ..errors import PackageError, SarmaeError
from ..types import InferenceOptions, InferenceResult
from .base import Task

WATER_NAMES = ("water", "sea", "ocean")  # a segmentation package's class taken as water, by name


class CfarTask(Task):
    name = "detect"
    method = "cfar"
    outputs = ("boxes",)
    needs_classes = True
    needs_weights = False
    windowed = False  # strips of rows with the background window's margins: run_raster
    vector_output = True
    blended = False

    # ------------------------------------------------------------------ the card
    @staticmethod
    def _settings(card) -> CfarConfig:
        d = card.architecture.extra.get("cfar")
        if not isinstance(d, dict):
            raise CfarConfigError("'architecture.cfar' (the CFAR settings) is missing or not an object; write the "
                                  "package again with 'sarmae init --task detect --method cfar'")
        try:
            return CfarConfig.from_dict(d)
        except TypeError as e:
            raise CfarConfigError(f"'architecture.cfar': {e}") from e

    @classmethod
    def config(cls, card) -> CfarConfig:
        """The card's CFAR settings (``architecture.cfar``), checked."""
        try:
            return cls._settings(card)
        except CfarConfigError as e:
            raise PackageError(f"model '{card.name}': {e}") from e

    def check_card(self, card) -> list[str]:
        problems = []
        try:
            self._settings(card)
        except CfarConfigError as e:
            problems.append(f"'architecture.cfar': {e}" if "architecture.cfar" not in str(e) else str(e))
        if len(card.classes) != 1:
            problems.append(f"a CFAR detector finds one class of objects: 'classes' must list one (found "
                            f"{len(card.classes)})")
        return problems

    def summary(self, card) -> list[str]:
        c = self.config(card)
        u = c.window_units
        rule = f"pfa {c.pfa:g}" if c.pfa is not None else f"k-sigma {c.k_sigma:g}"
        stat = "cell averaging (CA)" if c.method == "ca" else f"order statistic (OS, rank {c.os_rank:g})"
        sizes = f"min area {c.min_area:g} {'m2' if u == 'm' else 'px'}"
        if c.max_area is not None:
            sizes += f", max area {c.max_area:g} {'m2' if u == 'm' else 'px'}"
        if c.max_length is not None:
            sizes += f", max length {c.max_length:g} {u}"
        return [f"cfar:          {stat}, {rule}, ENL {c.enl:g} (looks), on linear power",
                f"windows:       guard {c.guard:g} {u}, background {c.background:g} {u} (full sides)"
                + (f", pixel spacing {c.pixel_spacing_m:g} m when not georeferenced" if c.pixel_spacing_m else ""),
                f"objects:       {sizes}; score threshold {c.score_threshold:g}, NMS IoU {c.nms_iou:g}"]

    def score_threshold(self, card, options: InferenceOptions) -> float:
        """The score a box needs: the run's ``score_threshold``, else the card's (0: every box at the pfa)."""
        return self.config(card).score_threshold if options.score_threshold is None else float(options.score_threshold)

    def cfar_threshold(self, card, options: InferenceOptions) -> float:
        """The CFAR score an object needs to be kept (plain CFAR: the run's threshold)."""
        return self.score_threshold(card, options)

    def scorer(self, package, options: InferenceOptions, say):
        """What rescores the CFAR objects before they are written (``run_cfar``'s ``refine``): none here."""
        return None

    # ------------------------------------------------------------------ the run
    def run_raster(self, inputs, output, package, options, say, progress, should_cancel) -> InferenceResult:
        from ..cfar.scene import run_cfar

        card = package.card
        if options.extent is not None:
            raise SarmaeError(f"{card.name}: CFAR runs over whole rasters and does not take an extent yet; crop the "
                              "raster first (e.g. gdal_translate -srcwin COL ROW WIDTH HEIGHT in.tif crop.tif)")
        if options.window is not None or options.overlap is not None:
            say("CFAR reads the raster by strips of rows: --window and --overlap do not apply")
        base = self.config(card)
        cfg = replace(base, class_name=card.classes[0]["name"], nms_iou=options.nms_iou,
                      score_threshold=self.cfar_threshold(card, options),
                      input_units=options.input_units or base.input_units, threads=options.threads or base.threads)

        def part(lo: float, hi: float, what: str):  # progress of one step mapped to [lo, hi]; its log
            def report(fraction: float, message: str = "") -> None:  # lines (< 0) are said once it ends
                if progress is not None and fraction >= 0:
                    progress(lo + (hi - lo) * fraction, f"{what}: {message}" if message else what)
            return report

        tmp = None
        try:
            mask = options.water_mask or cfg.water_mask
            if mask is not None and _is_package(mask):
                tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
                water = _water_from_package(mask, inputs, tmp, options, say, part(0.0, 0.5, "water mask"),
                                            should_cancel)
                cfg = replace(cfg, **water)
            elif mask is not None:
                cfg = replace(cfg, water_mask=str(mask),
                              water_values=_water_values(options.water_class, cfg.water_values, mask))
            rows = part(0.5 if tmp is not None else 0.0, 1.0, "CFAR")
            scorer = self.scorer(package, options, say)
            res = run_cfar(inputs, output, cfg, bands=options.bands, complex_mode=options.complex_mode,
                           overwrite=options.overwrite, progress=lambda f: rows(f, f"{100 * f:.0f} % of the rows"),
                           should_cancel=should_cancel, refine=scorer)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        for line in res.log + res.warnings:
            say(line)
        name = cfg.class_name
        stats = {"detections": len(res.objects), "per_class": {name: len(res.objects)},
                 "valid_pixels": res.valid_pixels, "tested_pixels": res.tested_pixels,
                 "area_km2": res.area_km2, "megapixels": res.megapixels, "warnings": res.warnings,
                 "cfar": {"method": cfg.method, "pfa": cfg.pfa, "k_sigma": cfg.k_sigma, "enl": cfg.enl,
                          "guard": cfg.guard, "background": cfg.background, "window_units": cfg.window_units,
                          "score_threshold": cfg.score_threshold}}
        backend = f"CFAR {cfg.method.upper()} (numpy/scipy, {cfg.threads} thread(s))"
        if scorer is not None:
            stats["scorer"] = scorer.statistics()
            backend += f" + chip scorer ({scorer.describe()})"
        from ..radiometry import UNIT_LABEL

        return InferenceResult(task="detect", outputs={"detections": str(res.output)}, classes=card.classes,
                               statistics=stats, provenance={
                                   "input_units": f"{UNIT_LABEL.get(res.units, res.units)} -> linear power",
                                   "backend": backend})

    def merge(self, job):
        raise SarmaeError("CFAR reads whole rasters and is not split over torchrun ranks")


# ---------------------------------------------------------------------------- cards and water masks
def cfar_card(cfg: CfarConfig, class_name: str = "target", name: str | None = None, provenance: dict | None = None):
    """A CFAR detector's model card (save it with ``engine.package.save_package(None, card, dest)``)."""
    from ..package import default_classes, new_card

    rule = f"pfa{cfg.pfa:g}" if cfg.pfa is not None else f"k{cfg.k_sigma:g}"
    arch = {"name": "cfar", "cfar": replace(cfg, class_name=class_name).to_dict()}
    return new_card(name or f"cfar-{cfg.method}-{rule}", "detect", arch, None, default_classes([class_name]),
                    {"training": "none: CFAR has no weights (a constant false-alarm rate threshold on linear power)",
                     **(provenance or {})})


def _is_package(path: str) -> bool:
    p = Path(path)
    return (p.is_dir() and (p / "model.json").is_file()) or p.suffix.lower() == ".zip"


def _water_values(water_class: str | None, default: list[float], mask: str) -> list[float]:
    if water_class is None:
        return list(default)
    try:
        return [float(v) for v in str(water_class).split(",") if v.strip()]
    except ValueError:
        raise SarmaeError(f"water mask {mask}: --water-class {water_class!r} must be the raster's water value(s), "
                          "e.g. 1 or 1,2 (a class name applies to a segmentation package)") from None


def _water_from_package(package: str, inputs: list[str], tmp: Path, options: InferenceOptions, say, progress,
                        should_cancel) -> dict:
    """Run the segmentation package over the inputs into ``tmp``: the CFAR settings of its water class."""
    from ..inference import run_inference
    from ..package import load_package

    pkg = load_package(package, lazy=True)
    card = pkg.card
    if card.task != "segment":
        raise SarmaeError(f"water mask {package}: a '{card.task}' package; give a segmentation package (with a water "
                          "class) or a water-mask raster on the input's grid")
    names = card.class_names
    want = options.water_class
    if want is not None and want not in names:
        raise SarmaeError(f"water mask {package}: no class '{want}' (classes: {', '.join(names)}): give "
                          "--water-class with one of them")
    if want is None:
        found = [n for n in names if n.lower() in WATER_NAMES]
        if not found:
            raise SarmaeError(f"water mask {package}: none of its classes ({', '.join(names)}) is named "
                              f"{'/'.join(WATER_NAMES)}: say which class is water with --water-class NAME")
        want = found[0]
    say(f"water mask: segmentation package {card.name} run first; its class '{want}' is water")
    seg_opts = InferenceOptions(batch_size=options.batch_size, device=options.device, backend=options.backend,
                                threads=options.threads, input_units=options.input_units,
                                complex_mode=options.complex_mode)
    res = run_inference(inputs, tmp / "water.tif", pkg, seg_opts, progress, should_cancel)
    for line in res.log:
        say(f"water mask: {line}")
    return {"water_mask": res.outputs["class"], "water_values": [float(names.index(want))]}
