"""Task heads on the SARMAE ViT: classification, segmentation (UPerNet-style), detection.

Each task model exposes its ViT as ``.encoder`` (classifier and segmenter keep it under the
``encoder.`` prefix) so an encoder package's weights load into any task model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import VisionTransformer, default_dense_indices


def _trunc_normal_linear(layer: nn.Linear, std: float) -> nn.Linear:
    nn.init.trunc_normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


CLS_POOLS = ("mean", "blocks")  # architecture.head.pool of a classify package (absent: mean)
CLS_VIEWS = (1, 8)  # architecture.head.views of a classify package (absent: 1): 8 = the mean over the dihedral views


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0..7) of the dihedral group of a square chip (N, C, S, S): ``rot90(x, k % 4)``, of
    ``x.flip(-1)`` from k = 4 on (k = 0: ``x`` itself). Written with flips and transposes only, which
    ONNX exports (``torch.rot90`` has no ONNX symbol)."""
    t = x.flip(-1) if k >= 4 else x
    r = k % 4
    if r == 1:
        return t.transpose(-2, -1).flip(-2)
    if r == 2:
        return t.flip(-2).flip(-1)
    return t.transpose(-2, -1).flip(-1) if r == 3 else t


class ViTClassifier(nn.Module):
    """Pooled patch tokens -> norm -> Linear. ``pool`` "mean" (the default, SARMAE_SPEC 5, MAE's
    global_pool): the mean of the last block's tokens, LayerNorm; "blocks": the mean and the max of
    the tokens of each of the last ``blocks`` blocks (the last one after the final norm),
    concatenated, (N, 2 x blocks x D), no norm (the quick mode's scaler is folded into the head):
    mid-level and peak responses (a bright scatterer) that a mean of the last block averages away.
    ``views`` 8: the pooled feature is the mean over the chip's 8 flips / 90-degree rotations
    (``dihedral``), so the logits are the mean of the 8 views' logits (the head is linear): the
    quick mode's head is fitted on those 8 views of each training chip, and SAR chips have no
    preferred orientation; it costs 8 encoder passes per chip."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, pool: str = "mean", blocks: int = 4,
                 views: int = 1):
        super().__init__()
        if pool not in CLS_POOLS:
            raise ValueError(f"unknown classifier pooling '{pool}'; known: {', '.join(CLS_POOLS)}")
        if views not in CLS_VIEWS or isinstance(views, bool):
            raise ValueError(f"classifier views must be one of {', '.join(map(str, CLS_VIEWS))} (found {views!r})")
        self.encoder, self.pool, self.views = encoder, pool, int(views)
        self.blocks = max(1, min(int(blocks), len(encoder.blocks)))
        dim = encoder.embed_dim if pool == "mean" else 2 * self.blocks * encoder.embed_dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if pool == "mean" else nn.Identity()
        self.head = _trunc_normal_linear(nn.Linear(dim, num_classes), std=2e-5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, F) pooled, normalised feature (with ``views`` 8, the mean over the views)."""
        if self.views == 1:
            return self.view_features(x)
        n = x.shape[0]
        f = self.view_features(torch.cat([dihedral(x, k) for k in range(self.views)]))
        return f.reshape(self.views, n, -1).mean(0)

    def view_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, F): the pooled feature of the chips as they are (one view)."""
        tokens, _ = self.encoder.embed(x)
        if self.pool == "mean":
            t, _ = self.encoder.run_blocks(self.encoder.prepend_cls(tokens))
            return self.fc_norm(t[:, 1:].mean(dim=1))
        depth = len(self.encoder.blocks)
        idx = tuple(range(depth - self.blocks, depth))
        _, outs = self.encoder.run_blocks(self.encoder.prepend_cls(tokens), collect=idx)
        parts = []
        for i, o in zip(idx, outs):
            o = self.encoder.norm(o[:, 1:]) if i == depth - 1 else o[:, 1:]  # (N, L, D)
            parts += [o.mean(dim=1), o.amax(dim=1)]
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes) logits."""
        return self.head(self.forward_features(x))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of (N, C, H, W) maps (ViTDet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """Stride-16 ViT maps -> strides 4 / 8 / 16 / 32 (ViTDet's simple pyramid).

    Level 0 (stride 4): 2 x ConvTranspose(2, 2) with LN + GELU between; level 1 (8): one
    ConvTranspose; level 2 (16): identity; level 3 (32): max-pool 2. Each then 1x1 + 3x3 convs
    to ``out_channels`` with LayerNorm2d. Inputs: four maps (N, D, h, w), one per level (they may
    be the same tensor, as in ViTDet, or different blocks, as in SARMAE's UPerNet setting).
    """

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        half, quarter = max(dim // 2, 1), max(dim // 4, 1)
        self.scales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(dim, half, 2, stride=2), LayerNorm2d(half), nn.GELU(),
                    nn.ConvTranspose2d(half, quarter, 2, stride=2),
                ),
                nn.ConvTranspose2d(dim, half, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2),
            ]
        )
        in_ch = [quarter, half, dim, dim]
        self.outs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels),
            )
            for c in in_ch
        )

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [out(scale(m)) for m, scale, out in zip(maps, self.scales, self.outs)]


