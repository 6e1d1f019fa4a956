"""Resumable checkpoints with plain data only (loadable with ``torch.load(weights_only=True)``).

A checkpoint holds: model (unwrapped MAE state dict), sarc_head, optimizer, scaler, epoch, step,
sampler position, RNG states (torch CPU/CUDA as tensors, numpy and python as plain lists), the
resolved config as a dict, and the input contract the data implies (used by ``sarmae convert``).
Files are written to a temporary sibling and renamed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` through the engine's publishing (``engine.publish``): a temporary sibling,
    read back (every member's CRC: torch checkpoints are zip files) before it replaces ``path``;
    a full disk raises ``OutputError`` ("disk full while writing ...") and keeps the last checkpoint."""
    import zipfile

    from engine.publish import disk_error, publish, remove_temporary, temp_sibling

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        torch.save(state, tmp)
        with zipfile.ZipFile(tmp) as z:
            bad = z.testzip()
        if bad is not None:
            raise OSError(f"the written checkpoint does not read back (member {bad})")
    except BaseException as e:
        remove_temporary(tmp)
        if isinstance(e, Exception):
            raise disk_error(path, e) from e
        raise
    return publish(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``save_checkpoint``; an empty, truncated or foreign file is refused
    with a sentence naming it and the earlier checkpoints of its folder to resume from instead."""
    from engine.errors import SarmaeError

    path = Path(path)
    earlier = sorted(path.parent.glob("checkpoint-*.pt"), key=lambda p: p.stat().st_mtime)
    fix = (f"copy the latest good one over it (e.g. cp {earlier[-1]} {path}) and resume again"
           if earlier else "start the run again without --resume (or in a new --output)")
    size = path.stat().st_size
    if size == 0:
        raise SarmaeError(f"{path} is empty (0 bytes): it was not written to the end (the disk was full or the "
                          f"run was killed while saving); {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on a damaged file
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SarmaeError(f"{path} ({size} bytes) is truncated or damaged ({reason}); {fix}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise SarmaeError(f"{path} is not a sarmae pretraining checkpoint (no model state); {fix}")
    return state
