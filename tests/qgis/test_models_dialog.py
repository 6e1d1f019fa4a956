"""The Models dialog on real (tiny) packages: list, card view, import a folder or a zip (unsafe and
corrupt zips refused with nothing written), overwrite only when asked, export and re-import,
delete only installed packages, buttons that ask before they change anything.

With ``SARMAE_SCREENSHOTS=<folder>`` the screenshot test also saves ``models_dialog.png`` there.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QColor, QImage
from qgis.PyQt.QtWidgets import QApplication, QListWidgetItem

from sarmae_qgis.gui import models_dialog
from sarmae_qgis.gui.models_dialog import PATH_ROLE, ModelsDialog
from sarmae_qgis.model_cards import read_card

pytestmark = pytest.mark.qgis


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def models(assets, tmp_path) -> Path:
    """A models folder with two packages, one zipped package, an unreadable one and some clutter."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(assets / "segment.pkg", folder / "segment.pkg")
    shutil.copytree(assets / "detect.pkg", folder / "detect.pkg")
    shutil.make_archive(str(folder / "classify"), "zip", assets, "classify.pkg")
    (folder / "broken").mkdir()
    (folder / "broken" / "model.json").write_text("{not json")
    (folder / "notes.txt").write_text("not a model")
    (folder / "empty").mkdir()
    return folder


class Recorder:
    """Stands in for the message boxes: records errors, answers questions with ``answer``."""

    def __init__(self, dialog: ModelsDialog) -> None:
        self.errors: list[str] = []
        self.questions: list[str] = []
        self.answer = False
        self.changed = 0
        dialog.show_error = self.errors.append
        dialog.ask = self.ask
        dialog.modelsChanged.connect(self.on_changed)

    def ask(self, question: str) -> bool:
        self.questions.append(question)
        return self.answer

    def on_changed(self) -> None:
        self.changed += 1


@pytest.fixture
def dialog(qgis_iface, models):
    d = ModelsDialog(qgis_iface.mainWindow(), models_folder=models)
    d.recorder = Recorder(d)
    yield d
    d.close()
    d.deleteLater()


def labels(d: ModelsDialog) -> list[str]:
    return [d.list_widget.item(i).text() for i in range(d.list_widget.count())]


def evil_zip(path: Path, source: Path, entries: dict[str, bytes]) -> Path:
    """A package zip of ``source`` with extra ``entries`` added as they are."""
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(source.iterdir()):
            z.write(p, f"pkg/{p.name}")
        for name, data in entries.items():
            z.writestr(name, data)
    return path


# ---- list and card -------------------------------------------------------------------------------
def test_lists_installed_packages_and_unreadable_ones(dialog, models):
    assert labels(dialog) == ["tiny-classify (classify) [zip]", "tiny-detect (detect)",
                              "tiny-segment (segment)", "broken (unreadable)"]
    assert dialog.package_paths()[1] == str(models / "detect.pkg")
    assert dialog.selected_path() == str(models / "classify.zip")  # first one selected
    assert str(models) in dialog.folder_label.text()


def test_card_view_shows_name_task_classes_and_files(dialog, models):
    assert dialog.select(models / "segment.pkg")
    text = dialog.card_view.toPlainText()
    assert "tiny-segment" in text and "segment" in text and "water" in text and "land" in text
    assert "VV+VH" in text and "dB" in text and "vit_tiny_patch16" in text
    assert "weights.safetensors" in text and "model.json" in text
    assert dialog.export_button.isEnabled() and dialog.delete_button.isEnabled()
    assert dialog.selected_card().name == "tiny-segment"


def test_card_view_of_an_unreadable_package_says_why(dialog, models):
    assert dialog.select(models / "broken")
    assert "not valid JSON" in dialog.card_view.toPlainText()
    assert dialog.selected_card() is None
    assert not dialog.export_button.isEnabled() and dialog.delete_button.isEnabled()


def test_card_view_shows_training_figures(dialog, models):
    img = QImage(40, 20, QImage.Format_RGB32)
    img.fill(QColor("#336699"))
    assert img.save(str(models / "segment.pkg" / "training_curves.png"))
    dialog.refresh(models / "segment.pkg")
    html = dialog.card_view.toHtml()
    assert "training_curves.png" in html and "<img" in html and "Training curves" in dialog.card_view.toPlainText()
    assert "confusion_matrix.png" not in html


def test_empty_models_folder(qgis_iface, tmp_path):
    d = ModelsDialog(qgis_iface.mainWindow(), models_folder=tmp_path / "none_yet")
    try:
        assert (tmp_path / "none_yet").is_dir() and labels(d) == []
        assert "Import folder" in d.card_view.toPlainText()
        assert not d.export_button.isEnabled() and not d.delete_button.isEnabled()
    finally:
        d.deleteLater()


