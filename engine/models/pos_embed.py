"""Fixed 2-D sin-cos position embeddings and their interpolation to other grids.

The sin-cos table follows MAE (facebookresearch/mae, util/pos_embed.py): half of the channels
encode the row, half the column, each with D/4 frequencies omega_k = 1 / 10000^(k / (D/4)).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) as [sin(pos*omega), cos(pos*omega)]."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False
) -> np.ndarray:
    """Sin-cos table for a (gh, gw) grid -> (gh*gw [+1], embed_dim), row-major like patchify.

    The first half of the channels encodes the column (w), the second the row (h), as MAE does.
    With ``cls_token`` a zero row is prepended.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb_w = _sincos_1d(embed_dim // 2, grid_w)
    emb_h = _sincos_1d(embed_dim // 2, grid_h)
    emb = np.concatenate([emb_w, emb_h], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb.astype(np.float32)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Bicubic resampling of a (1, P + gh*gw, D) table to a new (gh', gw') grid.

    ``old_grid`` defaults to the square grid implied by the token count. Prefix tokens (cls) are
    kept unchanged. Used when the input size differs from the size the model was built with.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, dim = grid.shape[1], grid.shape[2]
    if old_grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"cannot infer the grid of a {n}-token position embedding")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
