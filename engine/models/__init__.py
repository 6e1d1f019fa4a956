"""SARMAE model definitions, used by the engine and by training (defined once)."""

from .mae import (
    DecoderConfig,
    MaskedAutoencoderViT,
    masking_indices,
    patchify,
    random_masking,
    unpatchify,
)
from .registry import (
    HEADS,
    SIZES,
    build_from_architecture,
    create_model,
    list_models,
    register_model,
)
from .sarc import SARCProjectionHead, sarc_loss
from .vit import VisionTransformer, ViTConfig

__all__ = [
    "HEADS", "SIZES", "DecoderConfig", "MaskedAutoencoderViT", "SARCProjectionHead", "ViTConfig",
    "VisionTransformer", "build_from_architecture", "create_model", "list_models", "patchify",
    "masking_indices", "random_masking", "register_model", "sarc_loss", "unpatchify",
]
