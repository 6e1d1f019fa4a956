"""A SARMAE encoder as the CLIP image tower (``sarmae finetune --task clip --encoder PKG``).

open_clip's own ``VisionTransformer`` is the same network as the engine's ViT once configured
alike (``no_ln_pre``, LayerNorm eps 1e-6, exact GELU, class-token pooling after the final norm),
so the encoder's weights are COPIED into an ordinary open_clip config and the package stays a
plain open_clip CLIP that ``engine.clip.build_clip`` rebuilds (no custom tower to ship):

- ``patch_embed.proj`` -> ``conv1`` (open_clip's has no bias: the bias is added to the patch rows of
  the position table, which is exact); input channels fitted to the card's 3 image channels exactly
  for what the CLIP contract puts there: one band repeated -> weights / 3 on each; VV, VH, mean ->
  the VV and VH weights and zeros on the mean;
- ``cls_token`` -> ``class_embedding``, ``pos_embed`` -> ``positional_embedding``;
- block i: ``norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2`` -> ``ln_1/attn.in_proj/attn.out_proj/
  ln_2/mlp.c_fc/mlp.c_proj`` (q, k, v stacked alike); ``norm`` -> ``ln_post``.
The projection to the joint space and the text tower (``small_clip_config``'s) start random.
``tower_features`` is what the test compares with the encoder's own class token (1e-5).
"""

from __future__ import annotations

import logging

import torch

from engine.errors import SarmaeError

from .config import ClipTrainConfig, small_clip_config

log = logging.getLogger("sarmae.clip")


def vision_cfg_for(enc: dict) -> dict:
    """The open_clip vision config of an engine ViT config (``architecture.encoder``)."""
    size = enc["img_size"] if isinstance(enc["img_size"], int) else int(enc["img_size"][0])
    width, heads = int(enc["embed_dim"]), int(enc["num_heads"])
    return {"layers": int(enc["depth"]), "width": width, "head_width": width // heads,
            "mlp_ratio": float(enc.get("mlp_ratio", 4.0)), "patch_size": int(enc["patch_size"]), "image_size": size,
            "no_ln_pre": True, "norm_kwargs": {"eps": float(enc.get("norm_eps", 1e-6))}, "pool_type": "tok"}


def _patch_weight(w: torch.Tensor, bands: int) -> torch.Tensor:
    """(D, C, p, p) encoder weights -> (D, 3, p, p) for the CLIP card's channels (module docstring)."""
    c = w.shape[1]
    if c != bands:
        from engine.convert import adapt_patch_embed

        w = adapt_patch_embed(w, bands)
    if bands == 1:
        return w.repeat(1, 3, 1, 1) / 3
    if bands == 2:
        return torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    return w


def copy_encoder(visual, sd: dict, bands: int) -> int:
    """Copy an engine ViT state dict (no prefix) into open_clip's ``VisionTransformer``; returns
    the number of encoder tensors used. Refuses an encoder whose shapes do not fit."""
    m = {"class_embedding": sd["cls_token"].reshape(-1),
         "conv1.weight": _patch_weight(sd["patch_embed.proj.weight"], bands),
         "ln_post.weight": sd["norm.weight"], "ln_post.bias": sd["norm.bias"]}
    pos = sd["pos_embed"][0].clone()
    if "patch_embed.proj.bias" in sd:
        pos[1:] += sd["patch_embed.proj.bias"]
    m["positional_embedding"] = pos
    names = {"norm1": "ln_1", "attn.qkv": "attn.in_proj_", "attn.proj": "attn.out_proj", "norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        for a, b in names.items():
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.{a}.{kind}"
                if key in sd:
                    dst = f"transformer.resblocks.{i}.{b}{kind}" if b.endswith("_") else \
                        f"transformer.resblocks.{i}.{b}.{kind}"
                    m[dst] = sd[key]
        i += 1
    target = visual.state_dict()
    wrong = [k for k, v in m.items() if k not in target or tuple(target[k].shape) != tuple(v.shape)]
    if wrong:
        raise SarmaeError(f"the encoder does not fit the open_clip tower built from its own config "
                          f"({', '.join(wrong[:4])}); is it an engine ViT package?")
    visual.load_state_dict({**target, **m})
    return len(m)


def tower_features(model, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> (N, D) the tower's pooled class token BEFORE the projection (for checks)."""
    v = model.visual
    proj, v.proj = v.proj, None
    try:
        return v(x)
    finally:
        v.proj = proj


def sarmae_clip(cfg: ClipTrainConfig):
    """(open_clip model, card): the encoder package ``cfg.encoder`` as the image tower."""
    from engine.clip import build_clip, clip_card
    from engine.convert import find_encoder_prefix
    from engine.package import load_state_dict

    enc_card, sd = load_state_dict(cfg.encoder)
    enc = enc_card.architecture["encoder"]
    if not enc:
        raise SarmaeError(f"{cfg.encoder}: '{enc_card.name}' has no ViT encoder ({enc_card.task} package); give "
                          "an encoder package from 'sarmae pretrain' / 'sarmae convert'")
    prefix = find_encoder_prefix(sd.keys())
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    enc = dict(enc)
    size = enc["img_size"] if isinstance(enc["img_size"], int) else int(enc["img_size"][0])
    small = small_clip_config(32 * max(1, size // 32))
    config = {**small, **{k: v for k, v in cfg.model.items() if k != "vision_cfg"}, "vision_cfg": vision_cfg_for(enc)}
    bands = list(cfg.bands)[:3]
    card = clip_card(f"sarclip-{enc_card.name}", config=config, source="db", bands=bands,
                     templates=list(cfg.templates) or None)
    want, have = card.input.get("clip"), enc_card.input.get("clip") if enc_card.input else None
    if enc_card.input and (enc_card.input.get("units") != "db" or list(have) != list(want)):
        log.warning("%s was trained on %s clipped to %s; the CLIP package reads dB clipped to %s",
                    cfg.encoder, enc_card.input.get("units"), have, want)
    torch.manual_seed(cfg.seed)
    model = build_clip(card)
    n = copy_encoder(model.visual, sd, len(bands))
    log.info("image tower: %s (%d tensors copied from the encoder; projection and text tower random)",
             cfg.encoder, n)
    card.provenance["image_tower"] = {"encoder": str(cfg.encoder), "name": enc_card.name, "tensors": n}
    return model, card
