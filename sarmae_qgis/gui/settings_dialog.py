"""SARMAE settings: the engine's Python interpreter (with a "Test engine" button), the models
folder, run defaults and the output folder. Stored through ``toolbelt/settings.py``."""

from __future__ import annotations

from qgis.core import QgsApplication
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..engine_client import default_python
from ..tasks.engine_info_task import EngineInfoTask, format_info
from ..toolbelt import settings
from .about_dialog import ICON_PATH


class SettingsDialog(QDialog):
    """Edit :class:`~sarmae_qgis.toolbelt.settings.PluginSettings`; OK saves them."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("SARMAE: Settings")
        self.setWindowIcon(QIcon(str(ICON_PATH)))
        s = settings.load()
        self.test_task: EngineInfoTask | None = None

        self.python_widget = QgsFileWidget(self)
        self.python_widget.setStorageMode(QgsFileWidget.GetFile)
        self.python_widget.setFilePath(s.engine_python)
        self.python_widget.lineEdit().setPlaceholderText(f"default: {default_python()}")
        self.test_button = QPushButton("Test engine", self)
        self.info_label = QLabel("Not tested yet.", self)
        self.info_label.setTextFormat(Qt.RichText)
        self.info_label.setWordWrap(True)
        self.info_label.setTextInteractionFlags(Qt.TextSelectableByMouse)

        self.models_widget = QgsFileWidget(self)
        self.models_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.models_widget.setFilePath(s.models_folder)
        self.models_widget.lineEdit().setPlaceholderText(f"default: {settings.default_models_folder()}")
        self.output_widget = QgsFileWidget(self)
        self.output_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.output_widget.setFilePath(s.output_folder)
        self.output_widget.lineEdit().setPlaceholderText("default: sarmae_outputs next to the saved project, else in your home folder")
        self.device_combo = QComboBox(self)
        self.device_combo.addItems(settings.DEVICES)
        self.device_combo.setCurrentText(s.device)
        self.backend_combo = QComboBox(self)
        self.backend_combo.addItems(settings.BACKENDS)
        self.backend_combo.setCurrentText(s.backend)
        self.precision_combo = QComboBox(self)
        self.precision_combo.addItems(settings.PRECISIONS)
        self.precision_combo.setCurrentText(s.precision)
        self.precision_combo.setToolTip(settings.PRECISION_HELP)
        self.batch_spin = QSpinBox(self)
        self.batch_spin.setRange(1, 1024)
        self.batch_spin.setValue(s.batch_size)

        form = QFormLayout()
        form.addRow("Engine Python", self.python_widget)
        form.addRow("", self.test_button)
        form.addRow("", self.info_label)
        form.addRow("Models folder", self.models_widget)
        form.addRow("Output folder", self.output_widget)
        form.addRow("Default device", self.device_combo)
        form.addRow("Default backend", self.backend_combo)
        form.addRow("Default precision", self.precision_combo)
        form.addRow("Default batch size", self.batch_spin)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(buttons)
        self.setMinimumWidth(560)
        self.test_button.clicked.connect(self.test_engine)

    def values(self) -> settings.PluginSettings:
        """The settings as shown in the widgets."""
        return settings.PluginSettings(
            engine_python=self.python_widget.filePath().strip(), models_folder=self.models_widget.filePath().strip(),
            device=self.device_combo.currentText(), backend=self.backend_combo.currentText(),
            batch_size=self.batch_spin.value(), output_folder=self.output_widget.filePath().strip(),
            precision=self.precision_combo.currentText())

    def test_engine(self) -> EngineInfoTask:
        """Start the engine with the interpreter shown and ask for its versions (in the background)."""
        python = settings.engine_python(self.values())
        self.info_label.setText(f"Starting the engine with {python}…")
        self.test_button.setEnabled(False)
        self.test_task = EngineInfoTask(python, self.show_info)
        QgsApplication.taskManager().addTask(self.test_task)
        return self.test_task

    def show_info(self, info: dict | None, error: str | None) -> None:
        self.test_button.setEnabled(True)
        if info is not None:
            self.info_label.setText(format_info(info))
        else:
            self.info_label.setText(f"<span style='color:#b00'>The engine did not answer: {error}</span>")
        self.grow_to_fit()

    def grow_to_fit(self) -> None:
        """Grow the dialog so that the engine's answer is shown whole (issue 16, item 7)."""
        self.layout().activate()
        hint = self.sizeHint()
        self.resize(max(self.width(), hint.width()), max(self.height(), hint.height()))

    def done(self, result: int) -> None:
        """Closing (OK or Cancel) forgets a test still running: its answer has nowhere to go."""
        if self.test_task is not None:
            self.test_task.on_done = lambda info, error: None
        super().done(result)

    def accept(self) -> None:
        settings.save(self.values())
        super().accept()
