"""Backends that run a loaded model on batches of normalised windows: torch or onnxruntime.

Both take (B, C, H, W) float32 numpy batches and return numpy outputs whose meaning depends on the
task (``TaskOutput`` below), so the pipeline never cares which one runs. ``choose_backend('auto')``
times both once per model and machine and caches the answer.

This module never imports torch: the torch backend, the ONNX export and the device choice live in
``engine.torch_backend`` and are re-exported here lazily (``TorchBackend``, ``InferenceModule``,
``export_onnx``, ``pick_device``), so a run through onnxruntime (explicit, or ``auto`` once its
choice is cached) loads neither torch nor the package's weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SarmaeError
from .precision import resolve_precision
from .tasks import TASKS, get_task

_TORCH_NAMES = ("TorchBackend", "InferenceModule", "export_onnx", "pick_device")


def __getattr__(name: str) -> Any:  # lazy re-exports of the torch-side names (PEP 562)
    if name in _TORCH_NAMES:
        from . import torch_backend

        return getattr(torch_backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def torch_installed() -> bool:
    """Whether torch can be imported here (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


class OnnxBackend:
    """onnxruntime on a model.onnx (its bytes, or the file's path: then it is not copied through Python).

    CPU memory: onnxruntime's CPU arena keeps the chunks it allocated for reuse; with the fixed batch
    shape of a run its size is set by the batch (~60 MB for 8 windows of 224 px, ViT-Tiny + UPerNet
    head), not by the raster, and turning it off did not lower the peak (benchmarks/bench_inference.py).
    """

    name = "onnxruntime"

    def __init__(self, onnx_model: bytes | str | os.PathLike, task: str, device: str = "auto",
                 threads: int | None = None, precision: str = "fp32"):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - a dependency of sarmae
            raise SarmaeError("onnxruntime is not installed; pip install onnxruntime, or use --backend torch") from e
        self.ort = ort
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        model = str(onnx_model) if isinstance(onnx_model, (str, os.PathLike)) else onnx_model
        self.session = ort.InferenceSession(model, opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.task, self.precision = task, precision

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def describe(self) -> str:
        return (f"onnxruntime {self.ort.__version__} ({', '.join(self.session.get_providers())})"
                + (", int8 model" if self.precision == "int8" else ""))


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sarmae" / "backend_choice.json"


def _gpu_names() -> str:
    """NVIDIA GPUs as the driver lists them (Linux), without importing torch or initialising CUDA."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            names += [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("Model:")]
        except OSError:
            continue
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return ",".join(names or ["nogpu"]) + (f"[visible {visible}]" if visible is not None else "")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "none"


def machine_key() -> str:
    """This machine and its runtimes, computed without importing torch (the cached choice of
    ``auto`` must be readable by a run that then uses onnxruntime only)."""
    return (f"{platform.node()}|{platform.machine()}|{os.cpu_count()}|{_gpu_names()}|torch{_version('torch')}"
            f"|onnxruntime{_version('onnxruntime')}")


def measure(backend, batch: np.ndarray, repeats: int = 3) -> float:
    """Seconds per batch (best of ``repeats`` after one warm-up)."""
    backend.run(batch)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.run(batch)
        best = min(best, time.perf_counter() - t0)
    return best


def onnx_tasks() -> list[str]:
    """The registered tasks whose models run from model.onnx (``Task.onnx``)."""
    return [n for n in TASKS if TASKS[n].onnx]


def _torch_backend(package, task: str, device: str, threads: int | None, mask_ratio: float = 0.75):
    if not torch_installed():
        onnx = get_task(task).onnx
        hint = ("; this package has a model.onnx: use --backend onnxruntime" if package.has_onnx and onnx
                else f"; '{task}' models need torch" if not onnx
                else f"; or add a model.onnx with 'sarmae export {package.path}' where torch is installed")
        raise SarmaeError("torch is not installed in this environment (pip install torch)" + hint)
    from .torch_backend import TorchBackend

    return TorchBackend(package.model, task, device, threads=threads, mask_ratio=mask_ratio)


def _onnx_backend(package, task: str, device: str, threads: int | None, precision: str = "fp32"):
    if not package.has_onnx:
        raise SarmaeError(f"{package.path}: the package has no model.onnx; run 'sarmae export {package.path}' first")
    if not get_task(task).onnx:
        raise SarmaeError(f"'{task}' models run with --backend torch only (onnxruntime: {', '.join(onnx_tasks())})")
    return OnnxBackend(package.onnx_model(precision), task, device, threads, precision)


def _int8_backend(kind: str, package, task: str, threads: int | None, why: str, log):
    """The package's model.int8.onnx through onnxruntime on the CPU (int8 is the CPU path)."""
    if kind == "torch":
        raise SarmaeError(f"{package.path}: int8 runs the package's model.int8.onnx through onnxruntime; use "
                          "--backend onnxruntime (or auto) with --precision int8, or --precision fp32 with --backend torch")
    if kind not in ("auto", "onnx", "onnxruntime"):
        raise SarmaeError(f"unknown backend '{kind}'; use torch, onnxruntime or auto")
    log(f"precision int8 ({why}): model.int8.onnx through onnxruntime on the CPU")
    return _onnx_backend(package, task, "cpu", threads, "int8")


def make_backend(task, package, opts, size: int, log=print, kind: str | None = None):
    """The backend of one run, the same wherever a run starts (``run_inference``, the worker's cache,
    torchrun ranks, ``run_batch``): the task's own (``Task.backend``), else ``choose_backend`` with
    every option that changes the result (backend, device, batch, threads, window ``size``, mask
    ratio, precision). ``kind`` overrides ``opts.backend`` (torchrun: the backend rank 0 chose)."""
    own = task.backend(package, opts)
    if own is not None:
        return own
    shape = (opts.batch_size, package.card.in_chans, size, size)
    return choose_backend(kind or opts.backend, package, opts.device, shape, opts.threads, log=log,
                          mask_ratio=opts.mask_ratio, precision=opts.precision)


def choose_backend(kind: str, package, device: str, batch_shape: tuple[int, ...], threads: int | None = None,
                   log=print, mask_ratio: float = 0.75, precision: str = "fp32"):
    """Build the backend named by ``kind`` (torch | onnxruntime | auto) at ``precision`` (fp32 |
    int8 | auto: ``engine.precision.resolve_precision``; int8 is the package's model.int8.onnx
    through onnxruntime).

    ``auto`` uses onnxruntime only when the package holds a model.onnx and the task supports it;
    it times both on one batch the first time and caches the faster per (model sha256, machine,
    device, threads, batch shape). Without torch installed, ``auto`` is onnxruntime. Only the torch
    backend touches ``package.model`` (torch and the weights are loaded then).
    """
    task = package.card.task
    if precision != "fp32":
        chosen_precision, why = resolve_precision(precision, package, device)
        if chosen_precision == "int8":
            return _int8_backend(kind, package, task, threads, why, log)
        if getattr(package, "has_int8", False):  # a decision worth a line only when int8 was there to take
            log(f"precision fp32 ({why})")
    onnx_ok = package.has_onnx and get_task(task).onnx
    if kind == "torch" or (kind == "auto" and not onnx_ok):
        return _torch_backend(package, task, device, threads, mask_ratio)
    if kind in ("onnx", "onnxruntime"):
        return _onnx_backend(package, task, device, threads)
    if kind != "auto":
        raise SarmaeError(f"unknown backend '{kind}'; use torch, onnxruntime or auto")
    if not torch_installed():
        log("backend auto: torch is not installed -> onnxruntime")
        return _onnx_backend(package, task, device, threads)
    key = f"{package.card.weights['sha256']}|{machine_key()}|{device}|threads {threads}|{batch_shape}"
    cache = _cache_path()
    try:
        choices = json.loads(cache.read_text())
    except (OSError, ValueError):
        choices = {}
    if key in choices:
        chosen = choices[key]["backend"]
    else:
        batch = np.random.default_rng(0).standard_normal(batch_shape).astype(np.float32)
        tb = _torch_backend(package, task, device, threads)
        ob = _onnx_backend(package, task, device, threads)
        t_torch, t_onnx = measure(tb, batch), measure(ob, batch)
        chosen = "onnxruntime" if t_onnx < t_torch else "torch"
        choices[key] = {"backend": chosen, "torch_s": t_torch, "onnx_s": t_onnx}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(choices, indent=1))
            os.replace(tmp, cache)
        except OSError:
            pass
        log(f"backend auto: torch {t_torch * 1000:.0f} ms/batch, onnxruntime {t_onnx * 1000:.0f} ms/batch -> {chosen}")
        return ob if chosen == "onnxruntime" else tb
    log(f"backend auto: {chosen} (cached choice for this model and machine, {cache})")
    return choose_backend(chosen, package, device, batch_shape, threads, log, mask_ratio)
