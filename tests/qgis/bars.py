"""A real QgsMessageBar that also records what was pushed to it (title, text, level)."""

from __future__ import annotations

from qgis.core import Qgis
from qgis.gui import QgsMessageBar


class RecordingBar(QgsMessageBar):
    """QGIS's message bar; ``messages`` lists every line pushed, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[str, str, object]] = []

    def pushWidget(self, item, level=Qgis.Info, duration=0):  # noqa: N802  # QGIS API
        self.messages.append((item.title(), item.text(), level))
        return super().pushWidget(item, level, duration)

    def pushMessage(self, title, text, level=Qgis.Info, duration=0):  # noqa: N802  # QGIS API
        self.messages.append((title, text, level))
        return super().pushMessage(title, text, level, duration)

    def texts(self, level=None) -> str:
        return " | ".join(t for _title, t, lv in self.messages if level is None or lv == level)

    def shown(self) -> list[str]:
        """The texts of the lines still in the bar."""
        return [item.text() for item in self.items()]
