"""The card of a CLIP package (task ``zeroshot``): the open_clip model, its tokenizer, its prompt
templates and its input contract, per source of weights (DESIGN.md, "CLIP packages").

``architecture``::

    {"name": "clip",
     "encoder": {in_chans 3, img_size, patch_size, embed_dim, depth, num_heads},  # the image tower, summarised
     "clip": {"model_name": "ViT-B-32" | null, "config": {embed_dim, vision_cfg, text_cfg, ...},
              "tokenizer": {"kind": "open_clip_bpe", "context_length": 77},
              "templates": ["a SAR image of {}.", ...], "source": "sarclip" | "sarvlm" | "db"}}

The network is built from ``clip.config`` alone (the full open_clip config dict, so a tiny custom
config builds too); ``encoder`` only describes the image tower in the terms the engine plans windows
with (input size, patch size; a ResNet tower: patch 32, its total stride; depth the sum of its stages).

Input contracts (``input``; ``engine.radiometry`` applies them), from dB:

- ``sarclip`` (CAESAR-Radi/SARCLIP): Sentinel-1 VV (x + 25) / 25, VH (x + 32.5) / 25, the third
  channel the mean of the two; one band (x + 25) / 30 in all three channels; clipped to [0, 1]
  and mapped to [-1, 1] (mean 0.5, std 0.5).
- ``sarvlm`` (KlayMa527/SARVLM): each window min-max stretched to 8-bit levels, then CLIP's mean/std.
- ``db``: the project's own dB clip (``engine.card.DEFAULT_CLIP``) per band, mapped to [-1, 1]
  (what ``sarmae finetune --task clip`` trains with).

8-bit display rasters (PNG/JPEG quick-looks, no calibrated unit): ``sarvlm`` and ``db`` contracts
carry ``display_db`` = their clip range, so 0..255 is read as that dB range (a ``db`` model was
trained on 8-bit chips read so; SARVLM stretches every window to 8 bits anyway), said in the run's
log; a ``sarclip`` model reads calibrated dB only and refuses them with what to do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..card import DEFAULT_CLIP, ModelCard
from ..errors import ModelConfigError, missing_dependency

SOURCES = ("sarclip", "sarvlm", "db")
TOKENIZER = "open_clip_bpe"  # open_clip's SimpleTokenizer and the BPE vocabulary in its wheel
# the prompt ensemble (SARVLM's); class embedding = mean of the normalised template embeddings
DEFAULT_TEMPLATES = ["a SAR image of {}.", "a radar image of {}.", "a synthetic aperture radar image of {}.",
                     "this is an SAR image of {} ."]
SOURCE_TEMPLATES = {"sarclip": ["this is an SAR image of {} ."], "sarvlm": DEFAULT_TEMPLATES[:3],
                    "db": DEFAULT_TEMPLATES}
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP's image mean/std (SARVLM's preprocessing)
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
# SARCLIP's dB ranges mapped to [0, 1]: co-pol (VV/HH) (x + 25) / 25, cross-pol (VH/HV) (x + 32.5) / 25
SARCLIP_RANGES = {"co": [-25.0, 0.0], "cross": [-32.5, -7.5], "single": [-25.0, 5.0]}
# a CLIP small enough for tests and CPU experiments (ViT 1 block of width 64 on 32 px, text 1 block of width 32)
TINY_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                                               "patch_size": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CLIP_KWARGS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
               "nonscalar_logit_scale")  # what open_clip.model.CLIP takes from a config


def import_open_clip() -> Any:
    """open_clip, with the hub offline (its model definitions and BPE vocabulary are in the wheel)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import open_clip
    except ImportError as e:
        raise missing_dependency("open_clip (open-clip-torch)") from e
    return open_clip


def model_config(model_name: str | None, config: Mapping | None = None) -> dict:
    """The open_clip config dict: ``config`` as given, else open_clip's for ``model_name``; refuses
    what ``open_clip.model.CLIP`` cannot build here (towers from timm / Hugging Face, CoCa)."""
    if config is None:
        if not model_name:
            raise ModelConfigError("a CLIP package needs an open_clip model name (e.g. ViT-B-32) or a config dict")
        open_clip = import_open_clip()
        config = open_clip.get_model_config(model_name)
        if config is None:
            known = [n for n in open_clip.list_models() if "coca" not in n.lower()]
            near = [n for n in known if n.lower().startswith(model_name.lower()[:4])][:8]
            raise ModelConfigError(f"unknown open_clip architecture '{model_name}'; e.g. "
                                   f"{', '.join(near or known[:8])} ({len(known)} known: open_clip.list_models())")
    config = dict(config)
    where = f"open_clip config '{model_name}'" if model_name else "the CLIP config"
    unknown = sorted(set(config) - set(CLIP_KWARGS))
    if unknown:
        raise ModelConfigError(f"{where} has {', '.join(unknown)}: only plain open_clip CLIP models "
                               "(not CoCa, custom text towers) build in sarmae")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in config:
            raise ModelConfigError(f"{where} lacks '{key}' (an open_clip config has embed_dim, vision_cfg, text_cfg)")
    if config["vision_cfg"].get("timm_model_name") or config["text_cfg"].get("hf_model_name"):
        raise ModelConfigError(f"{where} uses a timm or Hugging Face tower, which would be downloaded; "
                               "sarmae builds open_clip's own ViT/ResNet and text transformer only")
    return config


