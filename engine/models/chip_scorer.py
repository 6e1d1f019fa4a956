"""A small CNN that scores CFAR proposals: is the chip around a proposal a target, and where is its box.

Input: ``chips`` (N, 1, S, S), the square around each proposal resampled to S x S pixels in
normalised log intensity (``engine.cfar.chips``: dB minus the chip's median, / 10), and ``geometry``
(N, 3): log2 of the proposal's width, height (px) and of the chip's side (px), so that the network
knows the scale the resampling removed. Output (N, 1): the target logit; the box is the proposal's
(a learned box correction was tried and dropped: with a few dozen training ships it moved thin
boxes by a pixel or two and lost IoU >= 0.5 on HRSID and the demo scene). Sigmoid, thresholds and
NMS are applied outside the network (numpy), so it exports to ONNX as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class ChipScorerConfig:
    """The chip scorer's size (stored in the package's ``architecture.head``)."""

    chip: int = 32  # S: chips are resampled to S x S pixels
    width: int = 16  # channels of the first convolution (doubled at each of the 3 stride-2 stages)
    geometry: int = 3  # geometry features: log2 width, log2 height, log2 chip side

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
    a two-layer MLP to the logit."""

    def __init__(self, cfg: ChipScorerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ChipScorerConfig()
        w = cfg.width
        self.features = nn.Sequential(_stage(1, w), _stage(w, 2 * w), _stage(2 * w, 4 * w))
        self.mlp = nn.Sequential(nn.Linear(8 * w + cfg.geometry, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))

    def forward(self, chips: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        f = self.features(chips)  # (N, 4w, S/8, S/8)
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3)), geometry], 1)  # (N, 8w + G)
        return self.mlp(pooled)  # (N, 1): the logit


def export_chip_scorer(model: ChipScorer, opset: int = 17) -> bytes:
    """The scorer as ONNX bytes (inputs 'chips', 'geometry'; output 'scores'), batch size dynamic."""
    import io

    model = model.eval()
    s, g = model.cfg.chip, model.cfg.geometry
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(2, 1, s, s), torch.zeros(2, g)), buf, input_names=["chips", "geometry"],
                          output_names=["scores"], opset_version=opset, dynamo=False,
                          dynamic_axes={"chips": {0: "n"}, "geometry": {0: "n"}, "scores": {0: "n"}})
    return buf.getvalue()
