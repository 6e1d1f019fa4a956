"""The Models dialog: the packages installed in the models folder, each one's card, and Import
folder… / Import zip… / Export… / Make int8 model… / Delete / Open folder.

The file work is done by :mod:`sarmae_qgis.model_store` (atomic, zip-slip safe); the dialog only
asks for paths and confirmations. Every action has a method that takes its path and flags
(:meth:`ModelsDialog.import_from`, :meth:`ModelsDialog.export_to`,
:meth:`ModelsDialog.delete_selected`) so that it can be driven without file dialogs; errors go
through :meth:`ModelsDialog.show_error` and questions through :meth:`ModelsDialog.ask`, both of
which a test can replace. :attr:`ModelsDialog.modelsChanged` is emitted after every change.

Make int8 model… (:meth:`ModelsDialog.make_int8`) runs ``sarmae export --precision int8`` on the
selected package in a QgsTask (:class:`~sarmae_qgis.tasks.export_task.ExportTask`), calibrated on a
raster the user picks; the card then shows the gate's figure, or the engine's refusal is shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from html import escape
from pathlib import Path

from qgis.core import Qgis, QgsApplication
from qgis.gui import QgsMessageBar
from qgis.PyQt.QtCore import Qt, QUrl, pyqtSignal
from qgis.PyQt.QtGui import QColor, QDesktopServices, QIcon
from qgis.PyQt.QtWidgets import (
    QApplication,
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ..errors import SarmaePluginError
from ..model_cards import PackageCard, card_or_none, describe_html, list_packages, read_card
from ..model_store import (
    PackageExistsError,
    delete_package,
    export_package,
    import_package,
    is_package,
    safe_name,
)
from ..tasks.export_task import ExportTask, export_args
from ..toolbelt import settings
from .about_dialog import ICON_PATH

TITLE = "SARMAE: Models"
FIGURES = (("training_curves.png", "Training curves"), ("confusion_matrix.png", "Confusion matrix"))
FIGURE_WIDTH = 360  # px in the card view
PATH_ROLE = Qt.UserRole


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _short(value: object, limit: int = 160) -> str | None:
    """A provenance value as one short line, or None for nested structures."""
    if isinstance(value, bool) or value is None:
        return None if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str)):
        text = " ".join(str(value).split())
        return text if len(text) <= limit else text[: limit - 1] + "…"
    if isinstance(value, list) and len(value) <= 8 and all(isinstance(v, (int, float, str)) for v in value):
        return _short(", ".join(str(v) for v in value), limit)
    return None


def card_html(card: PackageCard) -> str:
    """The card view: :func:`~sarmae_qgis.model_cards.describe_html`, then architecture, input range,
    provenance, the package's files, and its training figures when the package has them."""
    raw = card.raw if isinstance(card.raw, dict) else {}
    rows: list[tuple[str, str]] = []
    arch = raw.get("architecture") or {}
    if isinstance(arch, dict) and arch.get("name"):
        enc = arch.get("encoder") or {}
        depth = f", depth {enc['depth']}" if isinstance(enc, dict) and "depth" in enc else ""
        rows.append(("Architecture", f"{arch['name']}{depth}"))
    inp = raw.get("input") or {}
    if isinstance(inp, dict) and isinstance(inp.get("clip"), list) and len(inp["clip"]) == 2:
        rows.append(("Input range", f"{inp['clip'][0]} … {inp['clip'][1]} (clipped)"))
    prov = raw.get("provenance") or {}
    if isinstance(prov, dict):
        for key, value in prov.items():
            text = _short(value)
            if text and key != "metrics":
                rows.append((key.replace("_", " ").capitalize(), text))
    path = Path(card.path)
    files = []
    if path.is_dir():
        files = [f"{escape(p.name)} ({_size(p.stat().st_size)})" for p in sorted(path.iterdir()) if p.is_file()]
    elif path.is_file():
        files = [f"{escape(path.name)} ({_size(path.stat().st_size)}, zipped)"]
    table = "".join(f"<tr><td valign='top'><i>{escape(k)}</i>&nbsp;</td><td>{escape(v)}</td></tr>" for k, v in rows)
    if files:
        table += f"<tr><td valign='top'><i>Files</i>&nbsp;</td><td>{', '.join(files)}</td></tr>"
    parts = [describe_html(card), f"<table cellspacing='0' cellpadding='1'>{table}</table>"]
    if path.is_dir():
        for name, label in FIGURES:
            fig = path / name
            if fig.is_file():
                url = escape(QUrl.fromLocalFile(str(fig)).toString(), quote=True)
                parts.append(f"<p><b>{label}</b> (<a href=\"{url}\">open</a>)<br>"
                             f"<img src=\"{url}\" width=\"{FIGURE_WIDTH}\"></p>")
    return "<p>" + parts[0] + "</p><hr>" + "".join(parts[1:])


