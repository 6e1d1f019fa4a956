"""The torch backend, ONNX export and device choice: everything of ``engine.backends`` that needs torch.

Kept apart so that ``engine.backends`` (and with it a run through onnxruntime) never imports torch;
``engine.backends`` re-exports these names lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .backends import ONNX_TASKS
from .errors import SarmaeError


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
