"""Running a rank's windows in the batches of the single-process run (``engine.distributed``).

On CPU, a window's model output depends (in the last bits) on the size of the batch it is computed
in and on its slot, though not on the other windows' content: GEMM and convolution kernels pick
their blocking from the batch size. ``BatchAlignedBackend`` therefore runs each window in a batch
of the size, and at the slot, it has in the single run, which also gives reconstruct the same
random masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import SarmaeError


class BatchAlignedBackend:
    """Run a rank's windows in batches of the size, and at the slots, of the single-process run.

    The rank's windows are the global plan's windows ``first_window, first_window + 1, ...``,
    arriving in that order. In the single run, window ``g`` is at slot ``g % batch_size`` of a batch
    of ``batch_size`` windows, or of ``total_windows % batch_size`` for the last, partial batch.
    Since a window's output depends on its batch's size and its slot but not on the other windows,
    each batch the rank hands over is run as one batch of that size with every window at its slot
    (consecutive windows have distinct slots), the free slots filled with zero windows: no extra
    model runs except where a rank's batch reaches into the single run's last, partial batch.
    """

    def __init__(self, inner, first_window: int, total_windows: int, batch_size: int):
        self.inner = inner
        self.next = first_window
        self.total = total_windows
        self.batch = batch_size
        self.consumed = 0
        self.inner_runs = 0

    def run(self, x: np.ndarray) -> Any:
        m, bs = len(x), self.batch
        g = np.arange(self.next, self.next + m)
        if m and g[-1] >= self.total:
            raise SarmaeError(f"internal error: window {g[-1]} beyond the plan's {self.total} windows")
        self.next += m
        self.consumed += m
        last_q = (self.total - 1) // bs
        sizes = np.where(g // bs == last_q, self.total - last_q * bs, bs)  # the size of each window's batch
        out: list[Any] = [None] * m
        for size in np.unique(sizes):
            chosen = np.nonzero(sizes == size)[0]
            for c in range(0, len(chosen), bs):  # at most bs consecutive windows: distinct slots
                sel = chosen[c:c + bs]
                slots = g[sel] % bs
                buf = np.zeros((int(size), *x.shape[1:]), x.dtype)
                buf[slots] = x[sel]
                y = self.inner.run(buf)
                self.inner_runs += 1
                for i, s in zip(sel, slots):
                    out[i] = y[s]
        if m and isinstance(out[0], np.ndarray):
            return np.stack(out)
        return out

    def describe(self) -> str:
        return self.inner.describe()
