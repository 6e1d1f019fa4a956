"""Fine-tune in the background: :class:`FinetuneRequest` -> :class:`FinetuneTask` -> a new model.

The Fine-tune dialog snapshots the label layer into the run folder (what the analyst sees,
unsaved edits included), validates everything into a frozen :class:`FinetuneRequest`, and the
task sends it to the engine worker's ``finetune`` run task. Progress events (epoch, loss,
validation metric) move the task's progress bar and are re-emitted as :attr:`FinetuneTask.status`
for a live line in the message bar. The package is written straight into the models folder (the
engine writes a temporary sibling and renames it on success), which is what registers it: the Run
model dialog and Processing list it from there.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qgis.core import Qgis, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..engine_client import EngineClient, EngineError
from ..toolbelt import log, messages
from ..toolbelt.engine import exclusive_run, get_client

FINETUNE_TASKS = ("segment", "detect", "classify")
MODES = ("auto", "head", "full")  # FinetuneConfig.mode: chosen by label count | frozen encoder + head | full
MODE_LABELS = {"auto": "Automatic (by the number of labels)", "head": "Quick (frozen encoder)",
               "full": "Full fine-tune"}


def budget_fraction(event_fraction: float, elapsed_s: float, max_minutes: float) -> float:
    """The progress of a time-budgeted run: the engine's own fraction (epochs done) or the share of
    the time budget spent, whichever is further; training stops at the budget, so the bar moves in
    time instead of jumping from a few per cent to 100 (issue 16, item 8). Below 0.99 until the end."""
    f = max(0.0, min(1.0, event_fraction))
    if max_minutes > 0:
        f = max(f, min(0.99, elapsed_s / (60.0 * max_minutes)))
    return f


@dataclass(frozen=True)
class FinetuneRequest:
    """One fine-tuning run, as chosen in the dialog (already validated)."""

    name: str  # the new model's name (its folder in the models folder)
    task: str  # segment | detect | classify
    rasters: tuple[str, ...]  # training raster files
    labels: str  # the label snapshot (GeoPackage) in the run folder
    class_field: str
    output: str  # the package folder to write (inside the models folder)
    run_dir: str  # this run's own folder (label snapshot, log)
    classes: tuple[str, ...] = ()  # class order (empty: sorted values found)
    colours: tuple[str, ...] = ()  # one "#rrggbb" per class (the label layer's colours)
    background: str | None = None  # segment: the class of unlabelled pixels (None: ignored)
    encoder: str | None = None  # encoder package (None: random initialisation)
    max_minutes: float = 5.0
    epochs: int = 50
    mode: str = "auto"  # one of MODES (FinetuneConfig.mode)
    linear_probe: bool = False
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    layer_name: str = ""  # the first raster's layer name (to offer running the new model on it)

    def message(self) -> dict:
        """The worker's ``run`` request fields."""
        config: dict = {"epochs": self.epochs, "linear_probe": self.linear_probe, "seed": self.seed,
                        "batch_size": self.batch_size, "device": self.device}
        if self.mode != "auto":  # "auto" is the training side's default: sent only when chosen otherwise
            config["mode"] = self.mode
        if self.max_minutes > 0:
            config["max_minutes"] = self.max_minutes
        msg: dict = {"task": "finetune", "kind": self.task, "output": self.output, "rasters": list(self.rasters),
                     "labels": self.labels, "class_field": self.class_field, "config": config}
        if self.classes:
            msg["classes"] = list(self.classes)
        if self.colours:
            msg["colours"] = list(self.colours)
        if self.background:
            msg["background"] = self.background
        if self.encoder:
            msg["encoder"] = self.encoder
        return msg


