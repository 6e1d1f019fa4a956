"""Which precision a run uses: fp32, or the package's int8 model (``model.int8.onnx``) on CPUs.

``--precision auto`` takes int8 when the package holds an int8 model, the run is on a CPU, and the
CPU has int8 dot-product instructions (x86: AVX-512 VNNI, AVX-VNNI, AMX-INT8; Arm: the dot-product
and int8 matrix extensions); otherwise fp32. The choice reads ``/proc/cpuinfo`` (never torch) and
says which flag it found, so a run through onnxruntime stays free of torch.
"""

from __future__ import annotations

from pathlib import Path

from .errors import SarmaeError

PRECISIONS = ("fp32", "int8", "auto")
# CPU flags (as /proc/cpuinfo names them) whose int8 dot products onnxruntime's kernels use, best first
INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "i8mm", "asimddp")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (x86 ``flags``, Arm ``Features``);
    empty where the file cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def int8_cpu_flag(flags: set[str] | None = None) -> str | None:
    """The best int8 dot-product flag among ``flags`` (default: this machine's), or None."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in INT8_CPU_FLAGS if f in flags), None)


def _runs_on_cpu(device: str) -> bool:
    """Whether a run on ``device`` uses the CPU: ``cpu``, or ``auto`` on a machine without an NVIDIA
    GPU (read from the driver's files: no torch, no CUDA initialisation)."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    return not any(Path("/proc/driver/nvidia/gpus").glob("*/information"))


def resolve_precision(precision: str, package, device: str = "auto",
                      flags: set[str] | None = None) -> tuple[str, str]:
    """(``fp32`` | ``int8``, why) for ``--precision`` on this package and device.

    ``int8`` without a model.int8.onnx in the package is refused with how to make one; ``auto`` is
    int8 only with an int8 model, on a CPU with an int8 flag (``flags``: the CPU's, given for tests).
    """
    if precision not in PRECISIONS:
        raise SarmaeError(f"unknown precision '{precision}'; use {', '.join(PRECISIONS)}")
    has_int8 = getattr(package, "has_int8", False)
    if precision == "int8":
        if not has_int8:
            raise SarmaeError(
                f"{package.path}: --precision int8 asked for the package's int8 model, but it has no model.int8.onnx. "
                f"Make one with 'sarmae export {package.path} --precision int8 --calibration RASTER' (RASTER: a scene "
                "like those you will process), or run with --precision fp32")
        return "int8", "asked for"
    if precision == "fp32":
        return "fp32", "asked for"
    if not has_int8:
        return "fp32", "the package has no int8 model"
    if not _runs_on_cpu(device):
        return "fp32", f"int8 is the CPU path; device {device}"
    flag = int8_cpu_flag(flags)
    if flag is None:
        return "fp32", f"this CPU has no int8 dot-product instructions ({', '.join(INT8_CPU_FLAGS)}); --precision int8 forces it"
    return "int8", f"the package has an int8 model and the CPU has {flag}"
