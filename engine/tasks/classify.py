"""Patch classification: one label per window -> a grid of window polygons in a GeoPackage."""

from __future__ import annotations

import numpy as np

from ..inference import InferenceResult
from ..writers import write_features
from .base import PixelSink, softmax


class ClassifySink(PixelSink):
    default_overlap = 0.0  # a grid by default

    def __init__(self, ctx):
        super().__init__(ctx)
        self.classes = ctx.card.classes
        self.rows: list[tuple] = []

    def consume(self, windows, logits: np.ndarray, valid: np.ndarray) -> None:
        probs = softmax(logits, axis=1)
        for win, p, v in zip(windows, probs, valid):
            frac = float(v[: win.height, : win.width].mean())
            if frac == 0.0:
                continue  # all nodata: no label
            k = int(p.argmax())
            self.rows.append((win, k, float(p[k]), frac, p))

    def finish(self) -> InferenceResult:
        from shapely.geometry import box as shp_box

        if not self.rows:
            from ..errors import RasterInputError

            raise RasterInputError(f"{self.ctx.raster.paths[0]}: every window is nodata; nothing to classify")
        names = [c["name"] for c in self.classes]
        features, counts = [], dict.fromkeys(names, 0)
        for win, k, score, frac, p in self.rows:
            xs, ys = self.geo.to_map(np.array([win.col_off, win.col_off + win.width], float),
                                     np.array([win.row_off, win.row_off + win.height], float))
            counts[names[k]] += 1
            props = {"class_id": k, "class_name": names[k], "score": score, "valid_fraction": frac,
                     "row_off": win.row_off + self.ctx.region.row_off, "col_off": win.col_off + self.ctx.region.col_off}
            props.update({f"p_{n}": float(p[i]) for i, n in enumerate(names)})
            features.append({"geometry": shp_box(xs.min(), ys.min(), xs.max(), ys.max()), "properties": props})
        schema = {"geometry": "Polygon", "properties": {"class_id": "int", "class_name": "str", "score": "float",
                                                          "valid_fraction": "float", "row_off": "int", "col_off": "int",
                                                          **{f"p_{n}": "float" for n in names}}}
        write_features(self.ctx.output, features, schema, self.geo.crs, layer="classes")
        return InferenceResult(task="classify", outputs={"grid": str(self.ctx.output)}, classes=self.classes,
                               statistics={"windows": len(features), "per_class": counts})

    def abort(self) -> None:
        pass
