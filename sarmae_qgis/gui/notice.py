"""A dialog's own warning line: a word-wrapped label, so that a long or two-line message is shown
whole (QgsMessageBar items cut long text to one line in a dialog; issue 16, item 7)."""

from __future__ import annotations

from html import escape

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QLabel, QSizePolicy, QWidget

STYLES = {
    "warning": "background:#fff4ce; border:1px solid #e0b000; border-radius:3px; padding:6px; color:#222;",
    "info": "background:#e8f1fb; border:1px solid #6fa3d8; border-radius:3px; padding:6px; color:#222;",
}


class Notice(QLabel):
    """Hidden until :meth:`warn` / :meth:`inform`; wraps to the dialog's width, selectable."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextFormat(Qt.RichText)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)
        self.plain = ""  # the last message, as plain text (tests, logs)
        self.hide()

    def _show(self, kind: str, title: str, text: str) -> None:
        self.plain = f"{title}: {text}" if title else text
        self.setStyleSheet(STYLES[kind])
        self.setText((f"<b>{escape(title)}</b>: " if title else "") + escape(text).replace("\n", "<br>"))
        self.show()

    def warn(self, title: str, text: str) -> None:
        self._show("warning", title, text)

    def inform(self, title: str, text: str) -> None:
        self._show("info", title, text)

    def clear_on(self, *signals) -> None:
        """Hide the message when any of ``signals`` fires (the form's inputs changed): a warning such as
        "Choose an input raster layer" stayed after the layer was picked, until the next click."""
        for signal in signals:
            signal.connect(lambda *_args: self.clear())

    def clear(self) -> None:  # noqa: D102  # QLabel.clear, and hide
        self.plain = ""
        super().clear()
        self.hide()
