"""MAE reconstruction: the pretrained model's view of the input, back in the model's units."""

from __future__ import annotations

import numpy as np

from ..errors import NoValidDataError
from ..stitching import RollingStitcher
from ..types import InferenceResult, RunContext
from ..writers import GeoTiffWriter
from .base import PixelSink, Task
from .merging import MergeJob, RasterMerge


class ReconstructTask(Task):
    name = "reconstruct"
    outputs = ("image",)
    # random masks (a torch generator): torch only, no ONNX

    def init_architecture(self, architecture: dict, decoder: dict) -> dict:
        return {**architecture, "name": "mae_" + architecture["name"], "decoder": decoder}

    def forward(self, model, x, mask_ratio: float = 0.75):
        import torch

        # one mask pattern for every window: deterministic and independent of the batch size
        g = torch.Generator(device=x.device).manual_seed(0)
        n_tok = (x.shape[-2] // model.patch_size) * (x.shape[-1] // model.patch_size)
        noise = torch.rand(1, n_tok, generator=g, device=x.device).expand(x.shape[0], -1)
        return model.reconstruct(x, mask_ratio, noise=noise)

    def make_sink(self, ctx: RunContext) -> ReconstructSink:
        return ReconstructSink(self, ctx)

    def merge(self, job: MergeJob) -> InferenceResult:
        m = RasterMerge(job)
        try:
            m.copy()
            m.commit()
        except BaseException:
            m.abort()
            raise
        return InferenceResult(task=self.name, outputs=m.outputs(), statistics={"units": job.ctx.card.input.units})


class ReconstructSink(PixelSink):
    def __init__(self, task: ReconstructTask, ctx: RunContext):
        super().__init__(task, ctx)
        region, opts = ctx.region, ctx.options
        c = ctx.card.in_chans
        self.stitcher = RollingStitcher(self.plan, c, copy_strips=False)
        inp = ctx.card.input
        self.lo, self.hi = inp.clip
        self.mean = np.asarray(inp.mean, np.float32).reshape(c, 1, 1)
        self.std = np.asarray(inp.std, np.float32).reshape(c, 1, 1)
        self.writer = GeoTiffWriter(ctx.output, width=region.width, height=region.height, count=c, dtype="float32",
                                    nodata=float("nan"), descriptions=list(inp.bands), cog=opts.cog,
                                    tags={**ctx.tags, "SARMAE_UNITS": inp.units}, **self.geo.writer_kwargs())
        self.valid_px = 0

    def consume(self, windows, recon: np.ndarray, valid: np.ndarray) -> None:
        for b, win in enumerate(windows):
            self.stitcher.add(win, recon[b], valid[b])
            for row_off, strip in self.stitcher.pop_ready():  # before the next add: strips are views
                self._write(row_off, strip)

    def _write(self, row_off: int, strip: np.ndarray) -> None:
        x01 = strip * self.std + self.mean  # undo mean/std -> [0, 1]
        out = self.lo + np.clip(x01, 0, 1) * (self.hi - self.lo)  # back to the model's units
        self.valid_px += int((~np.isnan(strip[0])).sum())
        self.writer.write_rows(row_off, out.astype(np.float32))

    def finish(self) -> InferenceResult:
        for row_off, strip in self.stitcher.flush():
            self._write(row_off, strip)
        if self.valid_px == 0:
            raise NoValidDataError(f"{self.ctx.raster.paths[0]}: every pixel is nodata; nothing to reconstruct")
        self.writer.commit()
        return InferenceResult(task="reconstruct", outputs={"reconstruction": str(self.ctx.output)},
                               statistics={"units": self.ctx.card.input.units})

    def abort(self) -> None:
        self.writer.abort()
