"""A model package picker shared by the Run, Fine-tune and Similarity dialogs.

:class:`PackagePicker` is a row with a combo box of the packages installed in the models folder
(optionally only those of some tasks, optionally followed by extra items such as "random
initialisation" whose data is ``""``) and a "Browse…" button for a package from elsewhere; its
:attr:`PackagePicker.card_label` (placed by the dialog, see :meth:`PackagePicker.add_to_form`)
describes the chosen package with :func:`~sarmae_qgis.model_cards.describe_html`, says why it
does not read, or says that the models folder holds no package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QWidget,
)

from ..errors import SarmaePluginError
from ..model_cards import PackageCard, card_or_none, describe_html, list_packages, read_card

EMPTY_TEXT = "No model packages in {folder}: copy packages there (Settings: models folder) or Browse… for one."


def name_and_task(card: PackageCard) -> str:
    return f"{card.name} ({card.task})"


class PackagePicker(QWidget):
    """Combo box of packages + "Browse…"; ``changed`` is emitted with the chosen path ("" for an
    extra item) after :attr:`card_label` has been updated.

    - ``tasks``: the tasks listed from the models folder (None: all); Browse… accepts any package.
    - ``item_text(card)``: an installed package's text; ``added_text(card, path)``: a browsed one's
      (default: ``item_text(card)``; the folder name when its card does not read).
    - ``extra_items``: (text, data) items listed after the packages.
    - ``add_first``: browsed packages go first instead of last.
    - ``empty_text`` (``{folder}``): shown when nothing is listed; ``no_package_text``: shown when
      the item chosen has no path (None: the card is left as it is); ``unreadable_text``
      (``{path}``, ``{error}``): in red when the chosen package does not read.
    """

    changed = pyqtSignal(str)

    def __init__(self, models_folder: str | Path, parent: QWidget | None = None, *,
                 tasks: Iterable[str] | None = None,
                 item_text: Callable[[PackageCard], str] = name_and_task,
                 added_text: Callable[[PackageCard, str], str] | None = None,
                 extra_items: Iterable[tuple[str, str]] = (), add_first: bool = False,
                 browse_title: str = "Model package folder", browse_tip: str = "",
                 empty_text: str = EMPTY_TEXT, no_package_text: str | None = None,
                 unreadable_text: str = "{error}", card_min_height: int = 0) -> None:
        super().__init__(parent)
        self.models_folder = Path(models_folder)
        self.tasks = tuple(tasks) if tasks is not None else None
        self.item_text = item_text
        self.added_text = added_text or (lambda card, _path: item_text(card))
        self.extra_items = tuple(extra_items)
        self.added: list[str] = []  # packages added with Browse… (kept across refreshes)
        self.add_first = add_first
        self.browse_title = browse_title
        self.empty_text = empty_text
        self.no_package_text = no_package_text
        self.unreadable_text = unreadable_text
        self.sort_key: Callable[[PackageCard], object] | None = None  # None: by name (list_packages' order)

        self.combo = QComboBox(self)
        self.combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.browse_button = QPushButton("Browse…", self)
        if browse_tip:
            self.browse_button.setToolTip(browse_tip)
        self.card_label = QLabel(parent)
        self.card_label.setTextFormat(Qt.RichText)
        self.card_label.setWordWrap(True)
        if card_min_height:
            self.card_label.setMinimumHeight(card_min_height)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.browse_button)
        self.combo.currentIndexChanged.connect(self._on_index_changed)
        self.browse_button.clicked.connect(self.browse)

    def add_to_form(self, form: QFormLayout, label: str) -> None:
        """Two rows of ``form``: ``label`` with the combo and Browse…, then the card."""
        form.addRow(label, self)
        form.addRow("", self.card_label)

    def refresh(self, keep_choice: bool = False) -> None:
        """List the packages of the models folder (of ``tasks``, ordered by ``sort_key``), then the
        extra items and the packages added with Browse… (kept across refreshes); the first is
        selected, unless a package added with Browse… was (or, with ``keep_choice``, the package
        chosen is still there): it stays selected."""
        keep = self.current_path() if (keep_choice or self.current_path() in self.added) else None
        self.combo.blockSignals(True)
        self.combo.clear()
        cards = list_packages(self.models_folder)
        if self.sort_key is not None:
            cards.sort(key=self.sort_key)
        for card in cards:
            if self.tasks is None or card.task in self.tasks:
                self.combo.addItem(self.item_text(card), card.path)
        for text, data in self.extra_items:
            self.combo.addItem(text, data)
        for path in self.added:
            self._insert(path)
        if keep is not None and self.combo.findData(keep) >= 0:
            self.combo.setCurrentIndex(self.combo.findData(keep))
        self.combo.blockSignals(False)
        if self.combo.count() == 0:
            self.card_label.setText(self.empty_text.format(folder=self.models_folder))
        else:
            self._on_index_changed(self.combo.currentIndex())

    def add_package(self, path: str | Path) -> int:
        """Add a package from outside the models folder (Browse…) and select it; returns its index.
        It stays in the list when the list is refreshed (another layer, a new model)."""
        path = str(path)
        if path not in self.added:
            self.added.append(path)
        index = self._insert(path)
        self.combo.setCurrentIndex(index)
        return index

    def _insert(self, path: str) -> int:
        """The index of ``path`` in the list, inserted (first or last, ``add_first``) when missing."""
        index = self.combo.findData(path)
        if index < 0:
            try:
                text = self.added_text(read_card(path), path)
            except SarmaePluginError:
                text = Path(path).name
            index = 0 if self.add_first else self.combo.count()
            self.combo.insertItem(index, text, path)
        return index

    def browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, self.browse_title, str(self.models_folder))
        if folder:
            self.add_package(folder)

    def current_path(self) -> str | None:
        """The chosen package's path (None: nothing, or an extra item without a package)."""
        return self.combo.currentData() or None

    def current_card(self) -> PackageCard | None:
        """The chosen package's card (None: no package, or its card does not read)."""
        return card_or_none(self.current_path())

    def _on_index_changed(self, _index: int) -> None:
        path = self.current_path()
        if not path:
            if self.no_package_text is not None:
                self.card_label.setText(self.no_package_text)
            self.changed.emit("")
            return
        try:
            self.card_label.setText(describe_html(read_card(path), brief=True))
            self.card_label.setToolTip(str(path))
        except SarmaePluginError as e:
            text = self.unreadable_text.format(path=path, error=e)
            self.card_label.setText(f"<span style='color:#b00'>{text}</span>")
        self.changed.emit(path)
