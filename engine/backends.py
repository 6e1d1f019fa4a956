"""Backends that run a loaded model on batches of normalised windows: torch or onnxruntime.

Both take (B, C, H, W) float32 numpy batches and return numpy outputs whose meaning depends on the
task (``TaskOutput`` below), so the pipeline never cares which one runs. ``choose_backend('auto')``
times both once per model and machine and caches the answer.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SarmaeError

# reconstruct draws random masks (torch generator) and detect returns variable-length lists: torch only
ONNX_TASKS = ("segment", "classify", "embed")


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SarmaeError(f"--device {device} asked for CUDA, but torch sees no usable GPU here; use --device cpu")
        if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise SarmaeError("--device mps asked for Apple's GPU, but it is not available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class InferenceModule(torch.nn.Module):
    """Wraps a task model so its forward returns one tensor (what ONNX export and the pipeline need).

    segment -> logits (B, K, H, W); classify -> logits (B, K); embed -> patch tokens (B, D, gh, gw);
    reconstruct -> (B, C, H, W) reconstruction (masked patches filled by the decoder, fixed seed).
    """

    def __init__(self, model: torch.nn.Module, task: str, mask_ratio: float = 0.75):
        super().__init__()
        self.model, self.task, self.mask_ratio = model, task, mask_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "embed":
            return self.model.forward_patch_tokens(x)
        if self.task == "reconstruct":
            # one mask pattern for every window: deterministic and independent of the batch size
            g = torch.Generator(device=x.device).manual_seed(0)
            n_tok = (x.shape[-2] // self.model.patch_size) * (x.shape[-1] // self.model.patch_size)
            noise = torch.rand(1, n_tok, generator=g, device=x.device).expand(x.shape[0], -1)
            return self.model.reconstruct(x, self.mask_ratio, noise=noise)
        return self.model(x)


class TorchBackend:
    name = "torch"

    def __init__(self, model, task: str, device: str = "auto", amp: bool = True, threads: int | None = None,
                 mask_ratio: float = 0.75):
        self.torch = torch
        self.device = pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.task = task
        self.model = model.to(self.device).eval()
        self.module = InferenceModule(self.model, task, mask_ratio).eval()
        # autocast only on GPUs: bf16 where supported, else fp16; CPU stays fp32 (exact, and not slower here)
        self.amp_dtype = None
        if amp and self.device.startswith("cuda"):
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def run(self, batch: np.ndarray) -> Any:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        with torch.inference_mode():
            if self.amp_dtype is not None:
                with torch.autocast(device_type="cuda", dtype=self.amp_dtype):
                    y = self.module(x) if self.task != "detect" else self.model(x)
            else:
                y = self.module(x) if self.task != "detect" else self.model(x)
        if self.task == "detect":
            return [{k: v.float().cpu().numpy() for k, v in d.items()} for d in y]
        return y.float().cpu().numpy()

    def describe(self) -> str:
        return f"torch {self.torch.__version__} on {self.device}" + (f" ({self.amp_dtype})" if self.amp_dtype else "")


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, onnx_bytes: bytes, task: str, device: str = "auto", threads: int | None = None):
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
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.task = task

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def describe(self) -> str:
        return f"onnxruntime {self.ort.__version__} ({', '.join(self.session.get_providers())})"


def export_onnx(model, task: str, in_chans: int, size: tuple[int, int], card_json: str, opset: int = 17) -> bytes:
    """Export the task model (batch dimension dynamic) to ONNX bytes with the card as metadata."""
    import io

    import onnx

    if task not in ONNX_TASKS:
        raise SarmaeError(f"ONNX export supports {', '.join(ONNX_TASKS)}; '{task}' models run with --backend torch")
    module = InferenceModule(model.cpu().eval(), task).eval()
    dummy = torch.zeros(1, in_chans, *size)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (dummy,), buf, input_names=["image"], output_names=["output"],
                          dynamic_axes={"image": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    for k, v in (("sarmae_model_card", card_json), ("sarmae_task", task)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto.SerializeToString()


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sarmae" / "backend_choice.json"


def machine_key() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "nogpu"
    return f"{platform.node()}|{platform.machine()}|{os.cpu_count()}|{gpu}|torch{torch.__version__}"


def measure(backend, batch: np.ndarray, repeats: int = 3) -> float:
    """Seconds per batch (best of ``repeats`` after one warm-up)."""
    backend.run(batch)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.run(batch)
        best = min(best, time.perf_counter() - t0)
    return best


def choose_backend(kind: str, package, device: str, batch_shape: tuple[int, ...], threads: int | None = None,
                   log=print, mask_ratio: float = 0.75):
    """Build the backend named by ``kind`` (torch | onnxruntime | auto).

    ``auto`` uses onnxruntime only when the package holds a model.onnx and the task supports it;
    it times both on one batch the first time and caches the faster per (model sha256, machine).
    """
    task = package.card.task
    if kind == "torch" or (kind == "auto" and (not package.has_onnx or task not in ONNX_TASKS)):
        return TorchBackend(package.model, task, device, threads=threads, mask_ratio=mask_ratio)
    if kind in ("onnx", "onnxruntime"):
        if not package.has_onnx:
            raise SarmaeError(f"{package.path}: the package has no model.onnx; run 'sarmae export {package.path}' first")
        return OnnxBackend(package.read_onnx(), task, device, threads)
    if kind != "auto":
        raise SarmaeError(f"unknown backend '{kind}'; use torch, onnxruntime or auto")
    key = f"{package.card.weights['sha256']}|{machine_key()}|{batch_shape}"
    cache = _cache_path()
    try:
        choices = json.loads(cache.read_text())
    except (OSError, ValueError):
        choices = {}
    if key in choices:
        chosen = choices[key]["backend"]
    else:
        batch = np.random.default_rng(0).standard_normal(batch_shape).astype(np.float32)
        tb = TorchBackend(package.model, task, device, threads=threads)
        ob = OnnxBackend(package.read_onnx(), task, device, threads)
        t_torch, t_onnx = measure(tb, batch), measure(ob, batch)
        chosen = "onnxruntime" if t_onnx < t_torch else "torch"
        choices[key] = {"backend": chosen, "torch_s": t_torch, "onnx_s": t_onnx}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(choices, indent=1))
            os.replace(tmp, cache)
        except OSError:
            pass
        log(f"backend auto: torch {t_torch * 1000:.0f} ms/batch, onnxruntime {t_onnx * 1000:.0f} ms/batch -> {chosen}")
        return ob if chosen == "onnxruntime" else tb
    return choose_backend(chosen, package, device, batch_shape, threads, log, mask_ratio)
