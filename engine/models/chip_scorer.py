"""A small CNN that scores CFAR proposals: is the chip around a proposal a target, and where is its box.

Input: ``chips`` (N, 1, S, S), the square around each proposal resampled to S x S pixels in
normalised log intensity (``engine.cfar.chips``: dB minus the chip's median, / 10), with
``box_channel`` (format 2) a second channel: the share of each sample's cell inside the proposal's
box (``chips.box_masks``), so that the network sees how the box fits the target (a piece of a ship
and the whole ship have nearly the same chip), and ``geometry``
(N, 3): log2 of the proposal's width, height (px) and of the chip's side (px), so that the network
knows the scale the resampling removed. Output ``scores`` (N, 1): the target logit; with
``regress`` (package format 2) also ``deltas`` (N, 4): the box correction (``box_deltas``: centre
offset in chip sides, log width / height ratio to the proposal) regressed from the last feature map
kept whole (a pooled vector forgets where the target lies: the format-1 attempt regressed from it and
was dropped). Sigmoid, box decoding, thresholds and NMS are applied outside the network (numpy), so
it exports to ONNX as is. Packages without ``regress`` (format 1) keep the proposal's box.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

MAX_LOG_SCALE = 2.5  # |log width / height ratio| decoded at most (x 12)
MAX_SHIFT = 0.5  # |centre offset| decoded at most, in chip sides


@dataclass
class ChipScorerConfig:
    """The chip scorer's size (stored in the package's ``architecture.head``)."""

    chip: int = 32  # S: chips are resampled to S x S pixels
    width: int = 16  # channels of the first convolution (doubled at each of the 3 stride-2 stages)
    geometry: int = 3  # geometry features: log2 width, log2 height, log2 chip side
    regress: bool = False  # a box branch (output 'deltas'); False in format-1 packages
    box_channel: bool = False  # a second input channel: the proposal's box drawn in the chip (format 2)

    @property
    def channels(self) -> int:
        return 2 if self.box_channel else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> ChipScorerConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ChipScorer(nn.Module):
    """Three stride-2 conv stages (S -> S/8), global average and max pooling, geometry appended,
    a two-layer MLP to the logit; with ``regress`` a second MLP from the whole S/8 x S/8 map (and the
    geometry) to the 4 box deltas."""

    def __init__(self, cfg: ChipScorerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ChipScorerConfig()
        w = cfg.width
        self.features = nn.Sequential(_stage(cfg.channels, w), _stage(w, 2 * w), _stage(2 * w, 4 * w))
        self.mlp = nn.Sequential(nn.Linear(8 * w + cfg.geometry, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))
        if cfg.regress:
            cells = (-(-cfg.chip // 8)) ** 2
            self.box = nn.Sequential(nn.Linear(4 * w * cells + cfg.geometry, 128), nn.ReLU(inplace=True),
                                     nn.Linear(128, 4))
            nn.init.zeros_(self.box[-1].weight)  # starts at the proposal's box
            nn.init.zeros_(self.box[-1].bias)

    def forward(self, chips: torch.Tensor, geometry: torch.Tensor):
        f = self.features(chips)  # (N, 4w, S/8, S/8)
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3)), geometry], 1)  # (N, 8w + G)
        logit = self.mlp(pooled)  # (N, 1)
        if not self.cfg.regress:
            return logit
        return logit, self.box(torch.cat([f.flatten(1), geometry], 1))  # (N, 1), (N, 4)


def box_deltas(boxes: np.ndarray, target: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """(n, 4) deltas from ``boxes`` to ``target`` (both x0, y0, x1, y1): centre offset / chip side,
    log of the width and height ratios (sides at least 1 px)."""
    b, t = np.asarray(boxes, np.float64), np.asarray(target, np.float64)
    bw, bh = np.maximum(b[:, 2] - b[:, 0], 1.0), np.maximum(b[:, 3] - b[:, 1], 1.0)
    tw, th = np.maximum(t[:, 2] - t[:, 0], 1.0), np.maximum(t[:, 3] - t[:, 1], 1.0)
    s = np.asarray(sides, np.float64)
    return np.stack([((t[:, 0] + t[:, 2]) - (b[:, 0] + b[:, 2])) / 2 / s,
                     ((t[:, 1] + t[:, 3]) - (b[:, 1] + b[:, 3])) / 2 / s,
                     np.log(tw / bw), np.log(th / bh)], 1).astype(np.float32)


def apply_deltas(boxes: np.ndarray, deltas: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """The boxes moved by ``deltas`` (``box_deltas``' inverse; clamped to MAX_SHIFT / MAX_LOG_SCALE)."""
    b, d = np.asarray(boxes, np.float64), np.asarray(deltas, np.float64)
    s = np.asarray(sides, np.float64)
    cx = (b[:, 0] + b[:, 2]) / 2 + np.clip(d[:, 0], -MAX_SHIFT, MAX_SHIFT) * s
    cy = (b[:, 1] + b[:, 3]) / 2 + np.clip(d[:, 1], -MAX_SHIFT, MAX_SHIFT) * s
    w = np.maximum(b[:, 2] - b[:, 0], 1.0) * np.exp(np.clip(d[:, 2], -MAX_LOG_SCALE, MAX_LOG_SCALE))
    h = np.maximum(b[:, 3] - b[:, 1], 1.0) * np.exp(np.clip(d[:, 3], -MAX_LOG_SCALE, MAX_LOG_SCALE))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def export_chip_scorer(model: ChipScorer, opset: int = 17) -> bytes:
    """The scorer as ONNX bytes (inputs 'chips', 'geometry'; outputs 'scores' and, with a box
    branch, 'deltas'), batch size dynamic."""
    import io

    model = model.eval()
    s, g = model.cfg.chip, model.cfg.geometry
    outs = ["scores", "deltas"] if model.cfg.regress else ["scores"]
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(2, model.cfg.channels, s, s), torch.zeros(2, g)), buf,
                          input_names=["chips", "geometry"],
                          output_names=outs, opset_version=opset, dynamo=False,
                          dynamic_axes={"chips": {0: "n"}, "geometry": {0: "n"}, **{o: {0: "n"} for o in outs}})
    return buf.getvalue()
