"""The ``torchrun`` process group: joining it, leaving it, and running a step on every rank together.

``torchrun --nproc_per_node N`` starts the same entry point N times (ranks); ``dist_info`` joins
them with ``torch.distributed`` (gloo on CPU, NCCL for CUDA tensors) and is a no-op in a plain
process. ``agreed`` runs a step on every rank and makes all of them stop together when one fails.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from typing import Any

from . import errors as _errors
from .errors import SarmaeError

_DEFAULT_TIMEOUT_S = 24 * 3600  # a rank may wait this long for the others (torchrun kills the rest if one dies)


def dist_info() -> tuple[int, int, bool]:
    """``(rank, world_size, initialised)``, joining the process group of ``torchrun`` if needed.

    Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``
    in the environment, ``WORLD_SIZE > 1``) this initialises ``torch.distributed`` once: gloo when
    CUDA is absent, else gloo for CPU tensors and NCCL for CUDA tensors, with this process bound
    to GPU ``LOCAL_RANK``. The collectives wait up to ``SARMAE_DIST_TIMEOUT_S`` seconds (default
    24 h: ranks wait for each other's parts). An already initialised group is used as it is.
    Without that environment it does nothing and returns ``(0, 1, False)``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError as e:
        raise SarmaeError(f"WORLD_SIZE / RANK must be integers (set by torchrun), got {env.get('WORLD_SIZE')!r}, "
                          f"{env.get('RANK')!r}") from e
    if world <= 1:
        return 0, 1, False
    if not dist.is_available():
        raise SarmaeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise SarmaeError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; start the ranks with "
                          "torchrun --nproc_per_node N (it sets them)")
    from datetime import timedelta

    import torch

    timeout = timedelta(seconds=float(env.get("SARMAE_DIST_TIMEOUT_S", _DEFAULT_TIMEOUT_S)))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    atexit.register(dist_shutdown)
    return rank, world, True


def dist_shutdown(timeout_s: float = 60.0) -> None:
    """Leave the process group, every rank together: a barrier (gloo: at most ``timeout_s``), then
    ``destroy_process_group`` while the interpreter is fully alive (a gloo group left to interpreter
    finalisation can abort the process). Registered at exit by ``dist_info``; an entry point may call
    it at its end. Does nothing without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":  # a rank that failed alone must not wait for the others forever
        from datetime import timedelta

        with contextlib.suppress(Exception):
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def error_record(e: BaseException) -> dict[str, str]:
    return {"type": type(e).__name__, "message": str(e) or repr(e)}


def rebuild_error(record: dict[str, str], rank: int) -> SarmaeError:
    """The error another rank raised, as an engine error of the same class when there is one."""
    cls = getattr(_errors, record["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, SarmaeError)):
        cls = SarmaeError
    msg = record["message"] if cls is not SarmaeError else f"{record['type']}: {record['message']}"
    return cls(f"rank {rank}: {msg}")


def agreed(fn) -> list[Any]:
    """Run ``fn`` on every rank and gather what each returned (also a barrier).

    If it raised on any rank, every rank raises: the failing rank its own exception, the others
    an engine error naming that rank, so that all of them stop together.
    """
    try:
        value, err = fn(), None
    except Exception as e:
        value, err = None, e
    gathered = all_gather({"value": value, "error": None if err is None else error_record(err)})
    if err is not None:
        raise err
    for r, g in enumerate(gathered):
        if g["error"] is not None:
            raise rebuild_error(g["error"], r)
    return [g["value"] for g in gathered]