def _conv_gn_relu(cin: int, cout: int, k: int, norm: bool = True) -> nn.Sequential:
    if not norm:  # pooled 1x1 maps: a per-sample norm over one value per group is undefined
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(inplace=True))
    # at least 2 channels per group so the norm is defined even on a 1x1 map
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if cout % g == 0 and (cout // g >= 2 or g == 1))
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True))


class UPerHead(nn.Module):
    """UPerNet-style decoder: pyramid pooling on the coarsest level + top-down FPN + fusion.

    GroupNorm instead of BatchNorm so small CPU batches train stably.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.pool_multiple = math.lcm(*pool_scales)
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(_conv_gn_relu(in_channels, channels, 1, norm=False) for _ in pool_scales)
        self.bottleneck = _conv_gn_relu(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv_gn_relu(in_channels, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(_conv_gn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = _conv_gn_relu(4 * channels, channels, 3)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[3]
        size = top.shape[-2:]
        # Pool from a copy resized to a multiple of every pool scale, so each adaptive pool has
        # equal bins (also what ONNX can export: output sizes must divide the input).
        m = self.pool_multiple
        grid = (m * -(-int(size[0]) // m), m * -(-int(size[1]) // m))
        src = top if tuple(size) == grid else F.interpolate(top, size=grid, mode="bilinear", align_corners=False)
        pooled = [
            F.interpolate(conv(F.avg_pool2d(src, (grid[0] // s, grid[1] // s))), size=size, mode="bilinear", align_corners=False)
            for s, conv in zip(self.pool_scales, self.ppm)
        ]
        lat = [lateral(f) for lateral, f in zip(self.lateral, feats[:3])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(3, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        outs = [self.fpn[i](lat[i]) for i in range(3)] + [lat[3]]
        size0 = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size0, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.cls(self.fuse(torch.cat(outs, 1)))


def default_head_channels(embed_dim: int) -> int:
    """2/3 of the encoder width in multiples of 32, within 64..512: tiny 128, small 256, base 512.

    The head runs at stride 4, so on small encoders a 512-wide head would cost several times the
    encoder itself; SARMAE's ViT-B setting (512) is kept."""
    return int(min(512, max(64, 32 * round(embed_dim * 2 / 3 / 32))))


@dataclass
class SegHeadConfig:
    channels: int | None = None  # pyramid/UPerNet width; None: 2/3 of the encoder width, 64..512 (ViT-B: 512)
    indices: tuple[int, ...] | None = None  # encoder blocks feeding strides 4/8/16/32 (None: by depth)
    aux_weight: float = 0.4  # weight of the auxiliary FCN head's loss during training

    def to_dict(self) -> dict:
        d = asdict(self)
        d["indices"] = list(self.indices) if self.indices is not None else None
        return d


