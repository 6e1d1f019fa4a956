"""Detection: per-window boxes -> raster pixel coordinates -> NMS across windows -> GeoPackage."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..types import DEFAULT_SCORE_THRESHOLD, InferenceOptions, InferenceResult, RunContext
from ..writers import write_features
from .base import PixelSink, Task
from .merging import MergeJob, part_features


class DetectTask(Task):
    name = "detect"
    outputs = ("boxes",)  # per window: {"boxes" (n, 4) x0 y0 x1 y1 px, "scores" (n,), "labels" (n,), 0 = background}
    needs_classes = True
    vector_output = True
    blended = False  # boxes are not blended: a rank runs exactly its own bands
    # variable-length outputs per window: torch only, no ONNX

    def score_threshold(self, card, options: InferenceOptions) -> float:
        """The score a box needs: the run's ``score_threshold``, else the package's default."""
        return DEFAULT_SCORE_THRESHOLD if options.score_threshold is None else float(options.score_threshold)

    def to_numpy(self, y) -> list[dict]:
        return [{k: v.float().cpu().numpy() for k, v in d.items()} for d in y]

    def make_sink(self, ctx: RunContext) -> DetectSink:
        return DetectSink(self, ctx)

    def part_options(self, options: InferenceOptions) -> InferenceOptions:
        # NMS with IoU 1 removes nothing (an IoU never exceeds 1): rank 0 applies the single run's NMS
        return replace(options, nms_iou=1.0)

    def merge(self, job: MergeJob) -> InferenceResult:
        """Every part's boxes, in window order, through the sink's ``finish`` (the one global NMS)."""
        sink = self.make_sink(job.ctx)
        r0, c0 = job.ctx.region.row_off, job.ctx.region.col_off
        boxes, scores, labels = [], [], []
        for p in part_features(job):  # exact: px_* are the box corners plus integer offsets
            x0, y0 = p["px_col"] - c0, p["px_row"] - r0
            boxes.append((x0, y0, x0 + p["px_width"], y0 + p["px_height"]))
            scores.append(p["score"])
            labels.append(p["class_id"])
        if boxes:
            sink.boxes = [np.asarray(boxes, np.float64)]
            sink.scores = [np.asarray(scores, np.float32)]
            sink.labels = [np.asarray(labels, np.int64)]
        return sink.finish()


class DetectSink(PixelSink):
    def __init__(self, task: DetectTask, ctx: RunContext):
        super().__init__(task, ctx)
        self.classes = ctx.card.classes
        self.boxes: list[np.ndarray] = []  # (n, 4) x0, y0, x1, y1 in region pixels
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.windows_seen, self.windows_with_data = 0, 0  # an all-nodata raster gets a warning, not silence

    def consume(self, windows, outputs: list[dict], valid: np.ndarray) -> None:
        thr = self.task.score_threshold(self.ctx.card, self.ctx.options)
        self.windows_seen += len(windows)
        self.windows_with_data += int(valid.reshape(len(valid), -1).any(axis=1).sum())
        for win, det, v in zip(windows, outputs, valid):
            keep = det["scores"] >= thr
            b = det["boxes"][keep].astype(np.float64)
            if len(b):
                # drop boxes whose centre falls on padding or nodata (not real image content)
                cx = np.clip(((b[:, 0] + b[:, 2]) / 2).astype(int), 0, v.shape[1] - 1)
                cy = np.clip(((b[:, 1] + b[:, 3]) / 2).astype(int), 0, v.shape[0] - 1)
                on_data = v[cy, cx]
                b = b[on_data]
                b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, win.width) + win.col_off
                b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, win.height) + win.row_off
                self.boxes.append(b)
                self.scores.append(det["scores"][keep][on_data])
                self.labels.append(det["labels"][keep][on_data].astype(np.int64) - 1)  # 0 = background

    def _nms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.boxes:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        boxes, scores, labels = np.concatenate(self.boxes), np.concatenate(self.scores), np.concatenate(self.labels)
        if self.ctx.options.nms_iou >= 1:  # IoU never exceeds 1: NMS would remove nothing; keep window order
            return boxes, scores, labels
        import torch
        from torchvision.ops import batched_nms

        keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores.astype(np.float32)).double(),
                           torch.from_numpy(labels), self.ctx.options.nms_iou).numpy()
        return boxes[keep], scores[keep], labels[keep]

    def finish(self) -> InferenceResult:
        from shapely.geometry import box as shp_box

        boxes, scores, labels = self._nms()
        x0, y0 = self.geo.to_map(boxes[:, 0], boxes[:, 1])
        x1, y1 = self.geo.to_map(boxes[:, 2], boxes[:, 3])
        r0, c0 = self.ctx.region.row_off, self.ctx.region.col_off
        features, per_class = [], {c["name"]: 0 for c in self.classes}
        for i in range(len(boxes)):
            name = self.classes[int(labels[i])]["name"]
            per_class[name] += 1
            geom = shp_box(min(x0[i], x1[i]), min(y0[i], y1[i]), max(x0[i], x1[i]), max(y0[i], y1[i]))
            features.append({"geometry": geom, "properties": {
                "class_id": int(labels[i]), "class_name": name, "score": float(scores[i]),
                "px_col": float(boxes[i, 0] + c0), "px_row": float(boxes[i, 1] + r0),
                "px_width": float(boxes[i, 2] - boxes[i, 0]), "px_height": float(boxes[i, 3] - boxes[i, 1])}})
        schema = {"geometry": "Polygon", "properties": {"class_id": "int", "class_name": "str", "score": "float",
                                                          "px_col": "float", "px_row": "float", "px_width": "float",
                                                          "px_height": "float"}}
        write_features(self.ctx.output, features, schema, self.geo.crs, layer="detections")
        stats = {"detections": len(features), "per_class": per_class,
                 "georeferencing": "affine fitted to GCPs" if self.geo.approximate else
                 "none (pixel coordinates)" if self.geo.pixel_space else "transform", "warnings": []}
        if self.windows_seen and not self.windows_with_data:
            warning = (f"warning: every pixel of {self.ctx.raster.paths[0]} is nodata (declared nodata, NaN or inf): "
                       "nothing could be detected; the layer is empty. Check the input, its nodata value or --bands")
            stats["warnings"].append(warning)
            self.ctx.say(warning)
        return InferenceResult(task="detect", outputs={"detections": str(self.ctx.output)}, classes=self.classes,
                               statistics=stats)

    def abort(self) -> None:
        pass  # nothing is written before finish()
