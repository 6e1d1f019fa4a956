"""int8 models for CPUs: a package's model.onnx quantised by onnxruntime, behind a quality gate.

``quantize_int8`` runs onnxruntime's own quantisation tool (no kernels of ours):

- ``dynamic`` (default): the weights of every MatMul / Gemm become int8, activations are quantised
  per batch at run time (``quantize_dynamic``). The transformer's matrix products run in int8; the
  convolutions (patch embedding, segmentation heads) stay fp32 (a dynamically quantised ConvInteger
  path is not measured here: ``benchmarks/bench_precision.py`` compares fp32, dynamic and static).
- ``static``: QDQ with activation ranges calibrated on windows of the calibration raster
  (``quantize_static``); also quantises convolutions.

The gate (``agreement``): the int8 model and the fp32 model.onnx run on calibration windows (read
through the package's input contract by the engine's reader and radiometry: what ``sarmae infer``
feeds the model), compared by the task's ``Task.agreement`` (segment: pixel labels, classify: top-1,
embed: cosine). Below ``Task.agreement_threshold`` (0.99) the export is refused with the figure,
unless forced; the figure is recorded in model.json either way.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RasterInputError, SarmaeError
from .tiling import Window, plan_tiles

METHODS = ("dynamic", "static")
DEFAULT_WINDOWS = 32  # calibration windows
MIN_VALID_FRACTION = 0.5  # a calibration window needs at least this much data


class QuantizationGateError(SarmaeError):
    """The quantised model disagrees with fp32 on the calibration windows more than the gate allows."""


def calibration_windows(card, raster_path: str | Path, count: int = DEFAULT_WINDOWS, package: str | Path = "",
                        input_units: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``count`` model-input windows of a raster (spread over it, at least half data), read
    through the package's input contract: (x (N, C, S, S) float32, valid (N, S, S) bool)."""
    from .radiometry import Radiometry
    from .reader import SarRaster

    size = card.input_size[0]
    try:
        with SarRaster.open([str(raster_path)]) as raster:
            rad = Radiometry.for_raster(card.input, raster, input_units)
            plan = plan_tiles(raster.height, raster.width, size, 0.0)
            wins = list(plan.windows)
            order = np.linspace(0, len(wins) - 1, num=min(len(wins), 3 * count)).round().astype(int)
            xs, vs = [], []
            for i in dict.fromkeys(order.tolist()):
                w = wins[i]
                h, wd = min(w.height, raster.height - w.row_off), min(w.width, raster.width - w.col_off)
                x, v = raster.read(Window(w.row_off, w.col_off, h, wd), pad_to=(size, size))
                if v.mean() >= MIN_VALID_FRACTION:
                    xs.append(rad.apply(x, v))
                    vs.append(v)
                if len(xs) == count:
                    break
    except RasterInputError as e:
        raise RasterInputError(f"{package}: the calibration raster does not fit the model's input contract "
                               f"({card.in_chans} band(s) {'+'.join(card.input.bands)}, {card.input.units}): {str(e).rstrip('.')}. "
                               "Give a raster with the model's bands (--calibration-units if its units are "
                               "detected wrongly)") from e
    if not xs:
        raise RasterInputError(f"{package}: the calibration raster {raster_path} has no window of {size} px with "
                               f"at least {MIN_VALID_FRACTION:.0%} valid pixels; give a scene with data")
    return np.stack(xs), np.stack(vs)


