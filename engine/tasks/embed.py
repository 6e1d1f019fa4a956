"""Embeddings: per-patch encoder features (stride = patch size) -> float16 GeoTIFF + PCA preview.

Windows are planned on the TOKEN grid (ceil(H/p) x ceil(W/p)) and scaled by p, so every window's
tokens fall exactly on output cells; overlapping windows' features are blended by the same rolling
stitcher as logits. A reservoir sample of feature vectors (``FeatureSample``) fits a 3-component
PCA, applied in a second pass (strip by strip) over the written features for an RGB preview
(``write_pca_preview``); the merge of torchrun parts uses the same two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import NoValidDataError
from ..stitching import RollingStitcher
from ..tiling import TilePlan, plan_tiles
from ..types import InferenceOptions, InferenceResult, RunContext
from ..writers import GeoTiffWriter
from .base import PixelSink, Task, check_extra_outputs, sibling
from .merging import MergeJob, RasterMerge

SAMPLE = 20000  # feature vectors kept for the PCA fit
PCA_STEP = 512  # rows of the embedding read at a time for the preview


class FeatureSample:
    """A uniform sample (reservoir-style, seed 0) of at most ``SAMPLE`` feature vectors over strips."""

    def __init__(self, dim: int, limit: int = SAMPLE):
        self.dim, self.limit = dim, limit
        self.rng = np.random.default_rng(0)
        self.sample = np.zeros((0, dim), np.float32)
        self.seen = 0

    def add(self, strip: np.ndarray) -> None:
        """A strip (D, rows, W) of features, NaN off the data."""
        vecs = strip.reshape(self.dim, -1).T
        vecs = vecs[~np.isnan(vecs[:, 0])]
        if len(vecs):
            self.seen += len(vecs)
            take = min(len(vecs), max(1, int(self.limit * len(vecs) / self.seen)))
            pick = vecs[self.rng.choice(len(vecs), take, replace=False)]
            self.sample = np.concatenate([self.sample, pick])
            if len(self.sample) > self.limit:
                self.sample = self.sample[self.rng.choice(len(self.sample), self.limit, replace=False)]


def write_pca_preview(sample: np.ndarray, embedding_tif: Path, path: Path, tags: dict, geo,
                      shape: tuple[int, int]) -> GeoTiffWriter:
    """The 3-component PCA of ``sample`` applied to the (closed) embedding: a closed, unpublished writer."""
    import rasterio
    from rasterio.windows import Window as RioWindow

    dim = sample.shape[1]
    mean = sample.mean(0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    comps = np.zeros((3, dim), vt.dtype)  # fewer than 3 samples (a tiny raster): grey channels
    comps[: min(3, len(vt))] = vt[:3]
    proj = (sample - mean) @ comps.T
    lo, hi = np.percentile(proj, 2, axis=0), np.percentile(proj, 98, axis=0)
    span = hi - lo
    scale = np.where(span > 0, 254.0 / np.where(span > 0, span, 1.0), 1.0)  # a flat component: no scaling
    gh, gw = shape
    dst = GeoTiffWriter(path, width=gw, height=gh, count=3, dtype="uint8", nodata=0,
                        descriptions=["pc1", "pc2", "pc3"], tags=tags, **geo.writer_kwargs())
    try:
        with rasterio.open(embedding_tif) as src:
            for r in range(0, gh, PCA_STEP):
                h = min(PCA_STEP, gh - r)
                v = src.read(window=RioWindow(0, r, gw, h)).astype(np.float32).reshape(dim, -1).T
                bad = np.isnan(v[:, 0])
                rgb = np.clip(((np.nan_to_num(v) - mean) @ comps.T - lo) * scale + 1, 1, 255).astype(np.uint8)
                rgb[bad] = 0
                dst.write_rows(r, rgb.T.reshape(3, h, gw))
        dst.close()
    except BaseException:
        dst.abort()
        raise
    return dst


class EmbedTask(Task):
    name = "embed"
    outputs = ("features",)  # (B, D, H/p, W/p) patch tokens
    onnx = True

    def plan(self, card, height: int, width: int, window: int, overlap: float | None) -> tuple[TilePlan, int]:
        p = card.patch_size
        ov = self.default_overlap if overlap is None else overlap
        return plan_tiles(-(-height // p), -(-width // p), window // p, ov), p

    def extra_outputs(self, output: Path, options: InferenceOptions) -> list[Path]:
        return [sibling(output, "_pca.tif")]

    def forward(self, model, x, mask_ratio: float = 0.75):
        return model.forward_patch_tokens(x)

    def make_sink(self, ctx: RunContext) -> EmbedSink:
        return EmbedSink(self, ctx)

    def merge(self, job: MergeJob) -> InferenceResult:
        """The parts' embeddings copied; the PCA preview fitted again, to a sample of the merged
        float16 embedding (a few of its 8-bit colours may differ by one from a single run's)."""
        m = RasterMerge(job, recomputed=("pca",))
        sample = FeatureSample(job.ctx.card.architecture.encoder.embed_dim)
        shape = (job.plan.raster_height, job.plan.raster_width)
        try:
            m.copy(lambda row_off, block: sample.add(block["embedding"]))
            final_pca = m.finals["pca"]
            m.writers["pca"] = write_pca_preview(sample.sample, m.writers["embedding"].tmp, final_pca,
                                                 m.part_tags("pca"), m.geo, shape)
            m.commit()
        except BaseException:
            m.abort()
            raise
        return InferenceResult(task=self.name, outputs={**m.outputs(), "pca": str(final_pca)},
                               statistics={"grid": list(shape), "dim": sample.dim, "stride_px": job.unit})


class EmbedSink(PixelSink):
    def __init__(self, task: EmbedTask, ctx: RunContext):
        super().__init__(task, ctx)
        self.p = self.unit
        self._token_windows = dict(zip(self.windows, self.plan.windows))
        self.dim = ctx.card.architecture.encoder.embed_dim
        self.stitcher = RollingStitcher(self.plan, self.dim, copy_strips=False)
        self.paths = {"embedding": ctx.output, "pca": sibling(ctx.output, "_pca.tif")}
        check_extra_outputs(ctx, task.extra_outputs(ctx.output, ctx.options))
        self.pca_writer = None
        self.shape = (self.plan.raster_height, self.plan.raster_width)
        self.writer = GeoTiffWriter(ctx.output, width=self.shape[1], height=self.shape[0], count=self.dim,
                                    dtype="float32", half_float=True, nodata=float("nan"), cog=ctx.options.cog,
                                    tags={**ctx.tags, "SARMAE_PATCH_SIZE": str(self.p)}, **self.geo.writer_kwargs())
        self.sample = FeatureSample(self.dim)

    def consume(self, windows, feats: np.ndarray, valid: np.ndarray) -> None:
        p = self.p
        for win, f, v in zip(windows, feats, valid):
            tw = self._token_windows[win]
            # a token is valid when most of its pixels are
            tv = v.reshape(v.shape[0] // p, p, v.shape[1] // p, p).mean(axis=(1, 3)) > 0.5
            self.stitcher.add(tw, f, tv)
            for row_off, strip in self.stitcher.pop_ready():  # before the next add: strips are views
                self._write(row_off, strip)

    def _write(self, row_off: int, strip: np.ndarray) -> None:
        self.sample.add(strip)
        self.writer.write_rows(row_off, strip)

    def finish(self) -> InferenceResult:
        for row_off, strip in self.stitcher.flush():
            self._write(row_off, strip)
        if not len(self.sample.sample):
            raise NoValidDataError(f"{self.ctx.raster.paths[0]}: every pixel is nodata; nothing to embed")
        self.writer.close()
        # from the closed temporary file; both are published only when both are complete
        self.pca_writer = write_pca_preview(self.sample.sample, self.writer.tmp, self.paths["pca"], self.ctx.tags,
                                            self.geo, self.shape)
        self.writer.commit()
        self.pca_writer.commit()
        return InferenceResult(task="embed", outputs={k: str(v) for k, v in self.paths.items()},
                               statistics={"grid": list(self.shape), "dim": self.dim, "stride_px": self.p})

    def abort(self) -> None:
        self.writer.abort()
        if self.pca_writer is not None:
            self.pca_writer.abort()
