"""Chips -> the CLIP image tower's input, read ONE way for training and evaluation.

Each chip is read by the pretraining data rule (``training/data/chips.read_chip``: 8-bit display
chips x / 255; calibrated chips -> dB, clipped to the card's clip range; both in [0, 1]; dual-pol
chips ordered co-pol, cross-pol), its bands fitted to the card's (``map_channels``: one band is
repeated, a co-pol band kept alone), put back on the card's dB scale (``lo + y (hi - lo)``: exact
for calibrated chips; an 8-bit chip's 0..255 stands for the clip range) and handed to the engine's
``prepare_images`` (the card's input contract: channels, [-1, 1], resize), so training, evaluation
and ``sarmae infer`` scale alike. Unreadable chips are counted and left out (``ChipImages.bad``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger("sarmae.clip")


@dataclass
class ChipImages:
    x: torch.Tensor  # (N, 3, S, S) float16, the model's input
    keep: np.ndarray  # (N,) int: index of each image in the list given
    bad: list[str] = field(default_factory=list)  # "path: why" of chips that could not be read


def read_for_clip(paths: list[str], card, chunk: int = 256) -> ChipImages:
    """The chips ``paths`` as the model ``card`` sees them (module docstring)."""
    from engine.clip import prepare_images

    from ..data.chips import map_channels, read_chip, scan_chip
    from ..data.config import DataConfig

    lo, hi = (float(v) for v in card.input["clip"])
    cfg = DataConfig(clip_db=(lo, hi), in_chans=len(card.input["bands"]))
    bands = len(card.input["bands"])
    out, keep, bad, batch = [], [], [], []

    def flush() -> None:
        if batch:
            groups: dict[tuple, list[int]] = {}
            for j, a in enumerate(batch):
                groups.setdefault(a.shape, []).append(j)
            done: dict[int, torch.Tensor] = {}
            for idx in groups.values():
                t = prepare_images(np.stack([batch[j] for j in idx]), card, where="caption-table chips")
                done.update({j: t[k].half() for k, j in enumerate(idx)})
            out.extend(done[j] for j in range(len(batch)))
            batch.clear()

    gdal_log = logging.getLogger("rasterio._env")  # OpenSARShip's TIFF headers warn on every read
    level = gdal_log.level
    gdal_log.setLevel(logging.ERROR)
    try:
        for i, p in enumerate(paths):
            try:
                y = map_channels(read_chip(scan_chip(p), cfg), bands)
            except Exception as e:  # noqa: BLE001 - any unreadable chip is counted, named and skipped
                bad.append(f"{p}: {e}")
                continue
            batch.append(lo + y.astype(np.float32) * (hi - lo))
            keep.append(i)
            if len(batch) >= chunk:
                flush()
        flush()
    finally:
        gdal_log.setLevel(level)
    if bad:
        log.warning("%d chip(s) could not be read and were left out, e.g. %s", len(bad), bad[0])
    s = card.input_size
    x = torch.stack(out) if out else torch.zeros((0, 3, *s), dtype=torch.float16)
    return ChipImages(x, np.asarray(keep, dtype=np.int64), bad)


def augment(x: torch.Tensor, rngs: list[np.random.Generator]) -> torch.Tensor:
    """Random flips and 90-degree rotations, one generator per image (SAR chips have no preferred
    orientation). Generators drawn per sample (``data.scaling.item_rng``) make the augmentation of
    an image independent of how batches are split over processes or resumed."""
    out = x.clone()
    for i, rng in enumerate(rngs):
        xi = torch.flip(x[i], dims=(-1,)) if rng.random() < 0.5 else x[i]
        out[i] = torch.rot90(xi, int(rng.integers(4)), dims=(-2, -1))
    return out
