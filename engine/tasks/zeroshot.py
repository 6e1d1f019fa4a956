"""Zero-shot classification with a CLIP package: the image embedding of each cell of a grid over the
raster against class names typed at run time (``--classes "water,urban,forest"``, ``--templates``).

Outputs: the class raster (uint8 on the cell grid, 255 where a cell has no data, the classes'
colours), ``_confidence.tif`` (the top class's probability, softmax of 100 x cosine, CLIP's logit
scale) and ``_grid.gpkg`` (one polygon per cell, as ``classify`` writes: class, score, valid fraction,
p_<class>; written by classify's sink). The image embeddings come from ``engine.clip.scene`` (cached
per raster, model, bands and grid), so another class list costs only the text tower. A run with
``--query`` is handed to the ``textquery`` task (``engine/tasks/textquery.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SarmaeError
from ..types import InferenceOptions, InferenceResult
from .base import Task, sibling, softmax

if TYPE_CHECKING:
    from ..card import ModelCard

LOGIT_SCALE = 100.0  # CLIP's zero-shot logits: 100 x cosine (SARCLIP, SARVLM)


class ZeroshotTask(Task):
    name = "zeroshot"
    outputs = ("embeddings",)  # the image tower's unit-norm embeddings (B, D)
    windowed = False  # the grid's embeddings come from engine.clip.scene (cached), then the text tower
    onnx = True  # the image tower exports to model.onnx (sarmae export) for the onnxruntime path
    default_overlap = 0.0  # cells as large as the model's window
    agreement_metric = "mean cosine similarity"  # int8 image tower (sarmae export --precision int8): its gate

    def agreement(self, reference: np.ndarray, test: np.ndarray, valid: np.ndarray) -> float:
        """The mean cosine similarity of the (B, D) image embeddings over the windows with data."""
        keep = valid.reshape(len(valid), -1).any(1)
        cos = (reference * test).sum(1) / np.maximum(np.linalg.norm(reference, axis=1) * np.linalg.norm(test, axis=1),
                                                     1e-12)
        return float(cos[keep].mean()) if keep.any() else 1.0

    def build_model(self, card: ModelCard) -> Any:
        from ..clip import build_clip

        return build_clip(card)

    def forward(self, model: Any, x: Any, mask_ratio: float = 0.75) -> Any:
        import torch

        if not torch.onnx.is_in_onnx_export():
            return model.encode_image(x, normalize=True)
        # ONNX has no fused attention (aten::_native_multi_head_attention): trace the plain path
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return model.encode_image(x, normalize=True)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)

    def check_card(self, card: ModelCard) -> list[str]:
        from ..clip.card import card_problems

        return card_problems(card)

    def summary(self, card: ModelCard) -> list[str]:
        clip = card.architecture.extra["clip"]
        cfg = clip["config"]
        return [f"clip:          open_clip {clip.get('model_name') or 'custom config'}, embedding {cfg['embed_dim']}, "
                f"text context {clip['tokenizer']['context_length']} tokens, weights from {clip.get('source')}",
                "templates:     " + " | ".join(clip["templates"])]

    def extra_outputs(self, output: Path, options: InferenceOptions) -> list[Path]:
        return [sibling(output, "_confidence.tif"), sibling(output, "_grid.gpkg")]

    # ------------------------------------------------------------------ the run
    def check_options(self, options: InferenceOptions) -> None:
        """Refuse options that do not fit before any pixel is read."""
        from ..clip import check_classes, check_templates

        if options.query:
            raise SarmaeError("--query and --classes: give one of them (phrases make a similarity raster)")
        if not options.classes:
            raise SarmaeError("a zeroshot package needs --classes (e.g. --classes \"water,urban,forest\") for a "
                              "class map, or --query \"ships at sea\" for a similarity raster")
        check_classes(options.classes)
        if len(options.classes) > 254:  # uint8 class raster, 255 = no data
            raise SarmaeError(f"--classes: {len(options.classes)} names; a class map holds at most 254 classes")
        if options.templates is not None:
            check_templates(options.templates)

    def run_raster(self, inputs, output, package, options, say, progress, should_cancel) -> InferenceResult:
        if options.query and type(self) is ZeroshotTask:
            from .registry import get_task

            return get_task("textquery").run_raster(inputs, output, package, options, say, progress, should_cancel)
        from ..clip.scene import scene_embeddings
        from ..radiometry import Radiometry
        from ..reader import SarRaster
        from ..writers import check_output
        from .georef import Georef

        self.check_options(options)
        extra = [check_output(p, inputs, options.overwrite) for p in self.extra_outputs(Path(output), options)]
        with SarRaster.open(inputs, options.bands, options.complex_mode) as raster:
            say(f"input: {raster.describe()}")
            radiometry = Radiometry.for_raster(package.card.input, raster, options.input_units)
            say(radiometry.describe())
            scene = scene_embeddings(raster, radiometry, package, self, options, say, progress, should_cancel)
            geo = Georef(raster, scene.region, scale=scene.stride)
            tags = {"SARMAE_MODEL": package.card.name, "SARMAE_MODEL_SHA256": package.card.weights.get("sha256", ""),
                    "SARMAE_TASK": self.name, "SARMAE_INPUT_UNITS": radiometry.describe(),
                    "SARMAE_INPUTS": ";".join(Path(p).name for p in inputs)}
            with _said(say):  # the text side's warnings (a phrase truncated) reach the run's log
                result = self.write(scene, package, options, Path(output), extra, geo, tags, raster)
        result.provenance = {"input_units": radiometry.describe(), "backend": "image embeddings cached" if scene.cached
                             else "image tower, then the text tower"}
        result.statistics["embeddings"] = {"file": str(scene.path or ""), "cached": scene.cached}
        if progress is not None:
            progress(1.0, "done")
        return result

    def write(self, scene, package, options, output: Path, extra: list[Path], geo, tags: dict,
              raster) -> InferenceResult:
        from ..clip import load_clip, text_embeddings
        from ..package import default_classes
        from ..writers import GeoTiffWriter, class_colormap

        clip = load_clip(package)
        names = [c.strip() for c in options.classes]
        classes = default_classes(names)
        k = text_embeddings(clip, names, options.templates).cpu().numpy()  # (K, D)
        ok = scene.has_data
        logits = LOGIT_SCALE * np.nan_to_num(scene.emb) @ k.T  # (R, C, K)
        probs = softmax(logits, axis=-1).astype(np.float32)
        cls = np.where(ok, probs.argmax(axis=-1), 255).astype(np.uint8)
        conf = np.where(ok, probs.max(axis=-1), np.nan).astype(np.float32)
        rows, cols = cls.shape
        tags = {**tags, "SARMAE_CLASSES": ",".join(names), "SARMAE_CELL_PX": str(scene.stride)}
        common = {"width": cols, "height": rows, **geo.writer_kwargs(), "tags": tags, "cog": options.cog}
        with GeoTiffWriter(output, count=1, dtype="uint8", nodata=255, colormap=class_colormap(classes),
                           descriptions=["class"], **common) as dst:
            dst.write_rows(0, cls)
        with GeoTiffWriter(extra[0], count=1, dtype="float32", nodata=float("nan"),
                           descriptions=["confidence"], **common) as dst:
            dst.write_rows(0, conf)
        self._grid(scene, package.card, classes, cls, probs, raster, extra[1], options)
        n = int(ok.sum())
        cell_area = geo.row_areas(0, rows)[:, None]  # (R, 1): the area of one cell in each row
        per_class = {c: {"cells": int((cls == i).sum()), "fraction": float((cls == i).sum() / max(n, 1)),
                         "area": float(((cls == i) * cell_area).sum())} for i, c in enumerate(names)}
        return InferenceResult(task=self.name, outputs={"class": str(output), "confidence": str(extra[0]),
                                                        "grid": str(extra[1])}, classes=classes,
                               statistics={"cells": n, "cell_px": scene.stride, "per_class": per_class,
                                           "area_unit": geo.area_unit,
                                           "templates": list(options.templates or clip.templates)})

    def _grid(self, scene, card, classes, cls, probs, raster, path: Path, options) -> None:
        """The cells as classify's grid of polygons (its sink writes them)."""
        from ..tiling import Window
        from ..types import RunContext
        from .classify import ClassifySink
        from .registry import get_task

        region = scene.region
        ctx = RunContext(raster, dataclasses.replace(card, classes=classes), None, path,
                         dataclasses.replace(options, overlap=0.0), scene.stride, {}, region, lambda _: None)
        sink = ClassifySink(get_task("classify"), ctx)
        s = scene.stride
        for i, j in zip(*np.nonzero(scene.has_data), strict=True):  # cells relative to the region
            win = Window(int(i) * s, int(j) * s, min(s, region.height - int(i) * s), min(s, region.width - int(j) * s))
            sink.rows.append((win, int(cls[i, j]), float(probs[i, j].max()), float(scene.valid[i, j]), probs[i, j]))
        sink.finish()

    def merge(self, job: Any) -> Any:  # not windowed: no torchrun parts to merge
        raise SarmaeError("CLIP runs (zeroshot, textquery) do not run under torchrun; run them in one process")



@contextlib.contextmanager
def _said(say):
    """Hand the ``sarmae.clip`` logger's warnings to the run's ``say`` while the block runs."""
    class _Say(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            say(record.getMessage())

    handler, logger = _Say(logging.WARNING), logging.getLogger("sarmae.clip")
    propagate, logger.propagate = logger.propagate, False  # said once, not also by the root logger
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