def encoder_summary(config: Mapping) -> dict:
    """The image tower in the card's ``architecture.encoder`` terms (3 channels)."""
    v = config["vision_cfg"]
    layers, width, head_width = v.get("layers", 12), int(v.get("width", 768)), int(v.get("head_width", 64))
    resnet = isinstance(layers, (list, tuple))
    size = v.get("image_size", 224)
    return {"in_chans": 3, "img_size": size if isinstance(size, int) else list(size),
            "patch_size": 32 if resnet else int(v.get("patch_size") or 16), "embed_dim": width,
            "depth": int(sum(layers)) if resnet else int(layers),
            "num_heads": max(1, width * 32 // head_width if resnet else width // head_width)}


def _ranges(source: str, bands: list[str]) -> list[list[float]]:
    if source != "sarclip":
        return [list(DEFAULT_CLIP["db"]) for _ in bands]
    if len(bands) == 1:
        return [list(SARCLIP_RANGES["single"])]
    cross = [b.upper() in ("VH", "HV") for b in bands]
    if len(bands) == 2 and cross[0] == cross[1]:
        cross = [False, True]  # unnamed bands: co-pol first, cross-pol second (SARCLIP's VV, VH)
    return [list(SARCLIP_RANGES["cross" if c else "co"]) for c in cross]


def input_contract(source: str, bands: list[str]) -> dict:
    """The ``input`` of a CLIP card for weights from ``source`` reading ``bands`` (1 to 3) in dB."""
    if source not in SOURCES:
        raise ModelConfigError(f"unknown CLIP source '{source}': one of {', '.join(SOURCES)}")
    if not 1 <= len(bands) <= 3 or len(set(bands)) != len(bands):
        raise ModelConfigError(f"a CLIP package reads 1 to 3 distinct bands (given {bands}): 1 band fills the "
                               "three image channels, 2 bands add their mean as the third")
    channels = bands * 3 if len(bands) == 1 else [*bands, "mean"] if len(bands) == 2 else list(bands)
    ranges = _ranges(source, bands)
    openai = source == "sarvlm"
    return {"bands": list(bands), "units": "db",
            "clip": [min(r[0] for r in ranges), max(r[1] for r in ranges)], "band_clip": ranges,
            "channels": channels, "mean": OPENAI_MEAN if openai else [0.5] * 3,
            "std": OPENAI_STD if openai else [0.5] * 3, "nodata": "mask", "pixel_spacing_m": None,
            **({"stretch": "minmax"} if openai else {}),
            # 8-bit display rasters: the project's training reads 8-bit chips as spanning the clip range
            # (training/clip/images.py), SARVLM stretches every image to 8 bits; SARCLIP reads calibrated dB only
            **({"display_db": [min(r[0] for r in ranges), max(r[1] for r in ranges)]} if source != "sarclip" else {})}


def clip_card(name: str, model_name: str | None = None, config: Mapping | None = None, source: str = "sarclip",
              bands: list[str] | None = None, templates: list[str] | None = None,
              provenance: dict | None = None, context_length: int | None = None) -> ModelCard:
    """A ``zeroshot`` card for an open_clip model (``model_name`` and/or its full ``config``)."""
    from ..package import new_card

    cfg = model_config(model_name, config)
    if source not in SOURCES:
        raise ModelConfigError(f"unknown CLIP source '{source}': one of {', '.join(SOURCES)}")
    bands = list(bands or (["VV"] if source == "sarvlm" else ["VV", "VH"]))
    templates = list(templates or SOURCE_TEMPLATES[source])
    ctx = int(context_length or cfg["text_cfg"].get("context_length", 77))
    arch = {"name": "clip", "encoder": encoder_summary(cfg),
            "clip": {"model_name": model_name, "config": cfg,
                     "tokenizer": {"kind": TOKENIZER, "context_length": ctx},
                     "templates": templates, "source": source}}
    return new_card(name, "zeroshot", arch, input_contract(source, bands), [], provenance)


def clip_settings(card: ModelCard) -> dict[str, Any]:
    """The card's ``architecture.clip`` object (model_name, config, tokenizer, templates, source)."""
    return card.architecture.extra["clip"]


def card_problems(card: ModelCard) -> list[str]:
    """What is wrong with a zeroshot card beyond the common schema, as sentences."""
    clip = card.architecture.extra.get("clip")
    if card.architecture.name != "clip" or not isinstance(clip, Mapping):
        return ["a zeroshot package needs 'architecture.name' \"clip\" and an 'architecture.clip' object"]
    problems = []
    cfg = clip.get("config")
    if not (isinstance(cfg, Mapping) and all(isinstance(cfg.get(k), Mapping) for k in ("vision_cfg", "text_cfg"))
            and isinstance(cfg.get("embed_dim"), int)):
        problems.append("'architecture.clip.config' must be an open_clip config (embed_dim, vision_cfg, text_cfg)")
    tok = clip.get("tokenizer")
    if not (isinstance(tok, Mapping) and tok.get("kind") == TOKENIZER and isinstance(tok.get("context_length"), int)
            and tok["context_length"] > 2):
        problems.append(f"'architecture.clip.tokenizer' must be {{\"kind\": \"{TOKENIZER}\", \"context_length\": int}}")
    t = clip.get("templates")
    if not (isinstance(t, list) and t and all(isinstance(s, str) and s.count("{}") == 1 for s in t)):
        problems.append("'architecture.clip.templates' must be a non-empty list of prompts, each with one {} "
                        "for the class name")
    return problems
