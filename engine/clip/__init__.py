"""CLIP packages (task ``zeroshot``): open_clip models with their tokenizer, prompt templates and
SAR input contract (DESIGN.md, "CLIP packages"). Importing this package imports neither torch nor
open_clip; the functions do, when called.

- ``clip_card(name, model_name=None, config=None, source=..., bands=..., templates=..., provenance=...)``
- ``build_clip(card)``: the open_clip ``CLIP`` (random weights)
- ``save_clip_package(model, card, out_dir)`` / ``load_clip(package) -> ClipModel``
- ``prepare_images(x, card)``: (C, H, W) or (B, C, H, W) in the card's units -> (B, 3, S, S) tensor
- ``text_embeddings(clip_model, class_names, templates)``: (K, D) prompt-ensemble class embeddings
"""

from __future__ import annotations

from .card import (
           DEFAULT_TEMPLATES,
           SOURCES,
           TINY_CONFIG,
           clip_card,
           clip_settings,
           input_contract,
           model_config,
)
from .model import ClipModel, build_clip, clip_model, load_clip, prepare_images, save_clip_package
from .text import (
           PromptError,
           check_classes,
           check_templates,
           encode_phrases,
           text_embeddings,
           tokenize,
)

__all__ = ["DEFAULT_TEMPLATES", "SOURCES", "TINY_CONFIG", "ClipModel", "PromptError", "build_clip", "check_classes",
           "check_templates", "clip_card", "clip_model", "clip_settings", "encode_phrases", "input_contract",
           "load_clip", "model_config", "prepare_images", "save_clip_package", "text_embeddings", "tokenize"]
