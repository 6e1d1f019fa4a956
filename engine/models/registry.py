"""Named constructors (timm's ``@register_model`` idea) and building a model from model.json.

Encoder sizes (SARMAE_SPEC 1): tiny 192/12/3, small 384/12/6, base 768/12/12, large 1024/24/16.
Names: ``vit_<size>_patch16`` (encoder), ``mae_vit_<size>_patch16`` (MAE, decoder 512d8b); the same
with 8 px patches (``vit_<size>_patch8``) and with a convolutional stem applied per patch
(``vit_<size>_conv16``, ``vit_<size>_conv8``: ``vit.ConvStem``, leak-free under MAE masking);
``small_cnn`` (a chip classifier that is not a ViT: ``OWN_NETWORKS``, ``engine.models.small_cnn``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch.nn as nn

from ..errors import ModelConfigError
from .mae import DecoderConfig, MaskedAutoencoderViT
from .vit import VisionTransformer, ViTConfig

SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make ``fn`` buildable by its name through ``create_model``."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("vit_tiny_patch16", in_chans=2, img_size=128)``."""
    if name not in _REGISTRY:
        raise ModelConfigError(f"unknown architecture '{name}'; known: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


def encoder_config(size: str, **overrides) -> ViTConfig:
    return ViTConfig.from_dict({**SIZES[size], "patch_size": 16, **overrides})


TOKENISERS = {"patch": ("patch", (16, 8)), "conv": ("conv", (16, 8))}  # name part -> (stem, patch sizes)
_VIT_NAME = re.compile(r"^(?:mae_)?vit_([a-z]+)_(patch|conv)(\d+)$")


def vit_names() -> list[str]:
    """The encoder names (without ``mae_``): vit_<size>_patch16 first, then the other tokenisers."""
    return [f"vit_{size}_{kind}{p}" for kind, (_, ps) in TOKENISERS.items() for p in ps for size in SIZES]


def arch_encoder_config(name: str, **overrides) -> ViTConfig:
    """The encoder config a registered ViT name (``vit_tiny_conv16``, ``mae_vit_base_patch16``...) stands for."""
    m = _VIT_NAME.match(name)
    if not m or m.group(1) not in SIZES or int(m.group(3)) not in TOKENISERS[m.group(2)][1]:
        raise ModelConfigError(f"unknown ViT architecture '{name}'; known: {', '.join(vit_names())} (mae_ in front "
                               "for the MAE)")
    return encoder_config(m.group(1), patch_size=int(m.group(3)), stem=TOKENISERS[m.group(2)][0], **overrides)


def vit_name(cfg: ViTConfig) -> str:
    """The registered encoder name (without ``mae_``) ``cfg`` stands for, ``vit_<size>_<patch|conv><p>``
    (the inverse of ``arch_encoder_config``); 'custom' for a size, stem or patch size with no name."""
    size = size_of(cfg)
    kind = next((k for k, (stem, _) in TOKENISERS.items() if stem == cfg.stem), None)
    if not size or kind is None or cfg.patch_size not in TOKENISERS[kind][1]:
        return "custom"
    return f"vit_{size}_{kind}{cfg.patch_size}"


def size_of(cfg: ViTConfig) -> str | None:
    """The named size whose width/depth/heads match ``cfg`` (None for a custom size)."""
    for name, s in SIZES.items():
        if (cfg.embed_dim, cfg.depth, cfg.num_heads) == (s["embed_dim"], s["depth"], s["num_heads"]):
            return name
    return None


def _make(name: str):
    def vit(**kw) -> VisionTransformer:
        return VisionTransformer(arch_encoder_config(name, **kw))

    def mae(decoder: dict | None = None, **kw) -> MaskedAutoencoderViT:
        return MaskedAutoencoderViT(arch_encoder_config(name, **kw), DecoderConfig.from_dict(decoder or {}))

    cfg = arch_encoder_config(name)
    what = f"ViT-{size_of(cfg).capitalize()}/{cfg.patch_size}" + (" with a conv stem" if cfg.stem == "conv" else "")
    vit.__name__, mae.__name__ = name, "mae_" + name
    vit.__doc__ = f"{what} encoder (width {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads})."
    mae.__doc__ = f"MAE with a {what} encoder and a 512-wide, 8-block decoder."
    register_model(vit)
    register_model(mae)


for _name in vit_names():
    _make(_name)


@register_model
def small_cnn(in_chans: int = 1, num_classes: int = 2, **_) -> nn.Module:
    """The small CNN chip classifier (``engine.models.small_cnn``): the classification baseline and a
    classify package of its own (``--arch cnn``)."""
    from .small_cnn import SmallCNN

    return SmallCNN(in_chans, num_classes)


# networks that are not a ViT with a head: architecture.name -> (tasks it serves); their card's
# "encoder" summarises them (engine.models.small_cnn) and create_model builds them
OWN_NETWORKS = {"small_cnn": ("classify",)}


def _segmenter(encoder: VisionTransformer, head: dict, num_classes: int) -> nn.Module:
    return build_segmenter(encoder, num_classes, head)


def _classifier(encoder: VisionTransformer, head: dict, num_classes: int) -> nn.Module:
    from .heads import ViTClassifier

    # pool / blocks (absent: the mean of the last block), views (absent: 1); other keys are ignored, as
    # before they existed
    return ViTClassifier(encoder, num_classes, **{k: head[k] for k in ("pool", "blocks", "views") if k in head})


def _detector(encoder: VisionTransformer, head: dict, num_classes: int) -> nn.Module:
    from .heads import DetHeadConfig, ViTDetector

    return ViTDetector(encoder, num_classes, DetHeadConfig.from_dict(head))


# the model of each built-in task with a head: encoder + head config + number of classes -> module
# (embed is the encoder itself, reconstruct the MAE; a task of another package builds its own model)
HEADS: dict[str, Callable[[VisionTransformer, dict, int], nn.Module]] = {
    "classify": _classifier, "segment": _segmenter, "detect": _detector}


def build_from_architecture(arch: dict, task: str, num_classes: int = 0) -> nn.Module:
    """Build the model described by model.json's ``architecture`` for ``task``.

    arch: {"name": ..., "encoder": ViTConfig dict, "decoder": DecoderConfig dict (reconstruct),
    "head": head config dict (classify/segment/detect)}.
    """
    known = ("embed", "reconstruct", *HEADS)
    if task not in known:
        raise ModelConfigError(f"no built-in model for task '{task}'; known: {', '.join(known)}")
    name = arch.get("name")
    if name in OWN_NETWORKS:
        if task not in OWN_NETWORKS[name]:
            raise ModelConfigError(f"architecture '{name}' serves {', '.join(OWN_NETWORKS[name])}, not '{task}'")
        if num_classes < 1:
            raise ModelConfigError(f"task '{task}' needs at least one class")
        try:
            return create_model(name, in_chans=int(dict(arch["encoder"])["in_chans"]), num_classes=num_classes)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelConfigError(f"invalid '{name}' architecture in model.json: {e}") from e
    try:
        enc = ViTConfig.from_dict(dict(arch["encoder"]))
        if task == "reconstruct":
            return MaskedAutoencoderViT(enc, DecoderConfig.from_dict(dict(arch.get("decoder") or {})))
        encoder = VisionTransformer(enc)
        if task == "embed":
            return encoder
        if num_classes < 1:
            raise ModelConfigError(f"task '{task}' needs at least one class")
        return HEADS[task](encoder, dict(arch.get("head") or {}), num_classes)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ModelConfigError):
            raise
        raise ModelConfigError(f"invalid architecture in model.json: {e}") from e


SEG_HEADS = ("upernet", "light")  # architecture.head.kind of a segment package (absent: upernet)


def build_segmenter(encoder: VisionTransformer, num_classes: int, head: dict | None = None) -> nn.Module:
    """The segmenter ``head`` describes: ``kind`` "light" (``seg_light.LightSegmenter``, per-pixel
    head for CPUs) or "upernet" / absent (``heads.ViTSegmenter``, simple pyramid + UPerNet)."""
    from .heads import SegHeadConfig, ViTSegmenter
    from .seg_light import LightSegHeadConfig, LightSegmenter

    head = dict(head or {})
    kind = head.pop("kind", "upernet") or "upernet"
    if kind == "light":
        return LightSegmenter(encoder, num_classes, LightSegHeadConfig.from_dict(head))
    if kind != "upernet":
        raise ModelConfigError(f"unknown segmentation head '{kind}'; known: {', '.join(SEG_HEADS)}")
    if head.get("indices") is not None:
        head["indices"] = tuple(head["indices"])
    return ViTSegmenter(encoder, num_classes, SegHeadConfig(**head))
