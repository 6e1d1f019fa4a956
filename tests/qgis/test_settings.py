"""Settings (QgsSettings under sarmae/), the shared engine client that follows the configured
interpreter, and the settings dialog with its "Test engine" button."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from qgis.core import QgsProject, QgsSettings
from qgis.PyQt.QtCore import QCoreApplication
from waits import wait_until

from sarmae_qgis.engine_client import default_python
from sarmae_qgis.gui.settings_dialog import SettingsDialog
from sarmae_qgis.tasks.engine_info_task import format_info
from sarmae_qgis.toolbelt import engine, settings

pytestmark = pytest.mark.qgis



@pytest.fixture
def restore_settings():
    before = settings.load()
    yield
    settings.save(before)


def test_defaults_and_round_trip(restore_settings, tmp_path):
    QgsSettings().remove(settings.PREFIX)
    s = settings.load()
    assert s == settings.PluginSettings()
    assert settings.engine_python(s) == default_python()
    assert settings.models_folder(s) == settings.profile_folder() / "sarmae" / "models"
    assert settings.output_folder(s) == Path.home() / "sarmae_outputs"  # no saved project
    project = QgsProject.instance()
    project.setFileName(str(tmp_path / "flood.qgz"))  # a saved project: results go next to it
    try:
        assert settings.output_folder(s) == tmp_path / "sarmae_outputs"
    finally:
        project.setFileName("")
    s2 = settings.PluginSettings(engine_python=sys.executable, models_folder=str(tmp_path), device="cpu",
                                 backend="onnxruntime", batch_size=16, output_folder=str(tmp_path / "out"),
                                 precision="int8")
    settings.save(s2)
    assert settings.load() == s2
    assert settings.models_folder() == tmp_path
    settings.set_value("device", "tpu")  # not a device we know: back to auto
    settings.set_value("batch_size", "zero")
    settings.set_value("precision", "int4")
    assert settings.load().device == "auto" and settings.load().batch_size == 4 and settings.load().precision == "auto"
    with pytest.raises(KeyError):
        settings.set_value("colour", "red")


def test_client_follows_the_configured_python(restore_settings, tmp_path):
    settings.set_value("engine_python", sys.executable)
    client = engine.get_client()
    assert client is engine.get_client() and client.python == sys.executable
    assert client.info()["python_executable"]
    other = tmp_path / "python3"
    other.symlink_to(sys.executable)
    settings.set_value("engine_python", str(other))
    replaced = engine.get_client()
    assert replaced is not client and replaced.python == str(other)
    for _ in range(100):  # the old worker is shut down in the background
        if not client.alive:
            break
        time.sleep(0.1)
    assert not client.alive
    settings.set_value("engine_python", sys.executable)
    engine.shutdown_client()
    assert engine.current_client() is None


def test_settings_dialog_saves_and_tests_the_engine(qgis_iface, restore_settings, tmp_path):
    dialog = SettingsDialog(qgis_iface.mainWindow())
    try:
        dialog.python_widget.setFilePath(sys.executable)
        dialog.models_widget.setFilePath(str(tmp_path / "models"))
        dialog.device_combo.setCurrentText("cpu")
        dialog.precision_combo.setCurrentText("fp32")
        dialog.batch_spin.setValue(8)
        task = dialog.test_engine()
        assert not dialog.test_button.isEnabled()
        wait_until(dialog.test_button.isEnabled)
        text = dialog.info_label.text()
        assert task.info is not None, task.error
        assert "SARMAE engine" in text and "torch" in text and "Devices:<br>&nbsp;&nbsp;cpu" in text and sys.executable in text
        dialog.accept()
        s = settings.load()
        assert (s.engine_python, s.device, s.batch_size, s.precision) == (sys.executable, "cpu", 8, "fp32")
        assert settings.models_folder() == tmp_path / "models"
    finally:
        dialog.deleteLater()


def test_test_engine_reports_a_broken_interpreter(qgis_iface, tmp_path):
    dialog = SettingsDialog(qgis_iface.mainWindow())
    try:
        dialog.python_widget.setFilePath(str(tmp_path / "no_python"))
        task = dialog.test_engine()
        wait_until(dialog.test_button.isEnabled)
        assert task.status() == task.Terminated
        assert "did not answer" in dialog.info_label.text() and "cannot start" in dialog.info_label.text()
    finally:
        dialog.deleteLater()


def test_format_info():
    text = format_info({"engine_version": "0.1.0", "protocol": 1, "python": "3.11.2", "python_executable": "/py",
                        "versions": {"torch": "2.4.0", "onnxruntime": None},
                        "devices": [{"name": "cpu", "available": True, "description": "x86_64"},
                                    {"name": "cuda:0", "available": True, "description": "RTX", "memory_gb": 24.0},
                                    {"name": "mps", "available": False}], "gpu_usable": True})
    assert "torch 2.4.0" in text and "onnxruntime missing" in text and "cuda:0 (RTX, 24.0 GB)" in text
    assert "mps" not in text and "GPU usable" in text


def test_closing_the_dialog_during_a_test_is_harmless(qgis_iface):
    dialog = SettingsDialog(qgis_iface.mainWindow())
    dialog.python_widget.setFilePath(sys.executable)
    task = dialog.test_engine()
    dialog.reject()
    dialog.deleteLater()
    QCoreApplication.sendPostedEvents(None, 52)  # QEvent.DeferredDelete: the dialog is gone
    wait_until(lambda: task.status() in (task.Complete, task.Terminated))


def test_engine_answer_is_not_clipped(qgis_iface):
    """Issue 16, item 7: the Devices line was cut at the dialog's default size."""
    dialog = SettingsDialog(qgis_iface.mainWindow())
    dialog.show()
    QCoreApplication.processEvents()
    info = {"engine_version": "0.1.0", "protocol": 1, "python": "3.11.2", "python_executable": "/a/long/path/" * 4,
            "versions": {"torch": "2.4.0"}, "gpu_usable": True,
            "devices": [{"name": "cpu", "available": True, "description": "x86_64, 16 threads"},
                        {"name": "cuda:0", "available": True, "description": "NVIDIA H100 80GB HBM3", "memory_gb": 79.2}]}
    dialog.show_info(info, None)
    QCoreApplication.processEvents()
    label = dialog.info_label
    assert "NVIDIA H100 80GB HBM3, 79.2 GB" in label.text()
    assert label.height() >= label.heightForWidth(label.width())  # every line shown
    assert label.geometry().bottom() <= dialog.height()
    dialog.close()
