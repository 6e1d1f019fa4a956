"""A CLIP package's network: built with open_clip from the card, loaded from a package, saved as one,
and the image side's input scaling (``prepare_images``).

open_clip is the one definition of CLIP here (``open_clip.model.CLIP``); the Hugging Face hub is set
offline before it is imported, so nothing is ever fetched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RasterInputError
from .card import clip_settings, import_open_clip

if TYPE_CHECKING:
    from ..card import ModelCard
    from ..package import LoadedPackage


def build_clip(card: ModelCard) -> Any:
    """The card's open_clip ``CLIP`` with random weights (train mode, as torch builds it)."""
    open_clip = import_open_clip()
    cfg = dict(clip_settings(card)["config"])
    return open_clip.model.CLIP(**cfg)


@dataclass
class ClipModel:
    """A loaded CLIP package: the open_clip model (eval mode), its tokenizer, default prompt
    templates and card; ``path`` the package it came from (None: built in memory)."""

    model: Any
    tokenizer: Any
    templates: list[str]
    card: ModelCard
    path: Path | None = None

    @property
    def embed_dim(self) -> int:
        return int(clip_settings(self.card)["config"]["embed_dim"])

    def encode_images(self, images: Any) -> Any:
        """(B, 3, S, S) prepared images (``prepare_images``) -> (B, D) unit-norm embeddings."""
        import torch

        device = next(self.model.parameters()).device
        with torch.no_grad():
            return self.model.encode_image(images.to(device), normalize=True).float()

    def encode_text(self, phrases: list[str]) -> Any:
        """(N, D) unit-norm embeddings of phrases (checked, truncated with a warning: ``engine.clip.text``)."""
        from .text import encode_phrases

        return encode_phrases(self, phrases)


def clip_model(model: Any, card: ModelCard, path: Path | None = None) -> ClipModel:
    """Wrap an open_clip model and its card (e.g. a model being trained) as a ``ClipModel``."""
    from .text import make_tokenizer

    return ClipModel(model, make_tokenizer(card), list(clip_settings(card)["templates"]), card, path)


def load_clip(package: str | os.PathLike | LoadedPackage, device: str = "cpu") -> ClipModel:
    """A zeroshot package (folder, zip, or an already loaded package) as a ``ClipModel`` in eval mode;
    the card and the weights' sha256 are checked (``engine.package``)."""
    from ..errors import PackageError
    from ..package import LoadedPackage, load_package

    pkg = package if isinstance(package, LoadedPackage) else load_package(package, device=device)
    if pkg.card.task != "zeroshot":
        raise PackageError(f"{pkg.path}: '{pkg.card.name}' is a {pkg.card.task} package, not a CLIP (zeroshot) "
                           "package; make one with 'sarmae convert CKPT --clip ARCH' or 'sarmae init --clip ARCH'")
    return clip_model(pkg.model.eval(), pkg.card, pkg.path)


def save_clip_package(model: Any, card: ModelCard, out_dir: str | os.PathLike, overwrite: bool = False,
                      extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the whole open_clip state dict and the card as a package (atomically, ``engine.package``)."""
    from ..package import save_package

    return save_package(model.state_dict(), card, out_dir, overwrite=overwrite, extra_files=extra_files)


def prepare_images(x: np.ndarray, card: ModelCard, valid: np.ndarray | None = None,
                   where: str = "the image") -> Any:
    """Images in the card's units and bands -> the image tower's input, a float32 tensor (B, 3, S, S).

    ``x``: (C, H, W) or (B, C, H, W), C = the card's bands; NaN (or ``valid`` False, (H, W) or
    (B, H, W)) marks nodata, which becomes 0 after scaling. The scaling is the card's input
    contract (``engine.radiometry.Radiometry``: per-band clip, min-max stretch, derived channels,
    mean/std); images of another size are resized bilinearly to the model's input size.
    """
    import torch

    from ..radiometry import Radiometry

    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
        valid = None if valid is None else np.asarray(valid)[None]
    bands = list(card.input.bands)
    if x.ndim != 4 or x.shape[1] != len(bands):
        raise RasterInputError(f"{where}: shape {x.shape} does not fit '{card.name}', which reads "
                               f"{len(bands)} band(s) ({'+'.join(bands)}) as (C, H, W) or (B, C, H, W) arrays")
    if valid is None:
        valid = np.isfinite(x).all(axis=1)
    radiometry = Radiometry(card.input, card.input.units, bands, source=where)
    out = np.stack([radiometry.apply(np.nan_to_num(xi), np.asarray(vi, bool)) for xi, vi in zip(x, valid, strict=True)])
    t = torch.from_numpy(out)
    size = card.input_size
    if tuple(t.shape[-2:]) != size:
        t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return t
