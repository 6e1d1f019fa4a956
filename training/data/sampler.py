"""The epoch order of pretraining: ~``paired_ratio`` paired samples, split across ranks, resumable.

The dataset is ``[paired..., unpaired...]`` (``build_pretrain_data``): indices ``< n_paired`` are
paired. Each epoch draws one GLOBAL order of ``epoch_size`` keys from ``(seed, epoch)`` alone:

- ``round(paired_ratio * epoch_size)`` paired indices and the rest unpaired (all paired or all
  unpaired when one side is empty); each side walks through fresh permutations of its items, so an
  item repeats within an epoch only after all of its side have been drawn;
- the two sides are shuffled together;
- ``epoch_size`` is rounded down to a multiple of ``batch_size * world_size``.

Rank ``r`` takes keys ``r, r + W, r + 2W, ...`` (W = world size), so global batch ``k`` (the k-th
batch of every rank together) is the contiguous block ``[k*B*W, (k+1)*B*W)`` of the global order:
the same order whatever the world size, and each key of the epoch is used exactly once.

Keys are ``(epoch, index)`` tuples: the datasets seed their random windows and crops with them, so
no dataset needs to be told the epoch (persistent workers are fine).

Resuming::

    sampler.load_state_dict(ckpt["sampler"])       # epoch e, position p
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)                     # same epoch as restored: keeps position p
        for batch in loader:                         # yields the rest of the epoch
            ...                                      # one optimizer step
            sampler.advance()                        # one batch per rank consumed
            ckpt["sampler"] = sampler.state_dict()
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from training.data.config import DataError

_ORDER_STREAM = 7  # keeps the epoch order's random stream apart from the items' streams


def _cycle(rng: np.random.Generator, n_items: int, n_draws: int) -> np.ndarray:
    """``n_draws`` indices from successive fresh permutations of ``range(n_items)``."""
    if n_draws == 0 or n_items == 0:
        return np.zeros(0, dtype=np.int64)
    reps = -(-n_draws // n_items)
    return np.concatenate([rng.permutation(n_items) for _ in range(reps)])[:n_draws]


class PretrainSampler(Sampler):
    """Yields this rank's ``(epoch, index)`` keys for the current epoch, from the saved position.

    Args:
        n_paired: paired items (dataset indices ``[0, n_paired)``).
        n_unpaired: unpaired items (indices ``[n_paired, n_paired + n_unpaired)``).
        batch_size: per-rank batch size.
        paired_ratio: fraction of each epoch drawn from the paired items.
        epoch_size: global samples per epoch (None: the dataset size), rounded down to a multiple
            of ``batch_size * world_size``.
        seed: the order is a function of (seed, epoch) only.
        rank, world_size: this process's share (DDP).
    """

    def __init__(self, n_paired: int, n_unpaired: int, *, batch_size: int, paired_ratio: float = 0.7,
                 epoch_size: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if n_paired < 0 or n_unpaired < 0 or n_paired + n_unpaired == 0:
            raise DataError(f"nothing to sample: {n_paired} paired and {n_unpaired} unpaired items")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad batch/rank settings: batch_size {batch_size}, rank {rank}, world size {world_size}")
        if not 0.0 <= paired_ratio <= 1.0:
            raise DataError(f"paired_ratio must be in [0, 1], not {paired_ratio}")
        self.n_paired, self.n_unpaired = int(n_paired), int(n_unpaired)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.paired_ratio, self.seed = float(paired_ratio), int(seed)
        requested = self.n_paired + self.n_unpaired if epoch_size is None else int(epoch_size)
        self.global_batch = self.batch_size * self.world_size
        self.epoch_size = requested // self.global_batch * self.global_batch
        if self.epoch_size == 0:
            raise DataError(f"the global batch ({self.batch_size} x {self.world_size} rank(s) = "
                            f"{self.global_batch}) is larger than the epoch ({requested} samples): "
                            "lower the batch size or add data")
        self.epoch = 0
        self.position = 0  # global samples of this epoch already consumed (a multiple of global_batch)

    @property
    def n_paired_per_epoch(self) -> int:
        """Paired samples in every epoch's global order."""
        if self.n_paired == 0:
            return 0
        if self.n_unpaired == 0:
            return self.epoch_size
        return int(round(self.paired_ratio * self.epoch_size))

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a full epoch (the same for every rank)."""
        return self.epoch_size // self.global_batch

    @property
    def batches_done(self) -> int:
        """Batches per rank already consumed in the current epoch."""
        return self.position // self.global_batch

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's global order of dataset indices (every rank, ``epoch_size`` of them)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, _ORDER_STREAM])
        n_p = self.n_paired_per_epoch
        keys = np.concatenate([_cycle(rng, self.n_paired, n_p),
                               self.n_paired + _cycle(rng, self.n_unpaired, self.epoch_size - n_p)])
        return keys[rng.permutation(self.epoch_size)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        share = self.global_order()[self.position + self.rank::self.world_size]
        epoch = self.epoch
        return iter([(epoch, int(i)) for i in share])

    def __len__(self) -> int:
        """Keys this rank still yields in the current epoch (from the position)."""
        return (self.epoch_size - self.position) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; the epoch currently held (e.g. just restored by
        ``load_state_dict``) keeps its position, so a resumed run continues mid-epoch."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def advance(self, n_batches: int = 1) -> None:
        """Record that every rank consumed ``n_batches`` more batches of the current epoch."""
        self.position = min(self.position + int(n_batches) * self.global_batch, self.epoch_size)

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint: where the run is, and what the order depends on."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "epoch_size": self.epoch_size, "n_paired": self.n_paired, "n_unpaired": self.n_unpaired,
                "paired_ratio": self.paired_ratio, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; the order must be the same one (same data and settings).

        Raises:
            DataError: the saved order differs (other seed, data, ratio or epoch size), or the
                position is not on a batch boundary of this run's global batch.
        """
        same = ("seed", "epoch_size", "n_paired", "n_unpaired", "paired_ratio")
        diff = [f"{k} {state.get(k)} -> {getattr(self, k)}" for k in same if state.get(k) != getattr(self, k)]
        if diff:
            raise DataError("cannot resume the data order mid-epoch: " + ", ".join(diff) +
                            ". Resume with the same data and settings, or start a new run.")
        position = int(state["position"])
        if position % self.global_batch:
            raise DataError(f"saved position {position} is not a multiple of the global batch "
                            f"{self.global_batch}: resume with the same batch_size x world_size")
        self.epoch, self.position = int(state["epoch"]), position