# ---- import --------------------------------------------------------------------------------------
def test_import_folder(dialog, assets, models):
    rec = dialog.recorder
    target = dialog.import_from(assets / "embed.pkg")
    assert target == models / "tiny-embed" and rec.errors == [] and rec.changed == 1
    assert "tiny-embed (embed)" in labels(dialog) and dialog.selected_path() == str(target)
    assert (target / "weights.safetensors").read_bytes() == (assets / "embed.pkg" / "weights.safetensors").read_bytes()
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_import_zip(dialog, assets, models, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "reconstruct"), "zip", assets, "reconstruct.pkg")
    target = dialog.import_from(archive)
    assert target == models / "tiny-reconstruct" and dialog.recorder.errors == []
    assert read_card(target).task == "reconstruct" and dialog.selected_card().name == "tiny-reconstruct"


@pytest.mark.parametrize("entry", ["../evil.txt", "/abs.txt", "pkg/../../evil.txt"])
def test_zip_slip_refused_with_nothing_written(dialog, assets, models, tmp_path, entry):
    archive = evil_zip(tmp_path / "evil.zip", assets / "embed.pkg", {entry: b"pwned"})
    before_models, before_tmp = tree(models), tree(tmp_path)
    assert dialog.import_from(archive, overwrite=True) is None
    assert len(dialog.recorder.errors) == 1 and "refused" in dialog.recorder.errors[0]
    assert "evil.zip" in dialog.recorder.errors[0]
    assert tree(models) == before_models and tree(tmp_path) == before_tmp and dialog.recorder.changed == 0
    assert not (tmp_path / "evil.txt").exists() and not (models.parent.parent / "evil.txt").exists()
    assert not Path("/abs.txt").exists()


def test_zip_slip_with_every_bad_entry_at_once(dialog, assets, models, tmp_path):
    archive = evil_zip(tmp_path / "evil.zip", assets / "embed.pkg", {"../evil.txt": b"x", "/abs.txt": b"y"})
    before = tree(tmp_path)
    assert dialog.import_from(archive) is None
    assert "refused" in dialog.recorder.errors[0] and tree(tmp_path) == before


