"""A small CNN chip classifier (``small_cnn``): the classification baseline every evaluation prints
(``training.baselines``) and, when it wins on validation, the classify package an analyst installs
(``sarmae finetune --task classify --arch cnn``).

A stride-2 5x5 stem (32), then conv blocks 64-128-128-256 (3x3, BatchNorm, ReLU; max-pool after
each width), global average pooling, dropout, linear: about 0.55 M parameters with one band; the
stem keeps a 128 px chip cheap on a CPU. Any input size works (global pooling); the total stride is
16 px.

Its package is an ordinary ``classify`` package: ``architecture`` = ``{"name": "small_cnn",
"encoder": {...}, "head": {"kind": "small_cnn"}}``, where ``encoder`` SUMMARISES the network in
the fields every task and the plugin read (as the CLIP card does for a ResNet image tower):
``in_chans``, ``img_size`` (the chip size it was trained on: the engine's window), ``patch_size``
16 (the total stride; windows are multiples of it), ``embed_dim`` 256 (the pooled width),
``depth`` 5 (convolutions), ``num_heads`` 1. Nothing in it builds a ViT.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "small_cnn"
STRIDE = 16  # total stride: the stem (2) and three max-pools
WIDTH = 256  # channels after the last block (the pooled embedding)
CONVS = 5  # convolutions (the card's "depth")


class SmallCNN(nn.Module):
    """See the module docstring; ``forward`` (N, C, H, W) normalised input -> (N, K) logits."""

    def __init__(self, in_chans: int, num_classes: int):
        super().__init__()
        layers = [nn.Conv2d(in_chans, 32, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)]
        c = 32
        for w, convs in ((64, 1), (128, 2), (WIDTH, 1)):
            for _ in range(convs):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def small_cnn_architecture(in_chans: int, img_size: int) -> dict:
    """model.json's ``architecture`` of a ``SmallCNN`` trained on ``img_size`` px chips (module docstring)."""
    if img_size % STRIDE:
        raise ValueError(f"the small CNN's chip size must be a multiple of {STRIDE} px (got {img_size})")
    return {"name": NAME, "encoder": {"in_chans": int(in_chans), "img_size": [int(img_size), int(img_size)],
                                      "patch_size": STRIDE, "embed_dim": WIDTH, "depth": CONVS, "num_heads": 1},
            "head": {"kind": NAME}}
