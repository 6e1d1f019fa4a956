"""``sarmae export``: add model.onnx (fp32) and optionally model.int8.onnx to a package.

The package is rewritten atomically (``save_package``) with every other file it holds kept; both
ONNX files are covered by sha256 in model.json, the int8 one with its quality gate
(``engine.quantize``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SarmaeError
from .quantize import DEFAULT_WINDOWS

MAX_ONNX_DIFF = 1e-4  # the fp32 export against torch on random input: max abs difference, relative to the
# outputs' scale when they exceed 1 (a quick-mode head folded from logistic regression gives logits in the
# hundreds on random input, where float32 rounding alone differs by 1e-4)


@dataclass
class ExportReport:
    output: Path
    onnx_bytes: int
    torch_diff: float | None  # None: the package's model.onnx was reused (int8 export only)
    int8: dict | None  # the int8 record written into model.json (method, quantizer, gate)
    kept: list[str]

    def summary(self) -> str:
        fp32 = (f"model.onnx ({self.onnx_bytes / 1e6:.1f} MB, torch vs onnxruntime max abs diff {self.torch_diff:.2e})"
                if self.torch_diff is not None else f"model.onnx kept ({self.onnx_bytes / 1e6:.1f} MB)")
        s = f"wrote {self.output}: {fp32}"
        if self.int8:
            g = self.int8["gate"]
            s += (f"; model.int8.onnx ({self.int8['method']}): {g['metric']} with fp32 {g['value']:.4f} on "
                  f"{g['windows']} window(s) of {g['calibration']}" + (" (FORCED below the gate)" if g["forced"] else ""))
        return s + (f"; kept {', '.join(self.kept)}" if self.kept else "")


def export_fp32(pkg, opset: int = 17) -> tuple[bytes, float]:
    """The package's torch model exported to ONNX and checked against torch on random input."""
    from .backends import OnnxBackend
    from .torch_backend import TorchBackend, export_onnx

    card = pkg.card
    size = card.input_size
    meta = {k: v for k, v in card.to_dict().items() if k != "onnx"}  # the ONNX files' own hashes: not inside them
    blob = export_onnx(pkg.model, card.task, card.in_chans, size, json.dumps(meta), opset=opset)
    x = np.random.default_rng(0).standard_normal((2, card.in_chans, *size)).astype(np.float32)
    ref = np.asarray(TorchBackend(pkg.model, card.task, "cpu").run(x))
    diff = float(np.abs(ref - OnnxBackend(blob, card.task, "cpu").run(x)).max())
    scale = max(1.0, float(np.abs(ref).max()))
    if diff > MAX_ONNX_DIFF * scale:
        raise SarmaeError(f"{pkg.path}: the ONNX export disagrees with torch (max abs diff {diff:.2e} > "
                          f"{MAX_ONNX_DIFF * scale:.2e}: {MAX_ONNX_DIFF} of the outputs' scale {scale:.3g}); not written")
    return blob, diff


def export_package(package: str | Path, output: str | Path | None = None, opset: int = 17, precision: str = "fp32",
                   calibration: str | Path | None = None, method: str = "dynamic", windows: int = DEFAULT_WINDOWS,
                   force: bool = False, calibration_units: str | None = None, log=print) -> ExportReport:
    """Write model.onnx (precision fp32), or model.int8.onnx beside it (precision int8; an existing
    model.onnx that matches model.json is reused, else exported first) into the package."""
    from .package import (
        load_package,
        read_extra_files,
        read_weights,
        require_network,
        save_package,
    )
    from .quantize import make_int8

    if precision not in ("fp32", "int8"):
        raise SarmaeError(f"sarmae export --precision {precision}: use fp32 (model.onnx) or int8 (model.int8.onnx)")
    if precision == "fp32" and (calibration is not None or force):
        raise SarmaeError("--calibration and --force belong to --precision int8")
    pkg = load_package(package, lazy=True)
    card = pkg.card
    require_network(pkg.path, card)  # a package without a network (CFAR) has nothing to export
    from .tasks import task_for

    if not task_for(card).needs_encoder:  # a network of its own (cfar_scored): fine-tuning wrote model.onnx
        raise SarmaeError(f"{pkg.path}: a '{card.architecture.name}' package's model.onnx is written when it is "
                          "trained" + (" and is already there" if pkg.has_onnx else "; train it again to get one")
                          + "; 'sarmae export' (and int8) covers packages built on an encoder")
    diff = None
    if precision == "int8" and pkg.has_onnx and "fp32" in card.onnx:
        blob = pkg.read_onnx()
        pkg.onnx_model()  # checks model.onnx against its sha256 in model.json
    else:
        blob, diff = export_fp32(pkg, opset)
    int8 = None
    if precision == "int8":
        int8, card.onnx["int8"] = make_int8(pkg.path, card, blob, calibration, method, windows, force,
                                            calibration_units, log)
    elif pkg.has_int8 and "int8" in card.onnx:  # same weights: the int8 model stays valid
        pkg.onnx_model("int8")
        int8 = pkg.read_onnx("int8")
    weights = read_weights(pkg.path, card)  # the same file: the sha256 model.onnx's metadata records stays true
    extra = read_extra_files(pkg.path, card)  # training curves, confusion matrix, ...: kept as they are
    dest = Path(output or package)
    save_package(weights, card, dest, onnx_bytes=blob, int8_bytes=int8, extra_files=extra, overwrite=True)
    return ExportReport(dest, len(blob), diff, card.onnx.get("int8") if precision == "int8" else None, list(extra))
