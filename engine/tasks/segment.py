"""Segmentation: blended logits -> class raster (uint8 + colours) + confidence (+ probabilities, polygons)."""

from __future__ import annotations

import numpy as np

from ..inference import InferenceResult
from ..stitching import RollingStitcher
from ..writers import GeoTiffWriter, class_colormap
from .base import PixelSink, check_extra_outputs, sibling

NODATA_CLASS = 255
CHUNK_PX = 1 << 17  # pixels post-processed and written at a time (whole rows, at least one)


class SegmentSink(PixelSink):
    def __init__(self, ctx):
        super().__init__(ctx)
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
        names = [c["name"] for c in self.classes]
        self.paths = {"class": ctx.output, "confidence": sibling(ctx.output, "_confidence.tif")}
        if opts.probabilities:
            self.paths["probabilities"] = sibling(ctx.output, "_probabilities.tif")
        self.paths_vectors = ctx.output.with_suffix(".gpkg")
        # every output is checked before the first temporary file is opened
        check_extra_outputs(ctx, [p for k, p in self.paths.items() if k != "class"]
                            + ([self.paths_vectors] if opts.vector else []))
        self.writers = {}
        try:
            self.writers["class"] = GeoTiffWriter(self.paths["class"], count=1, dtype="uint8", nodata=NODATA_CLASS,
                                                  colormap=class_colormap(self.classes), descriptions=["class"],
                                                  **common)
            self.writers["confidence"] = GeoTiffWriter(self.paths["confidence"], count=1, dtype="float32",
                                                       nodata=float("nan"), descriptions=["confidence"], **common)
            if opts.probabilities:
                self.writers["probabilities"] = GeoTiffWriter(self.paths["probabilities"], count=k, dtype="float32",
                                                              nodata=float("nan"), descriptions=names, **common)
        except BaseException:
            self.abort()
            raise
        self.counts = np.zeros(k, np.int64)
        self.areas = np.zeros(k, np.float64)
        self.conf_sum = np.zeros(k, np.float64)

    def consume(self, windows, logits: np.ndarray, valid: np.ndarray) -> None:
        for b, win in enumerate(windows):
            y = logits[b, 1:] - logits[b, :1] if self.relative else logits[b]
            self.stitcher.add(win, y, valid[b])
            for row_off, strip in self.stitcher.pop_ready():  # before the next add: strips are views
                self._write(row_off, strip)

    def _write(self, row_off: int, strip: np.ndarray) -> None:
        # a few rows at a time: the temporaries (softmax, argmax, statistics) stay ~CHUNK_PX pixels,
        # instead of several copies of a whole strip (up to window rows x the raster's width)
        rows = max(1, CHUNK_PX // strip.shape[2])
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
        valid = ~invalid
        valid_cls = cls[valid]
        self.counts += np.bincount(valid_cls, minlength=k)[:k]
        row_area = np.broadcast_to(self.geo.row_areas(row_off, cls.shape[0])[:, None], cls.shape)
        self.areas += np.bincount(valid_cls, weights=row_area[valid], minlength=k)[:k]
        self.conf_sum += np.bincount(valid_cls, weights=conf[valid], minlength=k)[:k]
        self.writers["class"].write_rows(row_off, cls)
        self.writers["confidence"].write_rows(row_off, conf)
        if "probabilities" in self.writers:
            probs[:, invalid] = np.nan
            self.writers["probabilities"].write_rows(row_off, probs.astype(np.float32, copy=False))

    def finish(self) -> InferenceResult:
        for row_off, strip in self.stitcher.flush():
            self._write(row_off, strip)
        if self.counts.sum() == 0:
            from ..errors import RasterInputError

            raise RasterInputError(f"{self.ctx.raster.paths[0]}: every pixel is nodata (declared nodata, NaN or inf); "
                                   "nothing to segment. Check the file's nodata value or the --bands choice")
        for w in self.writers.values():  # all complete on disk before any is published
            w.close()
        stats = {"pixels": int(self.counts.sum()), "area_unit": self.geo.area_unit, "per_class": {}}
        for i, c in enumerate(self.classes):
            n = int(self.counts[i])
            stats["per_class"][c["name"]] = {"pixels": n, "area": float(self.areas[i]),
                                             "fraction": n / max(1, int(self.counts.sum())),
                                             "mean_confidence": float(self.conf_sum[i] / n) if n else None}
        outputs = {k: str(v) for k, v in self.paths.items()}
        if self.ctx.options.vector:  # from the closed temporary class raster: a failure publishes nothing
            from ..vectorize import polygonize_classes

            gpkg = self.paths_vectors
            vec = polygonize_classes(self.writers["class"].tmp, gpkg, [c["name"] for c in self.classes],
                                     min_area_px=self.ctx.options.min_area_px)
            outputs["vectors"] = str(gpkg)
            stats["vectors"] = {k: v for k, v in vec.items() if k != "path"}
        for w in self.writers.values():
            w.commit()
        return InferenceResult(task="segment", outputs=outputs, classes=self.classes, statistics=stats)

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