class ModelsDialog(QDialog):
    """List, import, export and delete the model packages of the models folder."""

    modelsChanged = pyqtSignal()  # noqa: N815  # Qt's signal naming

    def __init__(self, parent: QWidget | None = None, models_folder: str | Path | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(TITLE)
        self.setWindowIcon(QIcon(str(ICON_PATH)))
        self.models_folder = Path(models_folder).expanduser() if models_folder else settings.models_folder()
        try:  # so that users find where packages go
            self.models_folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        self.last_folder = str(Path.home())  # where the file dialogs open

        self.message_bar = QgsMessageBar(self)
        self.message_bar.setSizePolicy(QSizePolicy.Minimum, QSizePolicy.Fixed)
        self.folder_label = QLabel(self)
        self.folder_label.setTextFormat(Qt.RichText)
        self.folder_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.folder_label.setWordWrap(True)  # a long path must not widen the dialog
        self.folder_label.setText(f"Models folder: <b>{escape(str(self.models_folder))}</b> "
                                  "<small>(change it in SARMAE Settings)</small>")
        self.list_widget = QListWidget(self)
        self.list_widget.setMinimumWidth(220)
        self.card_view = QTextBrowser(self)
        self.card_view.setOpenLinks(False)
        self.card_view.anchorClicked.connect(self._open_link)

        self.import_folder_button = QPushButton("Import folder…", self)
        self.import_folder_button.setToolTip("Copy a model package folder (with model.json) into the models folder")
        self.import_zip_button = QPushButton("Import zip…", self)
        self.import_zip_button.setToolTip("Unpack a model package .zip into the models folder")
        self.export_button = QPushButton("Export…", self)
        self.export_button.setToolTip("Write the selected package as a .zip to share it")
        self.int8_button = QPushButton("Make int8 model…", self)
        self.int8_button.setToolTip("Add an int8 model (model.int8.onnx) to the selected package: faster runs on CPUs "
                                    "with int8 instructions (precision auto or int8). You choose a raster like those "
                                    "the model will process; the int8 model is kept only if it agrees with the full "
                                    "model on it (the card shows the figure)")
        self.int8_task: ExportTask | None = None  # the export running, if any
        self.delete_button = QPushButton("Delete", self)
        self.delete_button.setToolTip("Delete the selected package from the models folder")
        self.open_button = QPushButton("Open folder", self)
        self.open_button.setToolTip("Show the models folder in the file manager")
        self.close_button = QPushButton("Close", self)

        splitter = QSplitter(Qt.Horizontal, self)
        splitter.addWidget(self.list_widget)
        splitter.addWidget(self.card_view)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 2)
        splitter.setSizes([280, 560])
        splitter.setChildrenCollapsible(False)
        buttons = QHBoxLayout()
        for b in (self.import_folder_button, self.import_zip_button, self.export_button, self.int8_button,
                  self.delete_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.close_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.message_bar)
        layout.addWidget(self.folder_label)
        layout.addWidget(splitter, 1)
        layout.addLayout(buttons)
        self.setMinimumSize(640, 380)
        self.resize(900, 520)

        # clicked(bool) must not reach the methods' flags: every button goes through a lambda
        self.import_folder_button.clicked.connect(lambda: self.import_folder_interactive())
        self.import_zip_button.clicked.connect(lambda: self.import_zip_interactive())
        self.export_button.clicked.connect(lambda: self.export_interactive())
        self.int8_button.clicked.connect(lambda: self.make_int8_interactive())
        self.delete_button.clicked.connect(lambda: self.delete_selected(confirm=True))
        self.open_button.clicked.connect(lambda: self.open_folder())
        self.close_button.clicked.connect(self.reject)
        self.list_widget.currentItemChanged.connect(lambda *_: self._show_current())
        self.refresh()

    # ---- list and card --------------------------------------------------------------------------
    def refresh(self, select: str | Path | None = None) -> None:
        """List the packages of the models folder (readable ones by name, then unreadable ones, which
        can still be deleted) and select ``select`` or the previous selection."""
        keep = str(select) if select is not None else self.selected_path()
        self.list_widget.blockSignals(True)
        self.list_widget.clear()
        cards = list_packages(self.models_folder)
        listed = {c.path for c in cards}
        for card in cards:
            zipped = " [zip]" if card.path.lower().endswith(".zip") else ""
            item = QListWidgetItem(f"{card.name} ({card.task}){zipped}")
            item.setData(PATH_ROLE, card.path)
            item.setToolTip(card.path)
            self.list_widget.addItem(item)
        if self.models_folder.is_dir():
            for p in sorted(self.models_folder.iterdir()):
                if not p.name.startswith(".") and str(p) not in listed and is_package(p):
                    item = QListWidgetItem(f"{p.name} (unreadable)")
                    item.setData(PATH_ROLE, str(p))
                    item.setForeground(QColor("#b00000"))
                    item.setToolTip(str(p))
                    self.list_widget.addItem(item)
        self.list_widget.blockSignals(False)
        paths = self.package_paths()
        row = paths.index(keep) if keep in paths else (0 if paths else -1)
        self.list_widget.setCurrentRow(row)
        self._show_current()

    def package_paths(self) -> list[str]:
        """The paths listed, in list order."""
        return [self.list_widget.item(i).data(PATH_ROLE) for i in range(self.list_widget.count())]

    def select(self, path: str | Path) -> bool:
        """Select the package at ``path``; False when it is not listed."""
        paths = self.package_paths()
        if str(path) not in paths:
            return False
        self.list_widget.setCurrentRow(paths.index(str(path)))
        return True

    def selected_path(self) -> str | None:
        item = self.list_widget.currentItem()
        return item.data(PATH_ROLE) if item is not None else None

    def selected_card(self) -> PackageCard | None:
        """The selected package's card (None when nothing is selected or the card does not read)."""
        return card_or_none(self.selected_path())

    def _show_current(self) -> None:
        path = self.selected_path()
        self.export_button.setEnabled(path is not None)
        self.delete_button.setEnabled(path is not None)
        self.int8_button.setEnabled(False)
        if path is None:
            self.card_view.setHtml(f"<p>No model packages in <b>{escape(str(self.models_folder))}</b>.</p>"
                                   "<p>Use <b>Import folder…</b> or <b>Import zip…</b> to install a package "
                                   "(made by fine-tuning, <code>sarmae convert</code> or "
                                   "<code>sarmae init</code>).</p>")
            return
        try:
            card = read_card(path)
        except SarmaePluginError as e:
            self.export_button.setEnabled(False)
            self.card_view.setHtml(f"<p style='color:#b00000'>{escape(str(e))}</p>"
                                   "<p>This package cannot be used; delete it or import a good copy.</p>")
            return
        self.card_view.setHtml(card_html(card))
        # a network in a package folder (the export rewrites it in place; a zip: import it first)
        self.int8_button.setEnabled(self.int8_task is None and not card.method and Path(card.path).is_dir())

    def _open_link(self, url: QUrl) -> None:
        QDesktopServices.openUrl(url)

    # ---- user interaction (replaceable in tests) ------------------------------------------------
    def show_error(self, message: str) -> None:
        QMessageBox.warning(self, TITLE, message)

    def show_info(self, message: str) -> None:
        self.message_bar.clearWidgets()
        self.message_bar.pushMessage(message, Qgis.Success, 6)

    def ask(self, question: str) -> bool:
        """A Yes/No question (No is the default)."""
        answer = QMessageBox.question(self, TITLE, question, QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    @contextmanager
    def _busy(self) -> Iterator[None]:
        QApplication.setOverrideCursor(Qt.WaitCursor)
        try:
            yield
        finally:
            QApplication.restoreOverrideCursor()

    def _changed(self, select: str | Path | None = None) -> None:
        self.refresh(select)
        self.modelsChanged.emit()

    # ---- actions --------------------------------------------------------------------------------
    def import_from(self, path: str | Path, overwrite: bool | None = None) -> Path | None:
        """Install the package folder or .zip at ``path``. An installed package of the same name is
        replaced when ``overwrite`` is True, kept when False, and the user is asked when None.
        Returns the installed folder, or None (refused, cancelled or failed: see :meth:`show_error`)."""
        try:
            with self._busy():
                target = import_package(path, self.models_folder, overwrite=bool(overwrite))
        except PackageExistsError as e:
            if overwrite is False or not self.ask(f"A package is already installed as {e.target.name} "
                                                  f"({e.target}). Replace it with {path}?"):
                if overwrite is False:
                    self.show_error(str(e))
                return None
            return self.import_from(path, overwrite=True)
        except SarmaePluginError as e:
            self.show_error(str(e))
            return None
        self.show_info(f"Installed {target.name} in {self.models_folder}")
        self._changed(target)
        return target

    def import_folder_interactive(self) -> Path | None:
        folder = QFileDialog.getExistingDirectory(self, "Import a model package folder", self.last_folder)
        if not folder:
            return None
        self.last_folder = str(Path(folder).parent)
        return self.import_from(folder)

    def import_zip_interactive(self) -> Path | None:
        path, _ = QFileDialog.getOpenFileName(self, "Import a model package zip", self.last_folder,
                                              "Model packages (*.zip);;All files (*)")
        if not path:
            return None
        self.last_folder = str(Path(path).parent)
        return self.import_from(path)

    def export_to(self, path: str | Path, overwrite: bool | None = None) -> Path | None:
        """Write the selected package as a .zip at ``path`` (``.zip`` appended when missing). An existing
        file is replaced when ``overwrite`` is True, kept when False, and the user is asked when None."""
        card = self.selected_card()
        if card is None:
            self.show_error("Select a readable model package to export first.")
            return None
        try:
            with self._busy():
                out = export_package(card, path, overwrite=bool(overwrite))
        except PackageExistsError as e:
            if overwrite is False or not self.ask(f"{e.target} already exists. Replace it?"):
                if overwrite is False:
                    self.show_error(str(e))
                return None
            return self.export_to(path, overwrite=True)
        except SarmaePluginError as e:
            self.show_error(str(e))
            return None
        self.show_info(f"Exported {card.name} to {out}")
        return out

    def export_interactive(self) -> Path | None:
        card = self.selected_card()
        if card is None:
            self.show_error("Select a readable model package to export first.")
            return None
        start = str(Path(self.last_folder) / f"{safe_name(card.name)}.zip")
        path, _ = QFileDialog.getSaveFileName(self, "Export model package", start, "Zip archives (*.zip)")
        if not path:
            return None
        self.last_folder = str(Path(path).parent)
        # the file dialog has already confirmed replacing an existing .zip of that exact name
        return self.export_to(path, overwrite=True if path.lower().endswith(".zip") else None)

    def delete_selected(self, confirm: bool = True) -> bool:
        """Delete the selected package from the models folder, asking first when ``confirm``."""
        path = self.selected_path()
        if path is None:
            self.show_error("Select a model package to delete first.")
            return False
        item = self.list_widget.currentItem()
        if confirm and not self.ask(f"Delete the model package {item.text()} ({path})? This cannot be undone."):
            return False
        try:
            with self._busy():
                delete_package(path, self.models_folder)
        except SarmaePluginError as e:
            self.show_error(str(e))
            return False
        self.show_info(f"Deleted {Path(path).name}")
        self._changed()
        return True

    def open_folder(self) -> bool:
        """Show the models folder in the system's file manager."""
        try:
            self.models_folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.show_error(f"Cannot create the models folder {self.models_folder} ({e.strerror or e}); "
                            "choose another one in SARMAE Settings.")
            return False
        return bool(QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.models_folder))))

    def make_int8_interactive(self) -> ExportTask | None:
        card = self.selected_card()
        if card is None:
            self.show_error("Select a readable model package first.")
            return None
        path, _ = QFileDialog.getOpenFileName(
            self, f"Calibration raster for {card.name}: a scene like those it will process", self.last_folder,
            "Rasters (*.tif *.tiff *.vrt *.img *.jp2);;All files (*)")
        if not path:
            return None
        self.last_folder = str(Path(path).parent)
        return self.make_int8(path)

    def make_int8(self, calibration: str | Path | None, force: bool = False) -> ExportTask | None:
        """Start ``sarmae export --precision int8`` on the selected package, gated on windows of the
        ``calibration`` raster (None: random windows, a figure that means little; ``force``: write it
        below the gate). The outcome comes back in :meth:`_int8_done`; returns the task (None: refused)."""
        card = self.selected_card()
        if card is None:
            self.show_error("Select a readable model package first.")
            return None
        if self.int8_task is not None:
            self.show_error("An int8 model is being made; wait for it to finish.")
            return None
        if card.method or not Path(card.path).is_dir():
            self.show_error(f"{card.name}: only a package folder with a network gets an int8 model "
                            + ("(this one has no network)" if card.method else "(import this zip first)") + ".")
            return None
        task = ExportTask(f"int8 model of {card.name}",
                          export_args(card.path, "int8", str(calibration) if calibration else None, force),
                          lambda output, error, cancelled: self._int8_done(card.path, output, error, cancelled))
        self.int8_task = task
        self.int8_button.setEnabled(False)
        self.message_bar.clearWidgets()
        self.message_bar.pushMessage(f"Making the int8 model of {card.name}…", Qgis.Info, 0)
        QgsApplication.taskManager().addTask(task)
        return task

    def _int8_done(self, path: str, output: str | None, error: str | None, cancelled: bool = False) -> None:
        self.int8_task = None
        self.message_bar.clearWidgets()
        name = Path(path).name
        if error is not None:
            self._show_current()
            if not cancelled:  # the user's own cancel needs no error
                self.show_error(f"No int8 model was written for {name}: {error}")
            return
        card = card_or_none(path)
        gate = card.int8_gate if card is not None and card.has_int8 else {}
        if not gate:
            self._show_current()
            self.show_error(f"{name}: the export ended without an int8 model: {(output or '').strip()[-400:]}")
            return
        self.show_info(f"{card.name}: int8 model written ({gate.get('metric')} with fp32 "
                       f"{float(gate.get('value', 0)):.4f} on {gate.get('windows')} window(s)"
                       + (", forced below the gate" if gate.get("forced") else "") + ")")
        self._changed(path)
