"""Fixtures shared by the engine tests: tiny model packages, built once per session.

``tiny_package(task, ...)`` returns the path of a package folder with a 2-block ViT-Tiny encoder
(random weights, fixed seed) at a small input size, so that a forward pass costs milliseconds.
Packages are cached by their arguments: treat them as read-only (copy one to ``tmp_path`` before
damaging it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def build_tiny_package(dest: Path, task: str = "segment", *, in_chans: int = 2, units: str = "db",
                       img_size: int = 32, bands: list[str] | None = None,
                       classes: tuple[str, ...] = ("water", "land"), seed: int = 0) -> Path:
    """Write a small random-weight package (depth-2 ViT-Tiny encoder) to ``dest`` and return it."""
    import torch

    from engine.models import build_from_architecture, create_model
    from engine.package import default_classes, default_input, new_card, save_package

    torch.manual_seed(seed)
    enc = create_model("vit_tiny_patch16", in_chans=in_chans, img_size=img_size, depth=2)
    arch: dict = {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict()}
    if task in ("segment", "detect"):
        arch["head"] = {"channels": 32} if task == "segment" else {}
    if task == "reconstruct":
        arch["name"] = "mae_vit_tiny_patch16"
        arch["decoder"] = {"embed_dim": 32, "depth": 1, "num_heads": 1, "norm_pix_loss": False}
    cls = default_classes(list(classes)) if task in ("classify", "segment", "detect") else []
    model = build_from_architecture(arch, task, len(cls))
    card = new_card(f"tiny-{task}", task, arch, default_input(in_chans, units, bands), cls,
                    {"training": f"none: random initialisation (seed {seed}), unit tests"})
    save_package(model.state_dict(), card, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``tiny_package("segment", in_chans=1, units="db", img_size=32)`` -> package path.

    Built once per distinct argument set per session; do not modify the returned folder.
    """
    cache: dict[tuple, Path] = {}

    def make(task: str = "segment", *, in_chans: int = 2, units: str = "db", img_size: int = 32,
             bands: tuple[str, ...] | None = None, classes: tuple[str, ...] = ("water", "land")) -> Path:
        key = (task, in_chans, units, img_size, bands, classes)
        if key not in cache:
            dest = tmp_path_factory.mktemp(f"pkg_{task}") / "model"
            cache[key] = build_tiny_package(dest, task, in_chans=in_chans, units=units, img_size=img_size,
                                            bands=list(bands) if bands else None, classes=classes)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_clip_package(tmp_path_factory) -> Path:
    """A CLIP (zeroshot) package of ``engine.clip.TINY_CONFIG`` (random weights, seed 0; 32 px input,
    bands VV+VH, SARCLIP scaling). Read-only: copy it before changing it."""
    import torch

    from engine.clip import TINY_CONFIG, build_clip, clip_card, save_clip_package

    torch.manual_seed(0)
    card = clip_card("tiny-clip", config=TINY_CONFIG, provenance={"training": "none: unit tests"})
    return save_clip_package(build_clip(card), card, tmp_path_factory.mktemp("clip") / "tiny_clip")
