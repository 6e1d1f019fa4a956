"""Datasets, samplers, SARE noise and synthetic scenes for training.

``build_pretrain_data`` turns a ``DataConfig`` into the pretraining dataset and its sampler::

    dataset, sampler = build_pretrain_data(cfg, batch_size, rank, world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        worker_init_fn=functools.partial(worker_init_fn, seed=cfg.seed, rank=rank))

Every item is ``{"sar": (in_chans, S, S) in [0, 1], "optical": (3, S, S) (zeros when unpaired),
"paired": bool tensor, "source": str}``, so the default collate works for all of them.
"""

from __future__ import annotations

import bisect
import logging
import os
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from training.data.chips import ChipFolderDataset, check_mixing
from training.data.config import DataConfig, DataError
from training.data.pairs import PairedChipDataset, load_pair_index
from training.data.sampler import PretrainSampler
from training.data.scaling import split_key
from training.data.windows import RasterWindowDataset, expand_paths

__all__ = ["DataConfig", "DataError", "PretrainDataset", "PretrainSampler", "build_pretrain_data",
           "worker_init_fn"]

log = logging.getLogger(__name__)


class PretrainDataset(ConcatDataset):
    """``[paired..., unpaired...]``: indices ``< n_paired`` are paired. Keys are ``(epoch, index)``
    (from ``PretrainSampler``) or plain indices; the epoch is passed on to the part holding it."""

    def __init__(self, paired: list[Dataset], unpaired: list[Dataset]) -> None:
        super().__init__([d for d in paired + unpaired if len(d) > 0])  # type: ignore[arg-type]
        self.n_paired = sum(len(d) for d in paired)  # type: ignore[arg-type]
        self.n_unpaired = sum(len(d) for d in unpaired)  # type: ignore[arg-type]

    def scaling_counts(self) -> dict[str, int]:
        """Items per SAR scaling kind: "uint8" (8-bit display, x / 255), "uint16" (x / 65535) or
        "db" (calibrated, dB clipped to ``clip_db``): what a model package's input contract says."""
        out: dict[str, int] = {}
        for d in self.datasets:
            for kind, n in d.scaling_counts().items():  # type: ignore[attr-defined]
                out[kind] = out.get(kind, 0) + n
        return out

    def input_scaling(self) -> str:
        """The one scaling kind of every item ("uint8", "uint16" or "db"), or "mixed"."""
        kinds = self.scaling_counts()
        return next(iter(kinds)) if len(kinds) == 1 else "mixed"

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:  # type: ignore[override]
        epoch, index = split_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        d = bisect.bisect_right(self.cumulative_sizes, index)
        local = index - (self.cumulative_sizes[d - 1] if d > 0 else 0)
        return self.datasets[d][(epoch, local)]


def _split_paths(paths: list[str]) -> tuple[list[str], list[str]]:
    """Config paths (globs expanded) -> (chip folders, large raster files)."""
    folders, rasters = [], []
    for p in expand_paths(paths):
        if os.path.isdir(p):
            folders.append(p)
        elif os.path.isfile(p):
            rasters.append(p)
        else:
            raise DataError(f"data path not found: {p} (working directory {os.getcwd()}). Give chip "
                            "folders and/or raster files.")
    return folders, rasters


def build_pretrain_data(cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                        epoch_size: int | None = None) -> tuple[PretrainDataset, PretrainSampler]:
    """The pretraining dataset (paired pairs, then unpaired chips and raster windows) and its sampler.

    Args:
        cfg: data settings; ``cfg.paths`` folders are chip folders, files are large rasters.
        batch_size: per-rank batch size.
        rank, world_size: this process's place in DDP.
        epoch_size: global samples per epoch (None: the dataset size).

    Raises:
        DataError: nothing found, unusable inputs (see the datasets), mixed channel counts, or a
            global batch larger than the dataset.
    """
    paired: list[Dataset] = []
    unpaired: list[Dataset] = []
    folders, rasters = _split_paths(cfg.paths)
    if cfg.pairs is not None:
        index = load_pair_index(cfg.pairs)
        if index.paired:
            paired.append(PairedChipDataset(index.paired, cfg))
        if index.unpaired:
            unpaired.append(ChipFolderDataset(index.unpaired, cfg))
    if folders:
        unpaired.append(ChipFolderDataset(folders, cfg))
    if rasters:
        unpaired.append(RasterWindowDataset(rasters, cfg))
    groups: dict[int, list[str]] = {}
    for d in paired + unpaired:
        for n, files in d.channel_groups.items():  # type: ignore[attr-defined]
            groups.setdefault(n, []).extend(files)
    check_mixing(groups, cfg.in_chans)
    if sum(len(d) for d in paired + unpaired) == 0:  # type: ignore[arg-type]
        where = ", ".join(cfg.paths + ([cfg.pairs] if cfg.pairs else [])) or "(no path given)"
        raise DataError(f"no training data found in {where}: give chip folders, raster files or a pair index")
    dataset = PretrainDataset(paired, unpaired)
    global_batch = batch_size * world_size
    if global_batch > len(dataset):
        raise DataError(f"the batch ({batch_size} x {world_size} rank(s) = {global_batch}) is larger than "
                        f"the dataset ({len(dataset)} items): lower the batch size or add data")
    sampler = PretrainSampler(dataset.n_paired, dataset.n_unpaired, batch_size=batch_size,
                              paired_ratio=cfg.paired_ratio, epoch_size=epoch_size, seed=cfg.seed,
                              rank=rank, world_size=world_size)
    if dataset.input_scaling() == "mixed":
        log.warning("the SAR inputs mix scalings %s (uint8: 8-bit display / 255, uint16: / 65535, db: "
                    "calibrated, dB in %s): one model cannot state a single input contract for them",
                    dataset.scaling_counts(), list(cfg.clip_db))
    repeats = sampler.n_paired_per_epoch / max(dataset.n_paired, 1)
    if dataset.n_paired and dataset.n_unpaired and repeats > 2.0:
        log.warning("paired_ratio %.2f draws each of the %d pairs about %.0f times per epoch: "
                    "lower paired_ratio if that is not intended", cfg.paired_ratio, dataset.n_paired, repeats)
    log.info("pretraining data: %d paired, %d unpaired items (%s); %d samples per epoch, %.0f%% paired",
             dataset.n_paired, dataset.n_unpaired, describe(paired + unpaired), sampler.epoch_size,
             100.0 * sampler.n_paired_per_epoch / sampler.epoch_size)
    return dataset, sampler


def describe(datasets: list[Dataset]) -> str:
    """A short account of where the items come from."""
    parts = []
    for d in datasets:
        if isinstance(d, RasterWindowDataset):
            parts.append(f"{len(d.rasters)} raster(s) x {d.cfg.windows_per_raster} windows")
        elif isinstance(d, PairedChipDataset):
            parts.append(f"{len(d)} SAR/optical pairs")
        else:
            parts.append(f"{len(d)} chips")  # type: ignore[arg-type]
    return ", ".join(parts)


def worker_init_fn(worker_id: int, seed: int = 0, rank: int = 0) -> None:
    """Seed ``random``, numpy's global RNG and torch in a DataLoader worker, distinct per
    (seed, rank, worker) and per epoch (through torch's per-worker base seed).

    Use ``functools.partial(worker_init_fn, seed=cfg.seed, rank=rank)``. The datasets themselves
    draw from generators keyed by (seed, epoch, index) and do not depend on this.
    """
    base = torch.initial_seed() % 2**32  # torch sets it to base_seed + worker_id in each worker
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), int(worker_id), base]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed((int(state[0]) << 32) | int(state[1]))
