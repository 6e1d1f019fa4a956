"""Precision (auto / fp32 / int8) in the plugin, end to end with the real engine: the int8 model made
through Processing (``sarmae:export_onnx`` with precision int8) and through the Models dialog's
"Make int8 model…", shown in the cards with its gate figure; Processing runs, the Run dialog and
RunTask pass the choice to the engine (the log says int8 ran), and int8 on a package without an
int8 model is refused with a sentence that says how to make one, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bars import RecordingBar
from qgis import processing
from qgis.core import (
    Qgis,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsRasterLayer,
    QgsSettings,
)
from waits import wait_until

from sarmae_qgis.errors import RequestError
from sarmae_qgis.gui.models_dialog import ModelsDialog
from sarmae_qgis.gui.run_dialog import RunDialog
from sarmae_qgis.model_cards import describe_html, read_card
from sarmae_qgis.tasks.export_task import export_args
from sarmae_qgis.tasks.run_task import RunRequest, RunTask
from sarmae_qgis.toolbelt import settings

pytestmark = [pytest.mark.qgis, pytest.mark.usefixtures("provider")]


class Recorder(QgsProcessingFeedback):
    def __init__(self) -> None:
        super().__init__()
        self.infos: list[str] = []

    def pushInfo(self, info: str) -> None:  # noqa: N802
        self.infos.append(info)
        super().pushInfo(info)



@pytest.fixture(scope="module")
def int8_pkg(assets, provider, tmp_path_factory) -> Path:
    """segment.pkg with model.onnx and model.int8.onnx, written by the Processing export (precision int8,
    calibrated on scene.tif; forced: a random model's class scores are near ties, below the gate)."""
    dest = tmp_path_factory.mktemp("int8") / "segment_int8.pkg"
    feedback = Recorder()
    out = processing.run("sarmae:export_onnx", {"MODEL": str(assets / "segment.pkg"), "PRECISION": "int8",
                                                "CALIBRATION": str(assets / "scene.tif"), "FORCE": True,
                                                "OUTPUT": str(dest)}, feedback=feedback)
    assert out["PACKAGE"] == str(dest)
    assert any("--precision int8 --calibration" in line for line in feedback.infos)  # the command it ran
    return dest


def test_export_args():
    assert export_args("p") == ["export", "p"]
    assert export_args("p", "int8", "s.tif", force=True, output="o", opset=17) == [
        "export", "p", "--opset", "17", "--output", "o", "--precision", "int8", "--calibration", "s.tif", "--force"]
    with pytest.raises(ValueError, match="fp32 or int8"):
        export_args("p", "auto")


def test_card_says_whether_there_is_an_int8_model_and_its_gate(int8_pkg, assets, tmp_path):
    card = read_card(int8_pkg)
    assert card.has_onnx and card.has_int8
    gate = card.int8_gate
    assert gate["metric"] == "pixel label agreement" and gate["calibration"] == "scene.tif" and gate["windows"] >= 1
    brief, full = describe_html(card, brief=True), describe_html(card)
    figure = f"pixel label agreement with fp32 {gate['value']:.4f}"
    assert figure in brief and figure in full and "int8 model: " in brief
    assert f"on {gate['windows']} window(s) of scene.tif" in full and "window(s)" not in brief
    assert ("forced below the gate" in brief) == bool(gate["forced"])
    plain = read_card(assets / "segment.pkg")
    assert not plain.has_int8 and plain.int8_gate == {} and "int8 model: no" in describe_html(plain)
    zipped = read_card(shutil.make_archive(str(tmp_path / "seg8"), "zip", int8_pkg.parent, int8_pkg.name))
    assert zipped.has_int8 and zipped.int8_gate == gate  # read from inside the zip
    (tmp_path / "bare").mkdir()  # an int8 file model.json does not record: the engine refuses it
    shutil.copy(assets / "segment.pkg" / "model.json", tmp_path / "bare")
    shutil.copy(int8_pkg / "model.int8.onnx", tmp_path / "bare")
    assert "make it again" in describe_html(read_card(tmp_path / "bare"))


def test_processing_passes_the_precision_to_the_engine(int8_pkg, assets, tmp_path):
    params = {"INPUT": str(assets / "scene.tif"), "MODEL": str(int8_pkg), "OUTPUT": str(tmp_path / "c8.tif"),
              "CONFIDENCE": str(tmp_path / "f8.tif")}
    int8, fp32 = Recorder(), Recorder()
    processing.run("sarmae:segment", {**params, "PRECISION": "int8"}, feedback=int8)
    log = "\n".join(int8.infos)
    assert "precision int8 (asked for)" in log and "int8 model" in log  # the engine ran model.int8.onnx
    processing.run("sarmae:segment", {**params, "PRECISION": "fp32", "OUTPUT": str(tmp_path / "c32.tif"),
                                      "CONFIDENCE": str(tmp_path / "f32.tif")}, feedback=fp32)
    assert "precision int8" not in "\n".join(fp32.infos) and "int8 model" not in "\n".join(fp32.infos)
    assert Path(tmp_path / "c8.tif").is_file() and Path(tmp_path / "c32.tif").is_file()


def test_processing_int8_without_an_int8_model_says_how_to_make_one(assets, tmp_path):
    with pytest.raises(QgsProcessingException) as caught:
        processing.run("sarmae:segment", {"INPUT": str(assets / "scene.tif"), "MODEL": str(assets / "segment.pkg"),
                                          "PRECISION": "int8", "OUTPUT": str(tmp_path / "x.tif"),
                                          "CONFIDENCE": str(tmp_path / "c.tif")})
    message = str(caught.value)
    assert "has no model.int8.onnx" in message and "--precision int8 --calibration RASTER" in message
    assert "Traceback" not in message and "Engine traceback" not in message
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tif"]


def test_processing_default_is_auto():
    from qgis.core import QgsApplication

    alg = QgsApplication.processingRegistry().algorithmById("sarmae:classify")
    param = alg.parameterDefinition("PRECISION")
    assert param.options() == ["auto", "fp32", "int8"] and param.defaultValue() == "auto"
    assert alg.parameterDefinition("BACKEND") is not None
    assert QgsApplication.processingRegistry().algorithmById("sarmae:cfar").parameterDefinition("PRECISION") is None


@pytest.fixture
def run_dialog(qgis_iface, project, assets, int8_pkg, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(assets / "segment.pkg", folder / "segment.pkg")
    shutil.copytree(int8_pkg, folder / "segment_int8.pkg")
    scene = QgsRasterLayer(str(assets / "scene.tif"), "scene", "gdal")
    project.addMapLayer(scene)
    dialogs = []

    def make() -> RunDialog:
        d = RunDialog(qgis_iface.mainWindow(), models_folder=folder)
        d.output_widget.setFilePath(str(tmp_path / "out"))
        d.layer_combo.setLayer(scene)
        dialogs.append(d)
        return d

    yield make, folder
    for d in dialogs:
        d.close()
        d.deleteLater()
    forget_run_choices()


def forget_run_choices() -> None:
    QgsSettings().remove(f"{settings.PREFIX}/run")


def choose(d: RunDialog, path: Path) -> None:
    d.model_combo.setCurrentIndex(d.model_combo.findData(str(path)))
    d._model_chosen = True


def test_run_dialog_precision_choice_is_passed_refused_and_remembered(run_dialog):
    make, folder = run_dialog
    forget_run_choices()
    d = make()
    assert [d.precision_combo.itemText(i) for i in range(d.precision_combo.count())] == ["auto", "fp32", "int8"]
    assert d.precision_combo.currentText() == "auto"
    choose(d, folder / "segment_int8.pkg")
    assert "int8 model: yes" in d.card_label.text() and "pixel label agreement with fp32" in d.card_label.text()
    assert d.build_request().options()["precision"] == "auto"
    choose(d, folder / "segment.pkg")
    assert "int8 model: no" in d.card_label.text()
    d.precision_combo.setCurrentText("int8")
    with pytest.raises(RequestError, match=r"has no int8 model.*Models… > Make int8 model.*--precision int8"):
        d.build_request()
    d.accept()
    assert d.request is None and "has no int8 model" in d.notice.plain
    choose(d, folder / "segment_int8.pkg")
    d.accept()
    assert d.request.precision == "int8" and d.request.options()["precision"] == "int8"
    again = make()  # the choice is remembered
    assert again.precision_combo.currentText() == "int8"
    settings.set_value("precision", "fp32")  # the settings' default: where the form has no choice of its own
    try:
        forget_run_choices()
        assert make().precision_combo.currentText() == "fp32"
    finally:
        settings.set_value("precision", "auto")


def test_run_task_runs_int8_or_relays_the_engines_refusal(int8_pkg, assets, tmp_path, project):
    def request(model: Path, name: str) -> RunRequest:
        return RunRequest(run_name=name, layer_name="scene", raster_path=str(assets / "scene.tif"),
                          model_path=str(model), model_name=name, task="segment", output_dir=str(tmp_path / name),
                          precision="int8")

    task = RunTask(request(int8_pkg, "int8 run"), message_bar=RecordingBar())
    ok = task.run()
    task.finished(ok)
    assert ok, task.error
    assert any("int8 model" in line for line in task.log_lines)  # the backend that ran (cached or not)
    assert "precision int8" in task.request.details()  # in the result layers' metadata
    bar = RecordingBar()
    task = RunTask(request(assets / "segment.pkg", "plain run"), message_bar=bar)
    ok = task.run()
    task.finished(ok)
    assert not ok
    (title, text, level), = bar.messages
    assert level == Qgis.Critical and "has no model.int8.onnx" in text and "sarmae export" in text


def test_models_dialog_makes_an_int8_model(assets, tmp_path, qgis_iface):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(assets / "segment.pkg", folder / "segment.pkg")
    shutil.make_archive(str(folder / "classify"), "zip", assets, "classify.pkg")
    d = ModelsDialog(qgis_iface.mainWindow(), models_folder=folder)
    errors: list[str] = []
    d.show_error = errors.append
    changed = []
    d.modelsChanged.connect(lambda: changed.append(1))
    try:
        assert d.select(str(folder / "classify.zip")) and not d.int8_button.isEnabled()  # a zip: import it first
        assert d.make_int8(assets / "scene.tif") is None and "import this zip first" in errors.pop()
        assert d.select(str(folder / "segment.pkg")) and d.int8_button.isEnabled()
        assert "int8 model: no" in d.card_view.toHtml()
        bad = d.make_int8(tmp_path / "missing.tif")  # the engine's refusal, in a message
        assert bad is not None and not d.int8_button.isEnabled()
        wait_until(lambda: bad.is_done, timeout=300)
        assert errors and "No int8 model was written for segment.pkg" in errors[-1] and "missing.tif" in errors[-1]
        assert not (folder / "segment.pkg" / "model.int8.onnx").exists() and not changed
        task = d.make_int8(assets / "scene.tif", force=True)
        wait_until(lambda: task.is_done, timeout=300)
        assert task.error is None, task.error
        card = read_card(folder / "segment.pkg")
        assert card.has_int8 and card.int8_gate["calibration"] == "scene.tif" and changed
        assert "pixel label agreement with fp32" in d.card_view.toPlainText() and d.int8_button.isEnabled()
        assert len(errors) == 1
    finally:
        d.close()
        d.deleteLater()