class ViTSegmenter(nn.Module):
    """Encoder blocks -> simple pyramid (4/8/16/32) -> UPerNet head; aux FCN head on stride 16.

    forward: (N, C, H, W) -> (N, K, H, W) logits (+ aux logits while training).
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, cfg: SegHeadConfig | None = None):
        super().__init__()
        cfg = cfg or SegHeadConfig()
        self.cfg = cfg
        self.encoder = encoder
        self.indices = tuple(cfg.indices) if cfg.indices else default_dense_indices(len(encoder.blocks))
        ch = cfg.channels or default_head_channels(encoder.embed_dim)
        self.pyramid = SimpleFeaturePyramid(encoder.embed_dim, ch)
        self.decode_head = UPerHead(ch, ch, num_classes)
        self.aux_head = nn.Sequential(_conv_gn_relu(encoder.embed_dim, ch, 3), nn.Conv2d(ch, num_classes, 1))

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        maps = self.encoder.get_intermediate_layers(x, self.indices)
        logits = F.interpolate(self.decode_head(self.pyramid(maps)), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if return_aux:
            aux = F.interpolate(self.aux_head(maps[2]), size=x.shape[-2:], mode="bilinear", align_corners=False)
            return logits, aux
        return logits


class _ViTDetBackbone(nn.Module):
    """Encoder -> last block map -> simple pyramid -> FPN(256) as torchvision expects."""

    def __init__(self, encoder: VisionTransformer, fpn_channels: int):
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.encoder = encoder
        self.pyramid = SimpleFeaturePyramid(encoder.embed_dim, fpn_channels)
        self.fpn = FeaturePyramidNetwork([fpn_channels] * 4, fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor):
        last = self.encoder.get_intermediate_layers(x, (len(self.encoder.blocks) - 1,))[0]
        feats = self.pyramid([last] * 4)
        return self.fpn({str(i): f for i, f in enumerate(feats)})


@dataclass
class DetHeadConfig:
    """Detection head settings. The defaults are sized for CPU fine-tuning on small SAR chips:
    FPN 128 channels, a 256-wide box MLP and 128 sampled RoIs per image make a training step about
    8x cheaper than torchvision's (256 / 1024 / 512: ``benchmarks/bench_detect.py``), where the box
    MLP and RoIAlign's backward dominate; packages written before these fields existed keep
    torchvision's values (``LEGACY``)."""

    fpn_channels: int = 128  # FPN width (ViTDet / torchvision: 256)
    representation_size: int = 256  # box head MLP width (torchvision: 1024)
    box_batch_size_per_image: int = 128  # RoIs sampled per image for the box losses (torchvision: 512)
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)  # one size per level (SAR targets are small)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    score_thresh: float = 0.05  # boxes below this score are dropped
    nms_thresh: float = 0.5  # per-class NMS inside a window
    detections_per_img: int = 300

    LEGACY: ClassVar[dict] = {"fpn_channels": 256, "representation_size": 1024, "box_batch_size_per_image": 512}

    @classmethod
    def from_dict(cls, head: dict) -> DetHeadConfig:
        """The config a package's ``architecture.head`` describes (missing fields: ``LEGACY``)."""
        d = {**cls.LEGACY, **head}
        for k in ("anchor_sizes", "aspect_ratios"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["anchor_sizes"], d["aspect_ratios"] = list(self.anchor_sizes), list(self.aspect_ratios)
        return d


class ViTDetector(nn.Module):
    """torchvision Faster R-CNN on a ViTDet simple-pyramid backbone (axis-aligned boxes).

    Inputs are already normalised by the engine, so torchvision's transform is told mean 0 /
    std 1 and a fixed size (no resizing). ``num_classes`` excludes background.
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, cfg: DetHeadConfig | None = None):
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        super().__init__()
        cfg = cfg or DetHeadConfig()
        self.cfg = cfg
        backbone = _ViTDetBackbone(encoder, cfg.fpn_channels)
        sizes = tuple((s,) for s in cfg.anchor_sizes)
        anchors = AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * len(sizes))
        size = max(encoder.cfg.grid) * encoder.patch_size
        roi = 7  # torchvision's MultiScaleRoIAlign output size
        self.detector = FasterRCNN(
            backbone, num_classes=None, rpn_anchor_generator=anchors,
            box_head=TwoMLPHead(cfg.fpn_channels * roi * roi, cfg.representation_size),
            box_predictor=FastRCNNPredictor(cfg.representation_size, num_classes + 1),
            box_batch_size_per_image=cfg.box_batch_size_per_image,
            min_size=size, max_size=size, image_mean=[0.0] * encoder.in_chans, image_std=[1.0] * encoder.in_chans,
            box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_thresh, box_detections_per_img=cfg.detections_per_img,
        )

    @property
    def encoder(self) -> VisionTransformer:
        return self.detector.backbone.encoder

    def forward(self, images, targets=None):
        """Training: images list/batch + targets -> loss dict. Eval: -> list of {boxes, labels, scores}
        with labels 1..num_classes (0 is background)."""
        if isinstance(images, torch.Tensor):
            images = list(images)
        return self.detector(images, targets)