class FinetuneTask(QgsTask):
    """Runs a :class:`FinetuneRequest` in the engine worker; ``result`` holds its metrics."""

    status = pyqtSignal(str)  # "epoch 3/50: loss 0.41, val mean_iou 0.62" (queued to the main thread)

    def __init__(self, request: FinetuneRequest, message_bar=None, on_done: Callable | None = None,
                 client_factory: Callable[[], EngineClient] = get_client):
        super().__init__(f"SARMAE fine-tuning: {request.name}", QgsTask.CanCancel)
        self.request = request
        self.message_bar = message_bar
        self.on_done = on_done
        self.client_factory = client_factory
        self.result: dict | None = None
        self.error: Exception | None = None
        self.history: list[str] = []
        self.is_done = False
        self.seconds = 0.0
        self._t0 = time.monotonic()
        self._fraction = 0.0  # the engine's last progress fraction

    def _tick(self) -> bool:
        """Polled every 0.2 s while the engine works: move the bar with the time budget; returns
        whether the user cancelled (it is the request's ``is_cancelled``)."""
        self.setProgress(100.0 * budget_fraction(self._fraction, time.monotonic() - self._t0,
                                                 self.request.max_minutes))
        return self.isCanceled()

    def _on_event(self, msg: dict) -> None:
        text = str(msg.get("message") or "")
        if msg.get("event") == "progress":
            self._fraction = float(msg.get("fraction", 0.0))
            self.setProgress(100.0 * budget_fraction(self._fraction, time.monotonic() - self._t0,
                                                     self.request.max_minutes))
            if text:
                self.history.append(text)
                self.status.emit(text)
        elif msg.get("event") == "log" and text:
            log.info(f"fine-tuning {self.request.name}: {text}")
            self.status.emit(text)

    def run(self) -> bool:
        """Background thread: send the request, wait for the package (no QGIS objects touched)."""
        t0 = self._t0 = time.monotonic()
        try:
            Path(self.request.run_dir).mkdir(parents=True, exist_ok=True)
            Path(self.request.output).parent.mkdir(parents=True, exist_ok=True)
            with exclusive_run(self.isCanceled, on_wait=lambda: self.status.emit("waiting for another SARMAE run")):
                self.result = self.client_factory().request("run", self._on_event, self._tick,
                                                            **self.request.message())
        except Exception as e:  # EngineError or a bug: reported in finished(), never raised into QGIS
            self.error = e
            return False
        finally:
            self.seconds = time.monotonic() - t0
        try:
            (Path(self.request.run_dir) / "result.json").write_text(json.dumps(self.result, indent=1, default=str))
        except OSError:
            pass
        return True

    def finished(self, result: bool) -> None:  # noqa: FBT001  # QgsTask API
        """Main thread: tell the user, then hand over to ``on_done`` (the plugin shows the results)."""
        self.is_done = True
        r = self.request
        try:
            if result and self.result is not None:
                summary = summarise(self.result)
                log.info(f"fine-tuned {r.name} in {self.seconds / 60:.1f} min: {summary} -> {r.output}")
                self._message(f"model '{r.name}' fine-tuned", summary, Qgis.Success)
            elif (isinstance(self.error, EngineError) and self.error.cancelled) or \
                    (self.error is None and self.isCanceled()):
                self._message(f"fine-tuning {r.name}", "cancelled; no model was written", Qgis.Info)
            else:
                text = gui_text(str(self.error)) if self.error is not None else "fine-tuning failed"
                log.critical(f"fine-tuning {r.name} failed: {text}")
                self._message(f"fine-tuning {r.name} failed", text, Qgis.Critical)
            if self.on_done is not None:
                self.on_done(self)
        except Exception as e:  # never raise into Qt
            log.critical(f"fine-tuning {r.name}: could not show the results ({e}); the package is {r.output}")

    def _message(self, title: str, text: str, level) -> None:
        messages.push(self.message_bar, f"SARMAE: {title}", text, level, 15)


# command-line flags the training side may name in a message -> where the setting is in the dialog
GUI_SETTINGS = {"batch-size": "the batch size (Advanced)", "max-minutes": "the time budget",
                "epochs": "the number of epochs", "class-field": "the class field", "labels": "the label layer",
                "raster": "the raster layer(s)", "rasters": "the raster layer(s)", "encoder": "the encoder",
                "background": "the background class", "classes": "the classes", "seed": "the seed (Advanced)",
                "device": "the device (Advanced)", "mode": "the mode", "linear-probe": "the linear probe (Processing, Advanced)"}


def gui_text(message: str) -> str:
    """An engine message worded for the dialog: "(--batch-size)" -> "(the batch size (Advanced))"."""
    def setting(m: re.Match) -> str:
        return GUI_SETTINGS.get(m.group(1), f"the '{m.group(1).replace('-', ' ')}' setting")

    return re.sub(r"--([a-z][a-z0-9-]*)", setting, message)


def headline(result: dict) -> tuple[str, float] | None:
    """The main validation metric of a fine-tuning result: ("mean IoU", 0.71), ("accuracy", ...), ("mAP@0.5", ...)."""
    for key, label in (("val_mean_iou", "mean IoU"), ("val_accuracy", "accuracy"), ("val_map_50", "mAP@0.5"),
                       ("val_map", "mAP@[.5:.95]")):
        v = result.get(key)
        if isinstance(v, (int, float)):
            return label, float(v)
    return None


def summarise(result: dict) -> str:
    """One line: the headline metric, epochs, chips."""
    parts = []
    h = headline(result)
    if h:
        parts.append(f"validation {h[0]} {h[1]:.3f}")
    if isinstance(result.get("epochs_run"), int):
        n = result["epochs_run"]
        parts.append(f"{n} epoch{'' if n == 1 else 's'} (best {result.get('best_epoch', '?')})")
    if isinstance(result.get("train_chips"), int):
        parts.append(f"{result['train_chips']} training / {result.get('val_chips', '?')} validation chips")
    return ", ".join(parts) or "done"
