"""The torch backend, ONNX export and device choice: everything of ``engine.backends`` that needs torch.

Kept apart so that ``engine.backends`` (and with it a run through onnxruntime) never imports torch;
``engine.backends`` re-exports these names lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import SarmaeError
from .tasks import TASKS, Task, get_task


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
    """Wraps a task model so its forward is the task's (``Task.forward``): what the pipeline runs and
    ONNX export traces, e.g. segment -> logits (B, K, H, W); embed -> patch tokens (B, D, gh, gw)."""

    def __init__(self, model: torch.nn.Module, task: str | Task, mask_ratio: float = 0.75):
        super().__init__()
        self.model, self.mask_ratio = model, mask_ratio
        self.task = get_task(task) if isinstance(task, str) else task

    def forward(self, x: torch.Tensor):
        return self.task.forward(self.model, x, self.mask_ratio)


class TorchBackend:
    name = "torch"

    def __init__(self, model, task: str, device: str = "auto", amp: bool = True, threads: int | None = None,
                 mask_ratio: float = 0.75):
        self.torch = torch
        self.device = pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.task = get_task(task) if isinstance(task, str) else task
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
                    y = self.module(x)
            else:
                y = self.module(x)
        return self.task.to_numpy(y)

    def describe(self) -> str:
        return f"torch {self.torch.__version__} on {self.device}" + (f" ({self.amp_dtype})" if self.amp_dtype else "")


def export_onnx(model, task: str, in_chans: int, size: tuple[int, int], card_json: str, opset: int = 17) -> bytes:
    """Export the task model (batch dimension dynamic) to ONNX bytes with the card as metadata."""
    import io

    import onnx

    if not get_task(task).onnx:
        onnx_tasks = [n for n in TASKS if TASKS[n].onnx]
        raise SarmaeError(f"ONNX export supports {', '.join(onnx_tasks)}; '{task}' models run with --backend torch")
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
