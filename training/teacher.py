"""The frozen optical teacher of SARC (SARMAE_SPEC 3), loaded from a LOCAL weights file.

Modes:
- ``patchembed`` (reference code): tokens = LayerNorm(Conv16x16(optical)), i.e. only the teacher's
  ``patch_embed.proj`` and final ``norm``;
- ``full`` (paper wording): all patch tokens of the frozen ViT (e.g. DINOv3 ViT-B/16).
The file may be safetensors or a PyTorch checkpoint (read with ``weights_only=True``), with timm
names under an optional prefix (``module.``, ``encoder.``, ``teacher.``, ``optical_encoder.``...).
Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from engine.convert import (
    extract_state_dict,
    find_encoder_prefix,
    infer_architecture,
    safe_load_checkpoint,
)
from engine.errors import SarmaeError
from engine.models import VisionTransformer, ViTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherError(SarmaeError):
    """The optical teacher's weights are missing or do not fit."""


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TeacherError(f"{path}: SARC teacher weights not found. Give a local ViT-B/16 weights file "
                           "(safetensors or .pth) with sarc.teacher_path, or disable SARC (sarc.enabled=false)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return extract_state_dict(safe_load_checkpoint(path))


class OpticalTeacher(nn.Module):
    """Frozen teacher: (N, 3, H, W) ImageNet-normalised optical -> (N, L, Dt) patch tokens."""

    def __init__(self, path: str | Path, mode: str = "patchembed", img_size: int = 224):
        super().__init__()
        if mode not in ("patchembed", "full"):
            raise TeacherError(f"unknown SARC teacher mode '{mode}'; use patchembed or full")
        path = Path(path)
        sd = _read_state(path)
        prefix = find_encoder_prefix(sd.keys())
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        try:
            arch = infer_architecture(shapes)["encoder"]
        except SarmaeError as e:
            raise TeacherError(f"{path}: not a ViT teacher ({e})") from e
        if arch["in_chans"] != 3:
            raise TeacherError(f"{path}: the optical teacher must take 3 channels (RGB), this one takes {arch['in_chans']}")
        self.mode = mode
        self.dim = arch["embed_dim"]
        if mode == "patchembed":
            if "norm.weight" not in sd:
                raise TeacherError(f"{path}: the teacher has no final 'norm' layer; patchembed mode needs it")
            p = arch["patch_size"]
            self.proj = nn.Conv2d(3, self.dim, p, stride=p)
            self.norm = nn.LayerNorm(self.dim, eps=1e-6)
            self.proj.load_state_dict({"weight": sd["patch_embed.proj.weight"], "bias": sd["patch_embed.proj.bias"]})
            self.norm.load_state_dict({"weight": sd["norm.weight"], "bias": sd["norm.bias"]})
        else:
            arch["img_size"] = [img_size, img_size] if arch["img_size"][0] != img_size else arch["img_size"]
            self.vit = VisionTransformer(ViTConfig.from_dict(arch))
            missing, unexpected = self.vit.load_state_dict(sd, strict=False)
            missing = [k for k in missing if k != "pos_embed"]
            if missing:
                raise TeacherError(f"{path}: the teacher lacks {len(missing)} ViT tensors (e.g. {missing[:3]})")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> OpticalTeacher:  # always frozen and in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, optical: torch.Tensor) -> torch.Tensor:
        if self.mode == "patchembed":
            t = self.proj(optical).flatten(2).transpose(1, 2)
            return self.norm(t)
        return self.vit.forward_features(optical)[:, 1:]


def gather_tokens(tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """(N, L, D) tokens at the visible positions ids_keep (N, K) -> (N, K, D)."""
    return torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