def test_corrupt_zip_and_zip_without_model_json_refused(dialog, models, tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    nocard = tmp_path / "nocard.zip"
    with zipfile.ZipFile(nocard, "w") as z:
        z.writestr("pkg/weights.safetensors", b"0" * 16)
    before = tree(models)
    assert dialog.import_from(junk) is None and dialog.import_from(nocard) is None
    assert tree(models) == before
    errors = dialog.recorder.errors
    assert len(errors) == 2 and "junk.zip" in errors[0] and "nocard.zip" in errors[1] and "model.json" in errors[1]


def test_folder_without_model_json_refused(dialog, tmp_path):
    (tmp_path / "plain").mkdir()
    assert dialog.import_from(tmp_path / "plain") is None
    assert "no model.json" in dialog.recorder.errors[0]


def test_overwrite_refused_then_allowed(dialog, assets, models):
    rec = dialog.recorder
    target = dialog.import_from(assets / "embed.pkg")
    (target / "marker.txt").write_text("old copy")
    assert dialog.import_from(assets / "embed.pkg", overwrite=False) is None  # explicit: no question
    assert rec.questions == [] and "already exists" in rec.errors[-1]
    rec.answer = False
    assert dialog.import_from(assets / "embed.pkg") is None  # asked, declined: no error box either
    assert len(rec.questions) == 1 and "tiny-embed" in rec.questions[0] and len(rec.errors) == 1
    assert (target / "marker.txt").is_file()
    rec.answer = True
    assert dialog.import_from(assets / "embed.pkg") == target
    assert len(rec.questions) == 2 and not (target / "marker.txt").exists()
    (target / "marker.txt").write_text("old copy")
    assert dialog.import_from(assets / "embed.pkg", overwrite=True) == target  # explicit: no question
    assert len(rec.questions) == 2 and not (target / "marker.txt").exists()
    assert labels(dialog).count("tiny-embed (embed)") == 1 and rec.changed == 3


# ---- export --------------------------------------------------------------------------------------
def test_export_then_reimport_round_trip(dialog, models, tmp_path):
    rec = dialog.recorder
    assert dialog.select(models / "segment.pkg")
    out = dialog.export_to(tmp_path / "share" / "water")
    assert out == tmp_path / "share" / "water.zip" and rec.errors == []
    assert dialog.delete_selected(confirm=False)
    assert "tiny-segment (segment)" not in labels(dialog)
    target = dialog.import_from(out)
    assert target == models / "tiny-segment" and rec.errors == []
    card = read_card(target)
    assert card.task == "segment" and card.class_names == ["water", "land"]
    assert dialog.selected_card() == card


def test_export_asks_before_replacing(dialog, models, tmp_path):
    rec = dialog.recorder
    dialog.select(models / "detect.pkg")
    dest = tmp_path / "detect.zip"
    dest.write_bytes(b"old")
    rec.answer = False
    assert dialog.export_to(dest) is None and dest.read_bytes() == b"old" and len(rec.questions) == 1
    assert dialog.export_to(dest, overwrite=False) is None and "already exists" in rec.errors[-1]
    rec.answer = True
    assert dialog.export_to(dest) == dest and read_card(dest).name == "tiny-detect"


def test_export_an_unreadable_package_is_refused(dialog, models, tmp_path):
    dialog.select(models / "broken")
    assert dialog.export_to(tmp_path / "broken.zip") is None
    assert "Select a readable model package" in dialog.recorder.errors[0]
    assert not (tmp_path / "broken.zip").exists()


# ---- delete --------------------------------------------------------------------------------------
def test_delete_asks_first(dialog, models):
    rec = dialog.recorder
    dialog.select(models / "detect.pkg")
    rec.answer = False
    assert not dialog.delete_selected()
    assert (models / "detect.pkg").is_dir() and "tiny-detect" in rec.questions[0] and rec.changed == 0
    rec.answer = True
    assert dialog.delete_selected()
    assert not (models / "detect.pkg").exists() and rec.changed == 1
    assert "tiny-detect (detect)" not in labels(dialog)
    assert dialog.selected_path() is not None  # another package is selected


def test_delete_button_asks_even_though_clicked_passes_a_bool(dialog, models):
    rec = dialog.recorder
    dialog.select(models / "segment.pkg")
    rec.answer = False
    dialog.delete_button.click()
    assert len(rec.questions) == 1 and (models / "segment.pkg").is_dir()


def test_delete_zip_and_unreadable_packages(dialog, models):
    for path in (models / "classify.zip", models / "broken"):
        assert dialog.select(path) and dialog.delete_selected(confirm=False)
    assert labels(dialog) == ["tiny-detect (detect)", "tiny-segment (segment)"]
    assert (models / "notes.txt").is_file() and (models / "empty").is_dir()


def test_delete_refuses_outside_the_models_folder(dialog, assets):
    outside = QListWidgetItem("outside")  # as if the list held a stale or foreign path
    outside.setData(PATH_ROLE, str(assets / "detect.pkg"))
    dialog.list_widget.addItem(outside)
    dialog.list_widget.setCurrentItem(outside)
    assert not dialog.delete_selected(confirm=False)
    assert "not inside the models folder" in dialog.recorder.errors[0]
    assert (assets / "detect.pkg" / "model.json").is_file()


# ---- file dialogs and folder ---------------------------------------------------------------------
def test_buttons_go_through_the_file_dialogs(dialog, assets, models, tmp_path, monkeypatch):
    class FakeFileDialog:
        @staticmethod
        def getExistingDirectory(*args):  # noqa: N802
            return str(assets / "classify.pkg")

        @staticmethod
        def getOpenFileName(*args):  # noqa: N802
            return "", ""  # cancelled

        @staticmethod
        def getSaveFileName(*args):  # noqa: N802
            return str(tmp_path / "out" / "classify.zip"), "Zip archives (*.zip)"

    monkeypatch.setattr(models_dialog, "QFileDialog", FakeFileDialog)
    dialog.import_folder_button.click()
    assert (models / "tiny-classify").is_dir() and dialog.selected_path() == str(models / "tiny-classify")
    dialog.import_zip_button.click()  # cancelled: nothing happens
    dialog.export_button.click()
    assert read_card(tmp_path / "out" / "classify.zip").name == "tiny-classify"
    assert dialog.recorder.errors == [] and dialog.recorder.changed == 1


def test_open_folder(dialog, models, monkeypatch):
    opened = []

    class FakeDesktop:
        @staticmethod
        def openUrl(url):  # noqa: N802
            opened.append(url.toLocalFile())
            return True

    monkeypatch.setattr(models_dialog, "QDesktopServices", FakeDesktop)
    dialog.open_button.click()
    assert opened == [str(models)]


def test_screenshot(qgis_iface, assets, tmp_path):
    """Saved only when SARMAE_SCREENSHOTS names a folder (docs/screenshots for the docs)."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("segment", "detect", "classify", "embed"):
        shutil.copytree(assets / f"{name}.pkg", folder / f"{name}.pkg")
    d = ModelsDialog(qgis_iface.mainWindow(), models_folder=folder)
    try:
        d.setWindowFlag(Qt.Window)
        d.resize(900, 520)
        d.select(folder / "segment.pkg")
        d.show()
        QApplication.processEvents()
        image = d.grab()
        assert image.width() == 900 and image.height() == 520
        out = os.environ.get("SARMAE_SCREENSHOTS")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            assert image.save(str(Path(out) / "models_dialog.png"))
    finally:
        d.close()
        d.deleteLater()
