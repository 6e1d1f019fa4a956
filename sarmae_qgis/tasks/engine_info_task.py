"""Ask an engine interpreter for its versions and devices in the background (Settings > Test engine)."""

from __future__ import annotations

from collections.abc import Callable
from html import escape

from qgis.core import QgsTask

from ..engine_client import EngineClient, EngineError
from ..toolbelt.engine import current_client


def format_info(info: dict) -> str:
    """Rich text: engine and Python versions, libraries, devices (GPU or CPU only)."""
    v = info.get("versions") or {}
    libs = ", ".join(f"{k} {v.get(k) or 'missing'}" for k in ("torch", "onnxruntime", "numpy", "rasterio", "gdal"))
    devices = []
    for d in info.get("devices") or []:
        if not d.get("available"):
            continue
        text = d.get("name", "?")
        if d.get("description"):
            text += f" ({d['description']}" + (f", {d['memory_gb']} GB" if d.get("memory_gb") else "") + ")"
        devices.append(text)
    gpu = "GPU usable" if info.get("gpu_usable") else "no usable GPU: runs on the CPU"
    return "<br>".join([
        f"<b>SARMAE engine {escape(str(info.get('engine_version', '?')))}</b> (protocol {info.get('protocol')})",
        f"Python {escape(str(info.get('python', '?')))}: {escape(str(info.get('python_executable', '')))}",
        escape(libs),
        "Devices:" + "".join(f"<br>&nbsp;&nbsp;{escape(d)}" for d in devices) if devices else "Devices: none",
        gpu,
    ])


class EngineInfoTask(QgsTask):
    """Start the engine with ``python`` (a throw-away worker unless it is the shared one) and ask
    for ``info``; ``on_done(info, error)`` runs on the main thread."""

    def __init__(self, python: str, on_done: Callable[[dict | None, str | None], None]):
        super().__init__("SARMAE: test engine", QgsTask.CanCancel)
        self.python, self.on_done = python, on_done
        self.info: dict | None = None
        self.error: str | None = None

    def run(self) -> bool:
        shared = current_client()
        client = shared if shared is not None and shared.python == self.python else EngineClient(python=self.python)
        try:
            self.info = client.info()
            return True
        except EngineError as e:
            self.error = str(e)
            return False
        finally:
            if client is not shared:
                client.shutdown(timeout=10)

    def finished(self, result: bool) -> None:  # noqa: FBT001  # QgsTask API
        try:
            self.on_done(self.info if result else None, None if result else (self.error or "cancelled"))
        except RuntimeError:  # the dialog that asked was closed and deleted meanwhile
            pass
