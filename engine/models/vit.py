"""ViT encoder (timm-0.6 / MAE parameter names), for any channel count and input size.

Parameter names match the released SARMAE / MAE checkpoints (SARMAE_SPEC section 6):
``cls_token``, ``pos_embed`` (1, 1 + L, D), ``patch_embed.proj``, ``blocks.{i}.norm1``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``,
``blocks.{i}.mlp.fc2``, ``norm``. The position embedding is the fixed 2-D sin-cos table (kept as a
frozen parameter so checkpoints load unchanged) and is resampled when the input grid differs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .pos_embed import get_2d_sincos_pos_embed, resample_pos_embed


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class ViTConfig:
    """Encoder architecture; stored verbatim in model.json under architecture.encoder."""

    img_size: int | tuple[int, int] = 224  # input height/width the pos-embed table is built for
    patch_size: int = 16  # square patch side in pixels (token stride)
    in_chans: int = 3  # input channels: 1 single pol, 2 dual pol (VV+VH), 3 reference layout
    embed_dim: int = 768  # token width D
    depth: int = 12  # number of transformer blocks
    num_heads: int = 12  # attention heads per block
    mlp_ratio: float = 4.0  # hidden width of the MLP = mlp_ratio * D
    qkv_bias: bool = True  # bias on the qkv projection (timm default)
    norm_eps: float = 1e-6  # LayerNorm epsilon
    drop_path_rate: float = 0.0  # stochastic depth at the last block (linear ramp from 0)
    stem: str = "patch"  # token embedding: "patch" (one p x p projection) | "conv" (ConvStem, per patch)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(_pair(self.img_size))
        if d["stem"] == "patch":  # the default stays implicit: model.json of plain ViTs is unchanged
            del d["stem"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown encoder options {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "img_size" in d:
            d["img_size"] = _pair(d["img_size"])
        if d.get("stem", "patch") not in STEMS:
            raise ValueError(f"unknown encoder stem '{d['stem']}'; known: {', '.join(STEMS)}")
        return cls(**d)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = _pair(self.img_size)
        return h // self.patch_size, w // self.patch_size


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, H/p * W/p, D) with a p x p stride-p convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        x = self.proj(x)  # (N, D, gh, gw)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class ConvStem(nn.Module):
    """A convolutional token embedding applied to each p x p patch on its own (Xiao et al. 2021, "Early
    convolutions help transformers see better", made leak-free for masked pretraining).

    Each patch goes through log2(p) - 1 stride-2 3x3 convolutions (zero padding at the patch's own
    border, GELU; widths D/2^k rising to D/2) and ``proj``, a 2x2 stride-2 convolution to D. A token
    therefore depends on its own patch's pixels only: MAE masking stays token-level and a masked
    patch cannot reach a visible token. Parameter names: ``patch_embed.stem.{2i}`` (convs) and
    ``patch_embed.proj``; the first convolution (``patch_embed.stem.0``) sees the input channels.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        n = patch_size.bit_length() - 2  # stride-2 3x3 convs before the 2x2 projection
        if patch_size < 4 or patch_size & (patch_size - 1):
            raise ValueError(f"the conv stem needs a power-of-two patch size >= 4, not {patch_size}")
        widths = [max(8, embed_dim // 2 ** (n - i)) for i in range(n)]
        layers, c = [], in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GELU()]
            c = w
        self.patch_size = patch_size
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=2, stride=2)

    def patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(N, C, H, W) -> (N, L, C, p, p) patches in token order (row-major), and the grid."""
        p = self.patch_size
        n, c, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"input {(h, w)} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        return x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c, p, p), (gh, gw)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, K, C, p, p) -> (N, K, D): each patch on its own (MAE embeds only the visible ones)."""
        n, k = patches.shape[:2]
        tokens = self.proj(self.stem(patches.reshape(n * k, *patches.shape[2:])))  # (N * K, D, 1, 1)
        return tokens.reshape(n, k, -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        patches, grid = self.patches(x)
        return self.embed_patches(patches), grid


STEMS = {"patch": PatchEmbed, "conv": ConvStem}


def input_conv_key(stem: str = "patch") -> str:
    """The weight that sees the input channels (adapted when the channel count changes)."""
    return "patch_embed.stem.0.weight" if stem == "conv" else "patch_embed.proj.weight"


def tokeniser_from_shapes(shapes: dict[str, tuple]) -> tuple[str, int, int]:
    """(stem, patch size, input channels) of an encoder state dict's tensor SHAPES (keys without
    prefix): a ``PatchEmbed``'s ``patch_embed.proj.weight`` is (D, C, p, p); a ``ConvStem`` has
    log2(p) - 1 stride-2 convolutions ``patch_embed.stem.{2i}.weight`` (the first (w, C, 3, 3))
    before its 2x2 ``proj``, so p = 2 ** (convs + 1). KeyError when ``patch_embed.proj.weight`` is missing."""
    proj = shapes["patch_embed.proj.weight"]
    convs = sum(1 for k in shapes if re.fullmatch(r"patch_embed\.stem\.\d+\.weight", k))
    if not convs:
        return "patch", int(proj[2]), int(proj[1])
    return "conv", 2 ** (convs + 1), int(shapes[input_conv_key("conv")][1])


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at inference)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
        return x * keep.bernoulli_(1 - self.p) / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_eps=1e-6, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_vit_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears, zero bias, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """The SARMAE encoder. ``forward_features`` -> (N, 1 + L, D) normed tokens (cls first)."""

    def __init__(self, cfg: ViTConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or ViTConfig()
        if overrides:
            cfg = ViTConfig.from_dict({**cfg.to_dict(), **overrides})
        self.cfg = cfg
        d = cfg.embed_dim
        self.embed_dim = d
        self.patch_size = cfg.patch_size
        self.in_chans = cfg.in_chans
        self.grid = cfg.grid
        self.grad_checkpointing = False
        self.patch_embed = STEMS[cfg.stem](cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        n_tok = self.grid[0] * self.grid[1] + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tok, d), requires_grad=False)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps, dpr[i])
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self._init_encoder()

    def _init_encoder(self) -> None:
        table = get_2d_sincos_pos_embed(self.embed_dim, self.grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(table).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer (MAE); stem convs: torch's default
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks.apply(init_vit_weights)
        self.norm.apply(init_vit_weights)

    # -- embedding -------------------------------------------------------------------------------
    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + gh*gw, D) position table for a token grid, resampled when it differs."""
        return resample_pos_embed(self.pos_embed, grid, self.grid)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(N, C, H, W) -> patch tokens with position added (N, L, D), and the grid (gh, gw)."""
        if x.shape[1] != self.in_chans:
            raise ValueError(f"model expects {self.in_chans} channels, got {x.shape[1]}")
        tokens, grid = self.patch_embed(x)
        pos = self.pos_embed_for(grid)
        return tokens + pos[:, 1:], grid

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token + self.pos_embed[:, :1]
        return torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def run_blocks(self, x: torch.Tensor, collect: tuple[int, ...] = ()) -> tuple[torch.Tensor, list]:
        """Apply all blocks; also return the outputs of the blocks listed in ``collect``."""
        outs = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in collect:
                outs.append(x)
        return x, outs

    # -- public API ------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 1 + L, D) after the final norm; token 0 is cls."""
        tokens, _ = self.embed(x)
        x, _ = self.run_blocks(self.prepend_cls(tokens))
        return self.norm(x)

    def forward_patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D, gh, gw): final-norm patch tokens as a feature map (stride p)."""
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        t = self.forward_features(x)[:, 1:]
        return t.transpose(1, 2).reshape(x.shape[0], self.embed_dim, gh, gw)

    def get_intermediate_layers(self, x: torch.Tensor, indices: tuple[int, ...]) -> list[torch.Tensor]:
        """Outputs of the listed blocks (order kept, repeats allowed) as (N, D, gh, gw) maps.

        The last block's output gets the final norm, as ``forward_features`` does.
        """
        tokens, (gh, gw) = self.embed(x)
        last = len(self.blocks) - 1
        wanted = tuple(sorted(set(indices)))
        if wanted and (wanted[0] < 0 or wanted[-1] > last):
            raise ValueError(f"block indices {indices} outside 0..{last}")
        _, outs = self.run_blocks(self.prepend_cls(tokens), collect=wanted)
        by_idx = {}
        for idx, o in zip(wanted, outs):
            if idx == last:
                o = self.norm(o)
            by_idx[idx] = o[:, 1:].transpose(1, 2).reshape(x.shape[0], self.embed_dim, gh, gw)
        return [by_idx[i] for i in indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


def default_dense_indices(depth: int) -> tuple[int, ...]:
    """Blocks feeding the four pyramid levels: (3, 5, 7, 11) for depth 12 (SARMAE_SPEC 5),
    otherwise evenly spaced with the last block last."""
    if depth == 12:
        return (3, 5, 7, 11)
    if depth < 4:
        return tuple(max(0, depth - 4 + k) for k in range(4))
    return tuple(int(round(depth * k / 4)) - 1 for k in (1, 2, 3, 4))


