"""A light segmentation head for CPUs: patch tokens + per-pixel SAR features, mixed per pixel.

``LightSegmenter`` (head kind ``"light"``): the outputs of a few encoder blocks (stride p) are
normalised, projected to ``hidden`` channels and upsampled bilinearly to the input size; the input
itself gives per-pixel features (the bands, their local mean and standard deviation over
``scales`` px boxes, and the band differences: a ratio when the contract is dB); both are summed,
passed through GELU and a 1x1 classifier, on cells of ``stride`` px (default 2: a quarter of the
per-pixel work), the logits upsampled bilinearly to the input size. Everything after the encoder is per pixel, so the head
costs little beside the encoder (windows/s against the UPerNet head: ``benchmarks/bench_seg_heads.py``),
exports to ONNX, and can be fitted on FROZEN encoder features in
seconds (``split``: ``features`` runs the encoder once per chip, ``decode`` is all that trains).

forward: (N, C, H, W) -> (N, K, H, W) logits (``return_aux=True`` adds ``None``: no aux head).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import LayerNorm2d
from .vit import VisionTransformer

DEFAULT_SCALES = (3, 7, 15)


def pixel_feature_count(in_chans: int, scales: tuple[int, ...] = DEFAULT_SCALES) -> int:
    """Channels of ``pixel_features``: C bands + 2 C per scale + C (C - 1) / 2 differences."""
    return in_chans * (1 + 2 * len(scales)) + in_chans * (in_chans - 1) // 2


def pixel_features(x: torch.Tensor, scales: tuple[int, ...] = DEFAULT_SCALES) -> torch.Tensor:
    """(N, C, H, W) model input -> (N, F, H, W) per-pixel features (``pixel_feature_count``).

    The bands; per ``scales`` box (odd side s, borders averaged over the pixels inside) the local
    mean and standard deviation (texture: speckle is strong on rough land, weak on calm water); the
    pairwise band differences (in a dB contract: the VV/VH ratio). The random forest baseline and
    the light head use these same features."""
    feats = [x]
    both = torch.cat([x, x * x], 1)
    for s in scales:
        mean, sq = box_mean(both, s).chunk(2, 1)
        feats += [mean, (sq - mean * mean).clamp(min=0.0).add(1e-6).sqrt()]
    c = x.shape[1]
    feats += [x[:, i:i + 1] - x[:, j:j + 1] for i in range(c) for j in range(i + 1, c)]
    return torch.cat(feats, 1)


def _box_sum_1d(z: torch.Tensor, s: int, dim: int) -> torch.Tensor:
    """Sums over windows of ``s`` (odd) centred on each position along ``dim``, zero-padded:
    a running sum, so the cost does not grow with ``s``."""
    r = s // 2
    pad = [0, 0] * (z.ndim - 1 - dim % z.ndim) + [r + 1, r]
    c = F.pad(z, pad).cumsum(dim)
    n = z.shape[dim]
    return c.narrow(dim, s, n) - c.narrow(dim, 0, n)


def box_mean(z: torch.Tensor, s: int) -> torch.Tensor:
    """(N, C, H, W) -> the mean over the s x s box centred on each pixel, over the pixels inside the
    image (as ``avg_pool2d(..., count_include_pad=False)``), with running sums (separable)."""
    total = _box_sum_1d(_box_sum_1d(z, s, -1), s, -2)
    h, w = z.shape[-2:]
    ones = torch.ones(1, 1, h, w, dtype=z.dtype, device=z.device)
    count = _box_sum_1d(_box_sum_1d(ones, s, -1), s, -2)
    return total / count


def default_light_indices(depth: int) -> tuple[int, ...]:
    """Blocks feeding the head: the middle one and the last one ((5, 11) for depth 12)."""
    return (max(0, depth // 2 - 1), depth - 1) if depth > 1 else (0,)


@dataclass
class LightSegHeadConfig:
    kind: str = "light"  # model.json architecture.head.kind (UPerNet packages: "upernet" or absent)
    hidden: int = 64  # width of the per-pixel mixing layer (0: linear, as the quick mode fits it)
    stride: int = 2  # the mixing runs on stride x stride cells; logits upsampled to the input (1: every pixel)
    indices: tuple[int, ...] | None = None  # encoder blocks used (None: middle and last)
    scales: tuple[int, ...] = DEFAULT_SCALES  # box sides of the local mean / std features (px, odd)
    aux_weight: float = 0.0  # no auxiliary head (the training loss reads this field)

    @classmethod
    def from_dict(cls, d: dict) -> LightSegHeadConfig:
        d = dict(d)
        for k in ("indices", "scales"):
            if d.get(k) is not None:
                d[k] = tuple(int(v) for v in d[k])
        bad = [s for s in d.get("scales", ()) if s < 1 or s % 2 == 0]
        if bad:
            raise ValueError(f"light head scales must be odd positive box sides, got {bad}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["indices"] = list(self.indices) if self.indices is not None else None
        d["scales"] = list(self.scales)
        return d


class LightSegmenter(nn.Module):
    """Encoder block maps (stride p) + per-pixel features -> per-pixel logits (see the module doc)."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, cfg: LightSegHeadConfig | None = None):
        super().__init__()
        cfg = cfg or LightSegHeadConfig()
        self.cfg = cfg
        self.encoder = encoder
        self.indices = tuple(cfg.indices) if cfg.indices else default_light_indices(len(encoder.blocks))
        d, n_pix = encoder.embed_dim, pixel_feature_count(encoder.in_chans, cfg.scales)
        self.token_norm = nn.ModuleList(LayerNorm2d(d, eps=1e-6) for _ in self.indices)
        width = cfg.hidden or num_classes  # hidden 0: a linear head, the projections give the logits
        self.token_proj = nn.Conv2d(d * len(self.indices), width, 1)
        # per-channel standardisation of the pixel features (fitted on the training chips; identity at init)
        self.register_buffer("pixel_mean", torch.zeros(1, n_pix, 1, 1))
        self.register_buffer("pixel_std", torch.ones(1, n_pix, 1, 1))
        self.pixel_proj = nn.Conv2d(n_pix, width, 1)
        self.cls = nn.Conv2d(cfg.hidden, num_classes, 1) if cfg.hidden else nn.Identity()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's part: (N, C, H, W) -> block maps, each (N, D, H/p, W/p)."""
        return self.encoder.get_intermediate_layers(x, self.indices)

    def decode(self, maps: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Block maps + the input -> (N, K, H, W) logits (all that trains in the quick, frozen mode).

        The mixing runs at ``cfg.stride`` (pixel features averaged over stride x stride cells), and
        the logits are upsampled bilinearly to the input size."""
        t, f = self.cell_features(maps, x)
        h = F.interpolate(self.token_proj(t), size=f.shape[-2:], mode="bilinear", align_corners=False)
        z = h + self.pixel_proj(f)
        logits = self.cls(F.gelu(z)) if self.cfg.hidden else z
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def cell_features(self, maps: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's inputs: normalised block maps (N, D x blocks, H/p, W/p) and standardised pixel
        features on stride x stride cells (N, F, H/stride, W/stride)."""
        t = torch.cat([norm(m.float()) for norm, m in zip(self.token_norm, maps)], 1)
        f = (pixel_features(x, self.cfg.scales) - self.pixel_mean) / self.pixel_std
        if self.cfg.stride > 1:
            f = F.avg_pool2d(f, self.cfg.stride, ceil_mode=True)
        return t, f

    def fit_pixel_standardisation(self, x: torch.Tensor) -> None:
        """Set the pixel features' mean / std from sample chips (N, C, H, W)."""
        with torch.no_grad():
            f = pixel_features(x.float(), self.cfg.scales)
            self.pixel_mean.copy_(f.mean((0, 2, 3), keepdim=True))
            self.pixel_std.copy_(f.std((0, 2, 3), keepdim=True).clamp(min=1e-3))

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        logits = self.decode(self.features(x), x)
        return (logits, None) if return_aux else logits
