"""The results dialog shown when fine-tuning ends: how good, how far to trust it, and the map.

Top: the headline validation metric, per-class scores, epochs and chips (integers as integers),
and, in a yellow box, every reason to doubt the score (:func:`model_cards.validation_doubts`: the training
side's ``warnings`` and ``validation.note``, a one-class or tiny validation set). Below, in tabs:
the new model's prediction over the labelled area next to the labels (``preview_png``, written
by training into the package), the training curves and the confusion matrix, at a readable size.
"Run on <layer>" closes with ``run_requested``.
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon, QPixmap
from qgis.PyQt.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..model_cards import number, validation_doubts
from ..tasks.finetune_task import MODE_LABELS, FinetuneTask, headline
from ..toolbelt.resources import ICON_PATH

FIGURE_MAX_WIDTH = 820  # px: the figures are written at 800 (curves) and ~480 (confusion)
FIGURES = (("preview_png", "preview.png", "Prediction over your labels"), (None, "training_curves.png", "Training curves"),
           (None, "confusion_matrix.png", "Confusion matrix"))


def figure_path(result: dict, package: str, key: str | None, name: str | None) -> Path | None:
    """A figure of the result: ``result[key]`` (absolute, or relative to the package), else
    ``<package>/<name>``; None when it is not there."""
    if key and result.get(key):
        p = Path(str(result[key]))
        p = p if p.is_absolute() else Path(package) / p
        if p.is_file():
            return p
    if name:
        p = Path(package) / name
        return p if p.is_file() else None
    return None


def short_floats(text: str) -> str:
    """"0.11912984450658162 min" -> "0.12 min": long decimals in the training side's sentences."""
    return re.sub(r"\d+\.\d{4,}", lambda m: f"{float(m.group()):.2f}", text)


def summary_html(task: FinetuneTask) -> str:
    """The text part of the dialog (rich text)."""
    r, result = task.request, task.result or {}
    rows = [f"<b>{escape(r.name)}</b> &mdash; {escape(r.task)}, {len(r.rasters)} raster(s), labels from field "
            f"<i>{escape(r.class_field)}</i>, {task.seconds / 60:.1f} min"]
    h = headline(result)
    warnings = validation_doubts(result, r.classes)
    if h:
        trust = " <span style='color:#a15c00'>(not reliable: see below)</span>" if warnings else ""
        rows.append(f"Validation {h[0]}: <b>{number(h[1])}</b>{trust}")
    per_class = result.get("val_iou") or result.get("val_per_class_accuracy") or result.get("val_ap_per_class")
    if isinstance(per_class, dict):
        rows.append("Per class: " + ", ".join(f"{escape(str(k))} {number(v)}" for k, v in per_class.items()
                                              if isinstance(v, (int, float))))
    if isinstance(result.get("epochs_run"), int):
        best = result.get("best_epoch")
        n = result["epochs_run"]
        rows.append(f"{n} epoch{'' if n == 1 else 's'}, best at epoch {number(best, 'best_epoch') if best is not None else '?'}"
                    + (f" ({escape(short_floats(str(result['stopped'])))})" if result.get("stopped") else ""))
    if result.get("mode"):
        mode = str(result["mode"])
        rows.append(f"Mode: {escape(MODE_LABELS.get(mode, mode))}")
    if isinstance(result.get("train_chips"), int):
        rows.append(f"{result['train_chips']} training / {number(result.get('val_chips', '?'), 'chips')} validation chips "
                    "(validation blocks are spatially separate)")
    rows.append(f"Installed as <code>{escape(r.output)}</code>")
    html = "<br>".join(rows)
    if warnings:
        items = "".join(f"<li>{escape(short_floats(w))}</li>" for w in warnings)
        html += ("<div style='background:#fff4ce; border:1px solid #e0b000; padding:4px; margin-top:6px'>"
                 f"<b>How far to trust this score</b><ul style='margin:2px'>{items}</ul>"
                 "Look at the map tab, and run the model on the image before relying on it.</div>")
    return html


class FinetuneResultDialog(QDialog):
    """Metrics, reliability, the prediction over the labels and training curves, with "Run on <layer>"."""

    def __init__(self, task: FinetuneTask, parent: QWidget | None = None, can_run: bool = True) -> None:
        super().__init__(parent)
        r = task.request
        self.task = task
        self.run_requested = False
        self.setWindowTitle(f"SARMAE: fine-tuned '{r.name}'")
        self.setWindowIcon(QIcon(str(ICON_PATH)))
        result = task.result or {}
        self.warnings = validation_doubts(result, r.classes)
        self.text = QLabel(summary_html(task), self)
        self.text.setTextFormat(Qt.RichText)
        self.text.setWordWrap(True)
        self.text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.tabs = QTabWidget(self)
        self.figures: dict[str, Path] = {}
        one_fit = isinstance(result.get("epochs_run"), int) and result["epochs_run"] <= 1
        for key, name, title in FIGURES:
            if one_fit and title == "Training curves":  # quick mode: one fit, no curve to draw
                continue
            path = figure_path(result, r.output, key, name)
            if path is None:
                continue
            pix = QPixmap(str(path))
            if pix.isNull():
                continue
            label = QLabel(self)
            label.setAlignment(Qt.AlignCenter)
            label.setPixmap(pix if pix.width() <= FIGURE_MAX_WIDTH else
                            pix.scaledToWidth(FIGURE_MAX_WIDTH, Qt.SmoothTransformation))
            scroll = QScrollArea(self)
            scroll.setWidget(label)
            scroll.setWidgetResizable(True)
            scroll.setMinimumHeight(min(label.pixmap().height() + 8, 520))
            self.tabs.addTab(scroll, title)
            self.figures[title] = path
        if not self.figures:
            self.tabs.addTab(QLabel("(no figures in the package)", self), "Figures")
        self.buttons = QDialogButtonBox(QDialogButtonBox.Close, self)
        self.run_button = self.buttons.addButton(f"Run on '{r.layer_name}'…", QDialogButtonBox.AcceptRole)
        self.run_button.setEnabled(can_run)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.text)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(self.buttons)
        self.setMinimumWidth(min(FIGURE_MAX_WIDTH, 860) + 40)

    def accept(self) -> None:
        self.run_requested = True
        super().accept()
