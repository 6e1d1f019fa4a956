"""Embeddings: per-patch encoder features (stride = patch size) -> float16 GeoTIFF + PCA preview.

Windows are planned on the TOKEN grid (ceil(H/p) x ceil(W/p)) and scaled by p, so every window's
tokens fall exactly on output cells; overlapping windows' features are blended by the same rolling
stitcher as logits. A reservoir sample of feature vectors fits a 3-component PCA, applied in a
second pass (strip by strip) over the written features for an RGB preview.
"""

from __future__ import annotations

import numpy as np

from ..inference import InferenceResult
from ..stitching import RollingStitcher
from ..tiling import Window, plan_tiles
from ..writers import GeoTiffWriter
from .base import Georef, check_extra_outputs, sibling

SAMPLE = 20000  # feature vectors kept for the PCA fit


class EmbedSink:
    def __init__(self, ctx):
        self.ctx = ctx
        region, opts = ctx.region, ctx.options
        p = ctx.card.patch_size
        self.p = p
        overlap = 0.25 if opts.overlap is None else opts.overlap
        gh, gw = -(-region.height // p), -(-region.width // p)
        self.token_plan = plan_tiles(gh, gw, ctx.size // p, overlap)
        self.windows = [Window(w.row_off * p, w.col_off * p, w.height * p, w.width * p) for w in self.token_plan.windows]
        self._token_windows = dict(zip(self.windows, self.token_plan.windows))
        self.dim = ctx.card.architecture["encoder"]["embed_dim"]
        self.stitcher = RollingStitcher(self.token_plan, self.dim, copy_strips=False)
        self.geo = Georef(ctx.raster, region, scale=p)
        self.paths = {"embedding": ctx.output, "pca": sibling(ctx.output, "_pca.tif")}
        check_extra_outputs(ctx, [self.paths["pca"]])
        self.pca_writer = None
        self.writer = GeoTiffWriter(ctx.output, width=gw, height=gh, count=self.dim, dtype="float32", half_float=True,
                                    nodata=float("nan"), cog=opts.cog,
                                    tags={**ctx.tags, "SARMAE_PATCH_SIZE": str(p)}, **self.geo.writer_kwargs())
        self.rng = np.random.default_rng(0)
        self.sample = np.zeros((0, self.dim), np.float32)
        self.seen = 0
        self.shape = (gh, gw)

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
        vecs = strip.reshape(self.dim, -1).T
        vecs = vecs[~np.isnan(vecs[:, 0])]
        if len(vecs):  # reservoir-style sample: keep a uniform subset of everything seen
            self.seen += len(vecs)
            take = min(len(vecs), max(1, int(SAMPLE * len(vecs) / self.seen)))
            pick = vecs[self.rng.choice(len(vecs), take, replace=False)]
            self.sample = np.concatenate([self.sample, pick])
            if len(self.sample) > SAMPLE:
                self.sample = self.sample[self.rng.choice(len(self.sample), SAMPLE, replace=False)]
        self.writer.write_rows(row_off, strip)

    def finish(self) -> InferenceResult:
        for row_off, strip in self.stitcher.flush():
            self._write(row_off, strip)
        if not len(self.sample):
            from ..errors import RasterInputError

            raise RasterInputError(f"{self.ctx.raster.paths[0]}: every pixel is nodata; nothing to embed")
        self.writer.close()
        self._pca_preview()  # from the closed temporary file; both are published only when both are complete
        self.pca_writer.close()
        self.writer.commit()
        self.pca_writer.commit()
        return InferenceResult(task="embed", outputs={k: str(v) for k, v in self.paths.items()},
                               statistics={"grid": list(self.shape), "dim": self.dim, "stride_px": self.p})

    def _pca_preview(self) -> None:
        import rasterio

        mean = self.sample.mean(0)
        _, _, vt = np.linalg.svd(self.sample - mean, full_matrices=False)
        comps = np.zeros((3, self.dim), vt.dtype)  # fewer than 3 samples (a tiny raster): grey channels
        comps[: min(3, len(vt))] = vt[:3]
        proj = (self.sample - mean) @ comps.T
        lo, hi = np.percentile(proj, 2, axis=0), np.percentile(proj, 98, axis=0)
        span = hi - lo
        scale = np.where(span > 0, 254.0 / np.where(span > 0, span, 1.0), 1.0)  # a flat component: no scaling
        gh, gw = self.shape
        self.pca_writer = dst = GeoTiffWriter(
            self.paths["pca"], width=gw, height=gh, count=3, dtype="uint8", nodata=0,
            descriptions=["pc1", "pc2", "pc3"], tags=self.ctx.tags, **self.geo.writer_kwargs())
        with rasterio.open(self.writer.tmp) as src:
            step = 512
            for r in range(0, gh, step):
                from rasterio.windows import Window as RioWindow

                h = min(step, gh - r)
                f = src.read(window=RioWindow(0, r, gw, h)).astype(np.float32)  # (D, h, gw)
                v = f.reshape(self.dim, -1).T
                bad = np.isnan(v[:, 0])
                rgb = np.clip(((np.nan_to_num(v) - mean) @ comps.T - lo) * scale + 1, 1, 255).astype(np.uint8)
                rgb[bad] = 0
                dst.write_rows(r, rgb.T.reshape(3, h, gw))

    def abort(self) -> None:
        self.writer.abort()
        if self.pca_writer is not None:
            self.pca_writer.abort()
