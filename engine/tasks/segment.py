"""Segmentation: blended logits -> class raster (uint8 + colours) + confidence (+ probabilities, polygons).

The model is any module mapping (N, C, H, W) -> (N, K, H, W) class scores (``output``: logits, or
probabilities for a model.onnx made elsewhere), built by ``engine.models.build_from_architecture``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import NoValidDataError
from ..stitching import RollingStitcher
from ..types import InferenceOptions, InferenceResult, RunContext
from ..writers import GeoTiffWriter, class_colormap
from .base import PixelSink, Task, as_logits, check_extra_outputs, sibling
from .merging import MergeJob, RasterMerge

NODATA_CLASS = 255
CHUNK_PX = 1 << 17  # pixels post-processed and written at a time (whole rows, at least one)


class SegmentStatistics:
    """Pixels, area and summed confidence per class: the one place they are computed (a single run's
    sink and the merge of torchrun parts add the same rows in the same chunks: the same float sums)."""

    def __init__(self, classes: list[dict], geo):
        k = len(classes)
        self.classes, self.geo = classes, geo
        self.counts, self.areas, self.conf_sum = np.zeros(k, np.int64), np.zeros(k, np.float64), np.zeros(k, np.float64)

    def add(self, row_off: int, cls: np.ndarray, conf: np.ndarray) -> None:
        """One chunk of rows: class (rows, W) uint8, NODATA_CLASS off the data; confidence (rows, W)."""
        k = len(self.classes)
        valid = cls != NODATA_CLASS
        valid_cls = cls[valid]
        self.counts += np.bincount(valid_cls, minlength=k)[:k]
        row_area = np.broadcast_to(self.geo.row_areas(row_off, cls.shape[0])[:, None], cls.shape)
        self.areas += np.bincount(valid_cls, weights=row_area[valid], minlength=k)[:k]
        self.conf_sum += np.bincount(valid_cls, weights=conf[valid], minlength=k)[:k]

    def add_strip(self, row_off: int, cls: np.ndarray, conf: np.ndarray) -> None:
        """A strip, in the chunks the sink writes it in."""
        rows = chunk_rows(cls.shape[1])
        for r in range(0, cls.shape[0], rows):
            self.add(row_off + r, cls[r:r + rows], conf[r:r + rows])

    def result(self) -> dict:
        total = int(self.counts.sum())
        stats = {"pixels": total, "area_unit": self.geo.area_unit, "per_class": {}}
        for i, c in enumerate(self.classes):
            n = int(self.counts[i])
            stats["per_class"][c["name"]] = {"pixels": n, "area": float(self.areas[i]), "fraction": n / max(1, total),
                                             "mean_confidence": float(self.conf_sum[i] / n) if n else None}
        return stats


def chunk_rows(width: int) -> int:
    return max(1, CHUNK_PX // width)


def _vectors(ctx: RunContext, class_tif: Path, stats: dict, outputs: dict) -> Path:
    """Polygons of the (closed, not yet published) class raster into a verified temporary
    GeoPackage, returned: the caller publishes it after the rasters (a failure publishes nothing)."""
    from ..vectorize import polygonize_classes

    gpkg = ctx.output.with_suffix(".gpkg")
    vec = polygonize_classes(class_tif, gpkg, ctx.card.class_names, min_area_px=ctx.options.min_area_px,
                             publish_now=False)
    outputs["vectors"] = str(gpkg)
    stats["vectors"] = {k: v for k, v in vec.items() if k not in ("path", "tmp")}
    return vec["tmp"]


def _publish_vectors_abort(tmp: Path | None) -> None:
    from ..publish import remove_temporary

    if tmp is not None:
        remove_temporary(tmp)


def _publish_vectors(tmp: Path | None, ctx: RunContext) -> None:
    from ..publish import publish

    if tmp is not None:  # publish removes the temporary file whatever happens
        publish(tmp, ctx.output.with_suffix(".gpkg"))


class SegmentTask(Task):
    name = "segment"
    outputs = ("logits", "probabilities")
    needs_classes = True
    onnx = True
    agreement_metric = "pixel label agreement"

    def agreement(self, reference: np.ndarray, test: np.ndarray, valid: np.ndarray) -> float:
        """The fraction of data pixels whose class (argmax of (B, K, S, S) scores) is the same."""
        same = reference.argmax(1) == test.argmax(1)
        return float(same[valid].mean()) if valid.any() else 1.0

    def extra_outputs(self, output: Path, options: InferenceOptions) -> list[Path]:
        return ([sibling(output, "_confidence.tif")]
                + ([sibling(output, "_probabilities.tif")] if options.probabilities else [])
                + ([output.with_suffix(".gpkg")] if options.vector else []))

    def make_sink(self, ctx: RunContext) -> SegmentSink:
        return SegmentSink(self, ctx)

    def merge(self, job: MergeJob) -> InferenceResult:
        ctx = job.ctx
        m = RasterMerge(job, recomputed=("vectors",))
        stats = SegmentStatistics(ctx.card.classes, m.geo)
        try:
            m.copy(lambda row_off, block: stats.add_strip(row_off, block["class"][0], block["confidence"][0]))
            outputs, result = m.outputs(), stats.result()
            vec_tmp = _vectors(ctx, m.writers["class"].tmp, result, outputs) if ctx.options.vector else None
            try:
                m.commit()
            except BaseException:
                _publish_vectors_abort(vec_tmp)
                raise
            _publish_vectors(vec_tmp, ctx)
        except BaseException:
            m.abort()
            raise
        return InferenceResult(task=self.name, outputs=outputs, classes=ctx.card.classes, statistics=result)


class SegmentSink(PixelSink):
    def __init__(self, task: SegmentTask, ctx: RunContext):
        super().__init__(task, ctx)
        region, opts = ctx.region, ctx.options
        self.classes = ctx.card.classes
        k = len(self.classes)
        if k > 255:
            raise ValueError("at most 255 classes fit a uint8 class raster")
        # softmax does not change when one number is added to every logit of a pixel, and neither does
        # blending: blend logit_k - logit_0 (k >= 1) with 0 for class 0, one channel fewer in the
        # rolling buffer (a third less of it for two classes)
        self.relative = k > 1
        self.stitcher = RollingStitcher(self.plan, k - 1 if self.relative else k, copy_strips=False)
        common = dict(width=region.width, height=region.height, cog=opts.cog, tags=ctx.tags, **self.geo.writer_kwargs())
        self.paths = {"class": ctx.output, "confidence": sibling(ctx.output, "_confidence.tif")}
        if opts.probabilities:
            self.paths["probabilities"] = sibling(ctx.output, "_probabilities.tif")
        # every output is checked before the first temporary file is opened
        check_extra_outputs(ctx, task.extra_outputs(ctx.output, opts))
        self.writers = {}
        try:
            self.writers["class"] = GeoTiffWriter(self.paths["class"], count=1, dtype="uint8", nodata=NODATA_CLASS,
                                                  colormap=class_colormap(self.classes), descriptions=["class"],
                                                  **common)
            self.writers["confidence"] = GeoTiffWriter(self.paths["confidence"], count=1, dtype="float32",
                                                       nodata=float("nan"), descriptions=["confidence"], **common)
            if opts.probabilities:
                self.writers["probabilities"] = GeoTiffWriter(self.paths["probabilities"], count=k, dtype="float32",
                                                              nodata=float("nan"), descriptions=ctx.card.class_names,
                                                              **common)
        except BaseException:
            self.abort()
            raise
        self.stats = SegmentStatistics(self.classes, self.geo)

    def consume(self, windows, logits: np.ndarray, valid: np.ndarray) -> None:
        logits = as_logits(logits, self.ctx.card.output)
        for b, win in enumerate(windows):
            y = logits[b, 1:] - logits[b, :1] if self.relative else logits[b]
            self.stitcher.add(win, y, valid[b])
            for row_off, strip in self.stitcher.pop_ready():  # before the next add: strips are views
                self._write(row_off, strip)

    def _write(self, row_off: int, strip: np.ndarray) -> None:
        # a few rows at a time: the temporaries (softmax, argmax, statistics) stay ~CHUNK_PX pixels,
        # instead of several copies of a whole strip (up to window rows x the raster's width)
        rows = chunk_rows(strip.shape[2])
        for r in range(0, strip.shape[1], rows):
            self._write_rows(row_off + r, strip[:, r:r + rows])

    def _write_rows(self, row_off: int, logits: np.ndarray) -> None:
        invalid = np.isnan(logits[0])
        k = len(self.classes)
        probs = np.zeros((k, *logits.shape[1:]), np.float32)  # class 0 stays 0 when logits are relative
        probs[k - logits.shape[0]:] = logits
        np.nan_to_num(probs, copy=False, nan=0.0)
        probs -= probs.max(axis=0, keepdims=True)  # softmax, in place
        np.exp(probs, out=probs)
        probs /= probs.sum(axis=0, keepdims=True)
        cls = probs.argmax(axis=0).astype(np.uint8)
        conf = probs.max(axis=0).astype(np.float32)
        cls[invalid] = NODATA_CLASS
        conf[invalid] = np.nan
        self.stats.add(row_off, cls, conf)
        self.writers["class"].write_rows(row_off, cls)
        self.writers["confidence"].write_rows(row_off, conf)
        if "probabilities" in self.writers:
            probs[:, invalid] = np.nan
            self.writers["probabilities"].write_rows(row_off, probs.astype(np.float32, copy=False))

    def finish(self) -> InferenceResult:
        for row_off, strip in self.stitcher.flush():
            self._write(row_off, strip)
        if self.stats.counts.sum() == 0:
            raise NoValidDataError(f"{self.ctx.raster.paths[0]}: every pixel is nodata (declared nodata, NaN or inf); "
                                   "nothing to segment. Check the file's nodata value or the --bands choice")
        for w in self.writers.values():  # all complete on disk before any is published
            w.close()
        stats = self.stats.result()
        outputs = {k: str(v) for k, v in self.paths.items()}
        vec_tmp = _vectors(self.ctx, self.writers["class"].tmp, stats, outputs) if self.ctx.options.vector else None
        try:
            for w in self.writers.values():
                w.commit()
        except BaseException:
            _publish_vectors_abort(vec_tmp)
            raise
        _publish_vectors(vec_tmp, self.ctx)
        return InferenceResult(task="segment", outputs=outputs, classes=self.classes, statistics=stats)

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
