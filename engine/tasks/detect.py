"""Detection: per-window boxes -> raster pixel coordinates -> NMS across windows -> GeoPackage."""

from __future__ import annotations

import numpy as np

from ..inference import InferenceResult
from ..writers import write_features
from .base import PixelSink


class DetectSink(PixelSink):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.classes = ctx.card.classes
        self.boxes: list[np.ndarray] = []  # (n, 4) x0, y0, x1, y1 in region pixels
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def consume(self, windows, outputs: list[dict], valid: np.ndarray) -> None:
        thr = self.ctx.options.score_threshold
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

    def finish(self) -> InferenceResult:
        import torch
        from shapely.geometry import box as shp_box
        from torchvision.ops import batched_nms

        if self.boxes:
            boxes = np.concatenate(self.boxes)
            scores = np.concatenate(self.scores)
            labels = np.concatenate(self.labels)
            if self.ctx.options.nms_iou >= 1:  # IoU never exceeds 1: NMS would remove nothing; keep window order
                keep = np.arange(len(boxes))
            else:
                keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores.astype(np.float32)).double(),
                                   torch.from_numpy(labels), self.ctx.options.nms_iou).numpy()
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        else:
            boxes, scores, labels = np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
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
                 "georeferencing": "affine fitted to GCPs" if self.geo.approximate else "transform"}
        return InferenceResult(task="detect", outputs={"detections": str(self.ctx.output)}, classes=self.classes,
                               statistics=stats)

    def abort(self) -> None:
        pass  # nothing is written before finish()
