"""Patch classification: one label per window -> a grid of window polygons in a GeoPackage."""

from __future__ import annotations

import numpy as np

from ..errors import NoValidDataError
from ..types import InferenceResult, RunContext
from ..writers import write_features
from .base import PixelSink, Task, as_logits, softmax
from .merging import MergeJob, part_features


class ClassifyTask(Task):
    name = "classify"
    outputs = ("logits", "probabilities")
    needs_classes = True
    vector_output = True
    blended = False  # each window is one grid cell: a rank runs exactly its own bands
    onnx = True
    default_overlap = 0.0  # a grid by default
    agreement_metric = "top-1 agreement"

    def summary(self, card) -> list[str]:
        """How the network pools and how many views of each window it averages (``sarmae info``)."""
        head = card.architecture.head or {}
        if card.architecture.encoder is None or card.architecture.name == "small_cnn":
            return []
        pool = head.get("pool", "mean")
        views = head.get("views", 1)
        pooled = "mean of the last block" if pool == "mean" else f"mean and max of the last {head.get('blocks', 4)} blocks"
        each = "the mean over 8 flips / rotations of each window (8 passes)" if views == 8 else "one view"
        return [f"head:          {pooled}, {each}"]

    def agreement(self, reference: np.ndarray, test: np.ndarray, valid: np.ndarray) -> float:
        """The fraction of windows (with any data) whose top class (argmax of (B, K)) is the same."""
        keep = valid.reshape(len(valid), -1).any(1)
        same = reference.argmax(1) == test.argmax(1)
        return float(same[keep].mean()) if keep.any() else 1.0

    def make_sink(self, ctx: RunContext) -> ClassifySink:
        return ClassifySink(self, ctx)

    def merge(self, job: MergeJob) -> InferenceResult:
        """The parts' grid cells, in window order, through the sink's ``finish``."""
        sink = self.make_sink(job.ctx)
        r0, c0 = job.ctx.region.row_off, job.ctx.region.col_off
        names = job.ctx.card.class_names
        windows = {(w.row_off, w.col_off): w for w in job.plan.windows}
        for p in part_features(job):
            probs = np.array([p[f"p_{n}"] for n in names], np.float32)
            sink.rows.append((windows[(p["row_off"] - r0, p["col_off"] - c0)], int(p["class_id"]), float(p["score"]),
                              float(p["valid_fraction"]), probs))
        return sink.finish()


class ClassifySink(PixelSink):
    def __init__(self, task: ClassifyTask, ctx: RunContext):
        super().__init__(task, ctx)
        self.classes = ctx.card.classes
        self.rows: list[tuple] = []

    def consume(self, windows, logits: np.ndarray, valid: np.ndarray) -> None:
        probs = softmax(as_logits(logits, self.ctx.card.output), axis=1)
        for win, p, v in zip(windows, probs, valid):
            frac = float(v[: win.height, : win.width].mean())
            if frac == 0.0:
                continue  # all nodata: no label
            k = int(p.argmax())
            self.rows.append((win, k, float(p[k]), frac, p))

    def finish(self) -> InferenceResult:
        from shapely.geometry import box as shp_box

        if not self.rows:
            raise NoValidDataError(f"{self.ctx.raster.paths[0]}: every window is nodata; nothing to classify")
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
        pass  # nothing is written before finish()
