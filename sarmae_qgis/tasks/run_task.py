"""Run a model on a raster layer in the background: :class:`RunRequest` -> :class:`RunTask`.

The Run model dialog (``gui/run_dialog.py``) turns its widgets into a validated, frozen
:class:`RunRequest`; :class:`RunTask` sends it to the engine worker in :meth:`RunTask.run` (a
background thread: no QGIS layer or widget is touched there) and, in :meth:`RunTask.finished`
(main thread), adds the outputs under a layer-tree group named after the run and the time, right
above the input layer, styled with the model's classes, and reports a summary in the message bar.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qgis.core import Qgis, QgsProject, QgsTask

from ..engine_client import EngineClient, EngineError
from ..results import add_result_layers, summarise, unique_group_name
from ..toolbelt import log, messages
from ..toolbelt.engine import exclusive_run, get_client

VECTOR_TASKS = ("detect", "classify")


def slug(text: str) -> str:
    """A file-name friendly version of ``text`` ("S1 flood – VV" -> "S1_flood_VV")."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return s[:60] or "run"


@dataclass(frozen=True)
class RunRequest:
    """One inference run, as chosen in the dialog (already validated)."""

    run_name: str  # layer-tree group name, and the base of the output file names
    layer_name: str
    raster_path: str  # the input layer's file
    model_path: str  # package folder or .zip
    model_name: str
    task: str  # the package's task
    output_dir: str  # this run's own folder (created by the task)
    bands: tuple[str, ...] | None = None  # model-order bands by number or name; None: all, file order
    window: int | None = None  # None: the model's input size
    overlap: float | None = None  # None: the engine's default
    batch_size: int = 4
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"  # auto | fp32 | int8 (the package's model.int8.onnx): the engine's --precision
    vectors: bool = False  # segment: also write class polygons
    extent: tuple[int, int, int, int] | None = None  # (row, col, height, width) of the layer; None: all
    layer_id: str = ""  # the input layer's id: the results go right above it in the layer tree
    classes: tuple[str, ...] | None = None  # zeroshot (CLIP): class names typed in -> a class map
    query: tuple[str, ...] | None = None  # zeroshot (CLIP): phrases -> a similarity layer (task textquery)

    def details(self) -> str:
        """The run's details for the result layers' metadata abstract."""
        opts = ", ".join(f"{k} {v}" for k, v in self.options().items())
        return (f"Model: {self.model_name} ({self.task}), {self.model_path}\nInput: layer '{self.layer_name}', "
                f"{self.raster_path}\nOptions: {opts}\nOutput folder: {self.output_dir}")

    @property
    def output_path(self) -> str:
        """The engine's main output; the others are written beside it."""
        suffix = ".gpkg" if self.task in VECTOR_TASKS else ".tif"
        return str(Path(self.output_dir) / (slug(self.run_name) + suffix))

    def options(self) -> dict:
        """The engine's inference options for this request."""
        opts: dict = {"batch_size": self.batch_size, "device": self.device, "backend": self.backend,
                      "precision": self.precision}
        if self.bands:
            opts["bands"] = [int(b) if b.isdigit() else b for b in self.bands]
        if self.window:
            opts["window"] = self.window
        if self.overlap is not None:
            opts["overlap"] = self.overlap
        if self.task == "segment" and self.vectors:
            opts["vector"] = True
        if self.extent is not None:
            opts["extent"] = list(self.extent)
        if self.classes:
            opts["classes"] = list(self.classes)
        if self.query:
            opts["query"] = list(self.query)
        return opts


class RunTask(QgsTask):
    """Runs a :class:`RunRequest` through the engine worker; adds styled layers when done."""

    def __init__(self, request: RunRequest, project: QgsProject | None = None, message_bar=None,
                 client_factory: Callable[[], EngineClient] = get_client):
        super().__init__(f"SARMAE: {request.run_name}", QgsTask.CanCancel)
        self.request = request
        self.project = project
        self.message_bar = message_bar
        self.client_factory = client_factory
        self.result: dict | None = None
        self.error: Exception | None = None
        self.layers: list = []
        self.group = None
        self.summary = ""
        self.is_done = False
        self.log_lines: list[str] = []

    # ---- background thread ----------------------------------------------------------------------
    def _on_progress(self, fraction: float, message: str) -> None:
        if fraction < 0:
            self.log_lines.append(message)
            log.info(f"{self.request.run_name}: {message}")
        else:
            self.setProgress(100.0 * min(1.0, fraction))

    def run(self) -> bool:
        """Send the request to the engine and wait for its result (no QGIS objects touched here)."""
        r = self.request
        t0 = time.monotonic()
        try:
            Path(r.output_dir).mkdir(parents=True, exist_ok=True)
            with exclusive_run(self.isCanceled):
                self.result = self.client_factory().run_inference(
                    [r.raster_path], r.output_path, r.model_path, r.options(), on_progress=self._on_progress,
                    is_cancelled=self.isCanceled)
        except EngineError as e:
            self.error = e
            return False
        except Exception as e:  # a bug or an OS error: reported in finished(), never raised into QGIS
            self.error = e
            return False
        self.result.setdefault("timings", {}).setdefault("total_s", time.monotonic() - t0)
        return True

    # ---- main thread --------------------------------------------------------------------------
    def finished(self, result: bool) -> None:  # noqa: FBT001  # QgsTask API
        """Add the outputs as styled layers, or report the failure (never raises into Qt)."""
        self.is_done = True
        try:
            self._finish(result)
        except Exception as e:  # a broken output or a bug must not take QGIS down
            self.error = e
            log.critical(f"{self.request.run_name}: could not load the results ({e}); they are in "
                         f"{self.request.output_dir}")

    def _finish(self, result: bool) -> None:  # noqa: FBT001
        r = self.request
        if result and self.result is not None:
            project = self.project or QgsProject.instance()
            self.group, self.layers = add_result_layers(self.result, unique_group_name(r.run_name, project), project,
                                                        above_layer_id=r.layer_id, details=r.details())
            self.summary = summarise(self.result)
            log.info(f"{r.run_name}: {self.summary} -> {r.output_dir}")
            self._message(f"{r.run_name} done", self.summary, Qgis.Success)
        elif (isinstance(self.error, EngineError) and self.error.cancelled) or (self.error is None and self.isCanceled()):
            self._message(f"{r.run_name}", "cancelled; nothing was written", Qgis.Info)
        else:
            text = str(self.error) if self.error is not None else "the run failed"
            if isinstance(self.error, EngineError) and self.error.kind == "start" and "Settings" not in text:
                text += " -- set the engine's Python interpreter in Raster > SARMAE > Settings"
            log.critical(f"{r.run_name} failed: {text}")
            self._message(f"{r.run_name} failed", text, Qgis.Critical)

    def _message(self, title: str, text: str, level) -> None:
        messages.push(self.message_bar, f"SARMAE: {title}", text, level, 10)