def random_windows(card, count: int = DEFAULT_WINDOWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal windows in the model's normalised input space (no calibration raster)."""
    s = card.input_size
    x = np.random.default_rng(seed).standard_normal((count, card.in_chans, *s)).astype(np.float32)
    return x, np.ones((count, *s), bool)


@contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs advice on the root logger ('consider pre-processing'): hide it."""
    root = logging.getLogger()

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")

    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over the calibration windows, one at a time."""

    def __init__(self, x: np.ndarray, input_name: str):
        self._items = iter([{input_name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self) -> dict | None:
        return next(self._items, None)

    def rewind(self) -> None:  # pragma: no cover - called by some calibrators only
        pass


def quantize_int8(fp32: bytes, method: str = "dynamic", calibration: np.ndarray | None = None) -> tuple[bytes, str]:
    """(int8 ONNX bytes, a description of how it was made) from fp32 ONNX bytes."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method not in METHODS:
        raise SarmaeError(f"unknown int8 method '{method}'; use {' or '.join(METHODS)}")
    with tempfile.TemporaryDirectory(prefix="sarmae-int8-") as tmp, _quiet_quantizer():
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        src.write_bytes(fp32)
        if method == "dynamic":
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
            how = "quantize_dynamic: MatMul/Gemm weights int8, activations quantised per batch"
        else:
            if calibration is None:
                raise SarmaeError("--int8-method static calibrates activation ranges: give --calibration RASTER")
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "model.pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
            quantize_static(pre, dst, _Reader(calibration, name), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
            how = f"quantize_static (QDQ, per-channel int8 weights, uint8 activations calibrated on {len(calibration)} windows)"
        proto = onnx.load(str(dst))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "sarmae_precision", "int8"
    return proto.SerializeToString(), f"onnxruntime {onnxruntime.__version__} {how}"


def agreement(task, fp32: bytes | Path, int8: bytes | Path, x: np.ndarray, valid: np.ndarray,
              batch: int = 8, threads: int | None = None) -> float:
    """``task.agreement`` of the int8 model with the fp32 model on the windows ``x``."""
    from .backends import OnnxBackend

    runs = []
    for model in (fp32, int8):
        be = OnnxBackend(model, task.name, "cpu", threads)
        runs.append(np.concatenate([be.run(x[i:i + batch]) for i in range(0, len(x), batch)]))
    return task.agreement(runs[0], runs[1], valid)


def make_int8(package: str | Path, card, fp32: bytes, calibration: str | Path | None = None,
              method: str = "dynamic", windows: int = DEFAULT_WINDOWS, force: bool = False,
              input_units: str | None = None, log=print) -> tuple[bytes, dict[str, Any]]:
    """The int8 model of a package's fp32 model.onnx and its model.json record (file and sha256
    are added when the package is written): quantised, gated, refused below the task's threshold
    unless ``force``."""
    from .tasks import TASKS, get_task

    task = get_task(card.task)
    if task.agreement_metric is None:
        gated = ", ".join(n for n in TASKS if TASKS[n].onnx and TASKS[n].agreement_metric)
        raise SarmaeError(f"{package}: '{card.task}' models have no int8 export (tasks with one: {gated})")
    if calibration is not None:
        x, valid = calibration_windows(card, calibration, windows, package, input_units)
        source = Path(calibration).name
    else:
        if method == "static":
            raise SarmaeError(f"{package}: --int8-method static calibrates activation ranges: give --calibration RASTER")
        x, valid = random_windows(card, min(windows, 8))
        source = "random windows (no --calibration raster)"
        log("int8 gate on random windows: give --calibration RASTER (a scene like those you will process) "
            "for a figure that means something")
    blob, how = quantize_int8(fp32, method, x if method == "static" else None)
    value = agreement(task, fp32, blob, x, valid)
    threshold = task.agreement_threshold
    gate = {"metric": task.agreement_metric, "value": round(value, 6), "threshold": threshold, "windows": len(x),
            "calibration": source, "forced": bool(force and value < threshold)}
    log(f"int8 ({method}): {task.agreement_metric} with fp32 {value:.4f} on {len(x)} window(s) of {source} "
        f"(gate {threshold})")
    if value < threshold and not force:
        raise QuantizationGateError(
            f"{package}: the int8 model was refused: its {task.agreement_metric} with the fp32 model is {value:.4f} "
            f"on {len(x)} calibration window(s) of {source}, below the gate of {threshold}; nothing was written. "
            "Try --int8-method " + ("static" if method == "dynamic" else "dynamic")
            + (", a --calibration raster like the scenes you will process" if calibration is None else "")
            + ", or keep fp32; --force writes it anyway (recorded in model.json as forced)")
    return blob, {"method": method, "quantizer": how, "gate": gate}
