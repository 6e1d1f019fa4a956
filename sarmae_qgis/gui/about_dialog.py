"""The "About SARMAE" box: name, version, description and links from ``metadata.txt``."""

from __future__ import annotations

from html import escape

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from ..toolbelt.metadata import plugin_metadata
from ..toolbelt.resources import ICON_PATH

__all__ = ["ICON_PATH", "AboutDialog", "about_html"]


def about_html(meta: dict[str, str]) -> str:
    """Rich text shown in the box, built from the ``[general]`` entries of ``metadata.txt``."""
    name = escape(meta.get("name", "SARMAE"))
    version = escape(meta.get("version", "unknown"))
    about = escape(" ".join(meta.get("about", meta.get("description", "")).split()))
    links = [
        f'<a href="{escape(url)}">{label}</a>'
        for label, url in (
            ("Home page", meta.get("homepage", "")),
            ("Report a problem", meta.get("tracker", "")),
        )
        if url
    ]
    experimental = " (experimental)" if meta.get("experimental", "").lower() == "true" else ""
    return (
        f"<h2>{name}</h2>"
        f"<p><b>Version {version}</b>{experimental}</p>"
        f"<p>{about}</p>"
        f"<p>{' &middot; '.join(links)}</p>"
        f"<p><small>{escape(meta.get('author', ''))}</small></p>"
    )


class AboutDialog(QDialog):
    """A small modal box describing the plugin; open it with ``exec_()``."""

    def __init__(self, parent: QWidget | None = None, meta: dict[str, str] | None = None) -> None:
        """Build the box.

        Args:
            parent: usually ``iface.mainWindow()``.
            meta: plugin metadata; read from ``metadata.txt`` when omitted.
        """
        super().__init__(parent)
        meta = plugin_metadata() if meta is None else meta
        self.version = meta.get("version", "unknown")
        self.setWindowTitle(f"About {meta.get('name', 'SARMAE')}")
        self.setWindowIcon(QIcon(str(ICON_PATH)))

        icon_label = QLabel(self)
        icon_label.setPixmap(QIcon(str(ICON_PATH)).pixmap(64, 64))
        icon_label.setAlignment(Qt.AlignTop)

        self.text_label = QLabel(about_html(meta), self)
        self.text_label.setTextFormat(Qt.RichText)
        self.text_label.setWordWrap(True)
        self.text_label.setOpenExternalLinks(True)
        self.text_label.setMinimumWidth(360)

        buttons = QDialogButtonBox(QDialogButtonBox.Close, self)
        buttons.rejected.connect(self.reject)

        row = QHBoxLayout()
        row.addWidget(icon_label)
        row.addWidget(self.text_label, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(buttons)

    def text(self) -> str:
        """The rich text shown in the box (for tests and screen readers)."""
        return self.text_label.text()
