"""Masked autoencoder (MAE) on the SARMAE ViT encoder, for any channel count.

Following facebookresearch/mae (models_mae.py) with the fixes SARMAE needs:
- ``patchify``/``unpatchify`` take the channel count from the tensor (upstream hard-codes 3);
- non-square grids are supported;
- the reconstruction target may differ from the input (SARE: noised input, clean target).
The encoder runs on the visible tokens only: this is where MAE's speed comes from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .pos_embed import get_2d_sincos_pos_embed, resample_pos_embed
from .vit import Block, ConvStem, VisionTransformer, ViTConfig, init_vit_weights


@dataclass
class DecoderConfig:
    """MAE decoder; stored in model.json under architecture.decoder."""

    embed_dim: int = 512  # decoder width (reference 512)
    depth: int = 8  # decoder blocks (reference 8; 1-2 is enough for small CPU runs)
    num_heads: int = 16  # decoder heads (reference 16)
    norm_pix_loss: bool = False  # normalise each target patch by its mean/std (off in SARMAE)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DecoderConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown decoder options {sorted(unknown)}")
        return cls(**d)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), L = (H/p)*(W/p) row-major; channel-last inside a patch."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], in_chans: int) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, gh*p, gw*p); the inverse of ``patchify``."""
    n, length, dim = x.shape
    gh, gw = grid
    if length != gh * gw or dim != p * p * in_chans:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} to grid {grid} x {in_chans} channels")
    x = x.reshape(n, gh, gw, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, gh * p, gw * p)


def masking_indices(
    n: int, length: int, mask_ratio: float, generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None, device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking of ``n`` rows of ``length`` tokens, by argsort of uniform noise (or
    the given ``noise`` (N, L)): mask (N, L) with 0 = kept / 1 = masked in the original order,
    ids_restore (N, L), ids_keep (N, K) with K = round(L * (1 - mask_ratio)) (at least 1)."""
    keep = max(1, int(round(float(length) * (1.0 - mask_ratio))))
    if noise is None:
        noise = torch.rand(n, length, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return mask, ids_restore, ids_keep


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``masking_indices`` applied to tokens x: (N, L, D) -> kept tokens (N, K, D), mask (N, L),
    ids_restore (N, L), ids_keep (N, K)."""
    n, length, d = x.shape
    mask, ids_restore, ids_keep = masking_indices(n, length, mask_ratio, generator, noise, x.device)
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    return kept, mask, ids_restore, ids_keep


@dataclass
class MAEOutput:
    loss: torch.Tensor  # scalar: MSE over masked patches
    pred: torch.Tensor  # (N, L, p*p*C) reconstruction in (normalised) image units
    mask: torch.Tensor  # (N, L) 1 = masked
    latent: torch.Tensor  # (N, 1 + K, D) encoder output (final norm), cls first
    ids_keep: torch.Tensor  # (N, K) positions of the visible tokens
    grid: tuple[int, int]


class MaskedAutoencoderViT(VisionTransformer):
    """MAE with a SARMAE ViT encoder; encoder parameters keep the plain ViT names."""

    def __init__(self, cfg: ViTConfig | None = None, decoder: DecoderConfig | None = None):
        super().__init__(cfg)
        dec = decoder or DecoderConfig()
        self.dec_cfg = dec
        p, c = self.patch_size, self.in_chans
        self.decoder_embed = nn.Linear(self.embed_dim, dec.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.embed_dim))
        n_tok = self.grid[0] * self.grid[1] + 1
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_tok, dec.embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dec.embed_dim, dec.num_heads, self.cfg.mlp_ratio, True, self.cfg.norm_eps)
            for _ in range(dec.depth)
        )
        self.decoder_norm = nn.LayerNorm(dec.embed_dim, eps=self.cfg.norm_eps)
        self.decoder_pred = nn.Linear(dec.embed_dim, p * p * c)
        table = get_2d_sincos_pos_embed(dec.embed_dim, self.grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(table).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_vit_weights)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return unpatchify(x, self.patch_size, grid, self.in_chans)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, generator=None, noise=None):
        """-> latent (N, 1+K, D), mask (N, L), ids_restore (N, L), ids_keep (N, K), grid.

        With the conv stem only the visible patches are embedded (the same tokens, since the stem
        sees each patch on its own, for a quarter of the stem's work at mask ratio 0.75)."""
        if isinstance(self.patch_embed, ConvStem):
            if imgs.shape[1] != self.in_chans:
                raise ValueError(f"model expects {self.in_chans} channels, got {imgs.shape[1]}")
            patches, grid = self.patch_embed.patches(imgs)
            n, length = patches.shape[:2]
            mask, ids_restore, ids_keep = masking_indices(n, length, mask_ratio, generator, noise, imgs.device)
            idx = ids_keep.view(n, -1, 1, 1, 1).expand(-1, -1, *patches.shape[2:])
            pos = self.pos_embed_for(grid)[:, 1:].expand(n, -1, -1)
            kept = self.patch_embed.embed_patches(torch.gather(patches, 1, idx))
            kept = kept + torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        else:
            tokens, grid = self.embed(imgs)
            kept, mask, ids_restore, ids_keep = random_masking(tokens, mask_ratio, generator, noise)
        x, _ = self.run_blocks(self.prepend_cls(kept))  # blocks see 1 + K tokens only
        return self.norm(x), mask, ids_restore, ids_keep, grid

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid) -> torch.Tensor:
        """(N, 1+K, D) -> (N, L, p*p*C): mask tokens fill the hidden positions."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        fill = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        body = torch.cat([x[:, 1:], fill], dim=1)
        body = torch.gather(body, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], body], dim=1)
        x = x + resample_pos_embed(self.decoder_pos_embed, grid, self.grid)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over masked patches only."""
        t = self.patchify(target)
        if self.dec_cfg.norm_pix_loss:
            mean = t.mean(dim=-1, keepdim=True)
            var = t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - t.float()) ** 2).mean(dim=-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self,
        imgs: torch.Tensor,
        target: torch.Tensor | None = None,
        mask_ratio: float = 0.75,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> MAEOutput:
        """imgs: (noised) input; target: clean image to reconstruct (defaults to imgs); noise: (N, L)
        uniform values ranking the patches (lowest kept), e.g. drawn per sample for reproducibility."""
        latent, mask, ids_restore, ids_keep, grid = self.forward_encoder(imgs, mask_ratio, generator, noise)
        pred = self.forward_decoder(latent, ids_restore, grid)
        loss = self.forward_loss(imgs if target is None else target, pred, mask)
        return MAEOutput(loss, pred, mask, latent, ids_keep, grid)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask_ratio: float = 0.75, generator=None, noise=None) -> torch.Tensor:
        """Image made of the visible input patches and the reconstructed masked ones."""
        out = self.forward(imgs, mask_ratio=mask_ratio, generator=generator, noise=noise)
        pred = out.pred
        if self.dec_cfg.norm_pix_loss:  # undo the per-patch normalisation with the input's stats
            t = self.patchify(imgs)
            pred = pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True)
        m = out.mask.unsqueeze(-1)
        mixed = self.patchify(imgs) * (1 - m) + pred * m
        return self.unpatchify(mixed, out.grid)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder weights only (what an encoder package keeps)."""
        return {k: v for k, v in self.state_dict().items() if not is_decoder_key(k)}


def is_decoder_key(key: str) -> bool:
    return key.startswith(("decoder_", "mask_token"))
