"""Text query with a CLIP package: a similarity raster of a scene to one or more phrases
(``--query "ships at sea" --query "flooded fields"``), one float32 band per phrase on the cell grid
of ``engine.clip.scene``: the cosine of each cell's image embedding with the phrase's text embedding
(NaN where a cell has no data). The image embeddings are cached per raster, model, bands and grid, so
a new phrase costs only the text tower. A zeroshot package runs this task when given ``--query``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SarmaeError
from ..types import InferenceOptions, InferenceResult
from .zeroshot import ZeroshotTask


class TextqueryTask(ZeroshotTask):
    name = "textquery"

    def extra_outputs(self, output: Path, options: InferenceOptions) -> list[Path]:
        return []

    def check_options(self, options: InferenceOptions) -> None:
        if options.classes:
            raise SarmaeError("--query and --classes: give one of them (class names make a class map)")
        if not options.query:
            raise SarmaeError("a text query needs --query \"a phrase\" (repeat it for several phrases)")
        if not all(str(q).strip() for q in options.query):
            raise SarmaeError(f"--query: an empty phrase has no meaning to the text tower (given {options.query!r}); "
                              "type some words")
        if options.templates is not None:
            raise SarmaeError("--templates applies to --classes; a --query phrase is used as typed")

    def write(self, scene, package, options, output: Path, extra: list[Path], geo, tags: dict,
              raster) -> InferenceResult:
        from ..clip import load_clip
        from ..writers import GeoTiffWriter

        clip = load_clip(package)
        phrases = [str(q).strip() for q in options.query]
        t = clip.encode_text(phrases).cpu().numpy()  # (Q, D)
        sim = np.einsum("rcd,qd->qrc", scene.emb, t).astype(np.float32)  # NaN cells stay NaN
        rows, cols = sim.shape[1:]
        tags = {**tags, "SARMAE_QUERY": " | ".join(phrases)[:500], "SARMAE_CELL_PX": str(scene.stride)}
        with GeoTiffWriter(output, width=cols, height=rows, count=len(phrases), dtype="float32",
                           nodata=float("nan"), descriptions=[f"cosine similarity: {p}"[:200] for p in phrases],
                           tags=tags, cog=options.cog, **geo.writer_kwargs()) as dst:
            dst.write_rows(0, sim)
        stats = {"cells": int(scene.has_data.sum()), "cell_px": scene.stride, "per_query": {}}
        for p, s in zip(phrases, sim, strict=True):
            i, j = np.unravel_index(np.nanargmax(s), s.shape)
            x, y = geo.to_map(np.array([j + 0.5]), np.array([i + 0.5]))
            stats["per_query"][p] = {"max": float(s[i, j]), "mean": float(np.nanmean(s)),
                                     "best_cell": [int(i), int(j)], "best_xy": [float(x[0]), float(y[0])]}
        return InferenceResult(task=self.name, outputs={"similarity": str(output)}, statistics=stats)
