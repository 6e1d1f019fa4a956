"""Defects met in the real QGIS desktop (issue 16's scenario, clicked under a virtual screen) that
the offscreen tests had not caught: a message cut in half by the bar's height, raw keys and a long
warning squeezing the model card of the Run form, the "fine-tuning…" line staying over the results,
"1 epochs" and "Mode: head" in the results dialog."""

from __future__ import annotations

import pytest
from qgis.core import Qgis
from qgis.gui import QgsMessageBar
from qgis.PyQt.QtGui import QFont, QFontMetrics
from qgis.PyQt.QtWidgets import QVBoxLayout, QWidget

from sarmae_qgis.model_cards import PackageCard, describe_html
from sarmae_qgis.toolbelt import messages

pytestmark = pytest.mark.qgis


@pytest.fixture
def bar(qgis_app):
    """A message bar 900 px wide in a shown window, closed after the test."""
    window = QWidget()
    window.resize(900, 200)
    made = QgsMessageBar(window)
    QVBoxLayout(window).addWidget(made)
    window.show()
    yield made
    window.close()
    window.deleteLater()


def fits_the_bar(bar: QgsMessageBar, item) -> bool:
    """The item's bold title and its text fit the bar's width on one line."""
    bold = QFont(bar.font())
    bold.setBold(True)
    return QFontMetrics(bold).horizontalAdvance(item.title()) + QFontMetrics(bar.font()).horizontalAdvance(
        f"  {item.text()}") <= bar.width() - messages.CHROME_PX


def test_a_long_line_is_shortened_to_the_bar_not_cut(bar):
    title = "SARMAE: segment_Spain_7370579_S1Hand_labels done"
    text = "water 2.48 km² (12.1 %), land 18.1 km² (87.9 %), 15.6 s"
    item = messages.push(bar, title, text, Qgis.Success)
    assert fits_the_bar(bar, item)
    assert item.text() == text and "…" in item.title() and item.title().startswith("SARMAE")  # the numbers stay
    assert item.toolTip() == f"{title}: {text}"
    short = messages.push(bar, "SARMAE: x done", "water 12 %", Qgis.Success)
    assert (short.title(), short.text()) == ("SARMAE: x done", "water 12 %") and not short.toolTip()
    assert messages.fit(title, text * 5, bar.font(), 300) == ("SARMAE:", text * 5)  # the text is never cut


def test_the_fine_tuning_progress_line_stays_on_one_line(bar):
    """A Full fine-tune's epoch line wrapped onto a second line that the bar cut in half."""
    item = bar.createMessage("SARMAE", "fine-tuning 'x' (Task Manager: progress and cancel)…")
    bar.pushWidget(item, Qgis.Info)
    update = messages.line_updater(bar, item, "SARMAE", "fine-tuning 'segment_Spain_7370579_S1Hand_labels': ")
    epoch = ("epoch 3/50: train loss 0.4123, val loss 0.3981, val mean IoU 0.512 (water 0.402, land 0.622),\n"
             "best 0.530 at epoch 2, 12.4 s per epoch, 41 s of 300 s")
    update(epoch)
    assert fits_the_bar(bar, item)
    assert "\n" not in item.text() and item.text().endswith("…") and item.text().startswith("fine-tuning")
    assert "best 0.530 at epoch 2" in item.toolTip()  # the whole line, on hover
    update("epoch 4/50")
    assert item.text() == "fine-tuning 'segment_Spain_7370579_S1Hand_labels': epoch 4/50" and not item.toolTip()
    bar.popWidget(item)
    update("epoch 5/50")  # a closed line is left alone


def test_the_pickers_card_is_brief_and_worded():
    prov = {"metrics": {"val_mean_iou": 1.0, "val_pixel_accuracy": 1.0, "best_epoch": 0,
                        "validation": {"chips": 2, "reliable": False, "note": "validation is weak (only 2 chips) " * 5}},
            "warnings": ["class 'water' appears in only 1 training chip(s): label more of it"]}
    card = PackageCard(path="/m/segment_x", name="segment_x", task="segment", raw={"provenance": prov})
    brief = describe_html(card, brief=True)
    assert "mean IoU 1.000" in brief and "val_" not in brief and "pixel accuracy" not in brief
    assert "not reliable (Models… says why)" in brief and "validation is weak" not in brief
    assert "segment_x</small>" not in brief and "segment_x</small>" in describe_html(card)  # path: a tooltip
    full = describe_html(card)  # the Models dialog: every reason
    assert "validation is weak" in full and "label more of it" in full and "best epoch 0" in full


def test_the_progress_line_is_closed_before_the_results(qgis_iface, tmp_path):
    from sarmae_qgis.plugin import SarmaePlugin
    from sarmae_qgis.tasks.finetune_task import FinetuneRequest, FinetuneTask

    bar = QgsMessageBar()
    item = bar.createMessage("SARMAE", "fine-tuning 'x' (Task Manager: progress and cancel)…")
    bar.pushWidget(item, Qgis.Info)
    task = FinetuneTask(FinetuneRequest(name="x", task="segment", rasters=(str(tmp_path / "a.tif"),),
                                        labels=str(tmp_path / "l.gpkg"), class_field="class",
                                        output=str(tmp_path / "x"), run_dir=str(tmp_path / "run")))
    task.progress_line = (bar, item)
    SarmaePlugin(qgis_iface)._finetune_done(task)  # cancelled: nothing else to show
    assert bar.items() == []


def test_results_dialog_words_epochs_and_mode(tmp_path):
    from sarmae_qgis.gui.finetune_results import summary_html
    from sarmae_qgis.tasks.finetune_task import FinetuneRequest, FinetuneTask

    task = FinetuneTask(FinetuneRequest(name="x", task="segment", rasters=(str(tmp_path / "a.tif"),),
                                        labels=str(tmp_path / "l.gpkg"), class_field="class",
                                        output=str(tmp_path / "x"), run_dir=str(tmp_path / "run")))
    task.result = {"val_mean_iou": 0.8, "epochs_run": 1, "best_epoch": 0, "mode": "head",
                   "stopped": "quick mode: one logistic-regression fit", "train_chips": 30, "val_chips": 10}
    html = summary_html(task)
    assert "1 epoch," in html and "1 epochs" not in html and "Mode: Quick (frozen encoder)" in html
    from sarmae_qgis.tasks.finetune_task import summarise

    assert "1 epoch (best 0)" in summarise(task.result)  # the message-bar line


def test_no_curves_tab_for_a_single_fit(tmp_path):
    """Quick mode fits once: its 'curve' was one dot on garbled axes (-0.045 … 0.045 epochs)."""
    from qgis.PyQt.QtGui import QColor, QImage

    from sarmae_qgis.gui.finetune_results import FinetuneResultDialog
    from sarmae_qgis.tasks.finetune_task import FinetuneRequest, FinetuneTask

    package = tmp_path / "x"
    package.mkdir()
    image = QImage(200, 100, QImage.Format_RGB32)
    image.fill(QColor("white"))
    for name in ("preview.png", "training_curves.png", "confusion_matrix.png"):
        image.save(str(package / name))
    task = FinetuneTask(FinetuneRequest(name="x", task="segment", rasters=(str(tmp_path / "a.tif"),),
                                        labels=str(tmp_path / "l.gpkg"), class_field="class",
                                        output=str(package), run_dir=str(tmp_path / "run")))
    task.result = {"val_mean_iou": 0.8, "epochs_run": 1, "mode": "head", "train_chips": 30, "val_chips": 10}
    assert list(FinetuneResultDialog(task).figures) == ["Prediction over your labels", "Confusion matrix"]
    task.result["epochs_run"] = 12
    assert "Training curves" in FinetuneResultDialog(task).figures


def test_the_task_has_left_the_status_bar_before_the_results_open(qgis_iface, tmp_path, monkeypatch):
    """The status bar's progress stayed at 100 % while the (modal) results dialog was open: the
    dialog was shown from the task's ``finished``, before QGIS's task manager let the task go."""
    import time

    from qgis.core import QgsApplication
    from qgis.PyQt.QtCore import QCoreApplication

    from sarmae_qgis.gui import finetune_results
    from sarmae_qgis.plugin import SarmaePlugin
    from sarmae_qgis.tasks.finetune_task import FinetuneRequest, FinetuneTask

    class Client:
        def request(self, *_args, **_kwargs):
            return {"val_mean_iou": 0.5, "epochs_run": 3, "train_chips": 8, "val_chips": 2}

    manager, seen = QgsApplication.taskManager(), []

    class Results:  # the results dialog: what the task manager holds when it opens
        def __init__(self, task, *_args, **_kwargs):
            seen.append((task in manager.tasks(), manager.countActiveTasks()))

        def setAttribute(self, *_args):  # noqa: N802  # Qt API
            pass

        def exec_(self):
            return 0

    monkeypatch.setattr(finetune_results, "FinetuneResultDialog", Results)
    plugin = SarmaePlugin(qgis_iface)
    task = FinetuneTask(FinetuneRequest(name="x", task="segment", rasters=(str(tmp_path / "a.tif"),),
                                        labels=str(tmp_path / "l.gpkg"), class_field="class",
                                        output=str(tmp_path / "models" / "x"), run_dir=str(tmp_path / "run")),
                        on_done=plugin._finetune_done, client_factory=Client)
    before = manager.countActiveTasks()
    manager.addTask(task)
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        QCoreApplication.processEvents()
        time.sleep(0.02)
    assert seen == [(False, before)]  # finished and let go: no progress left at 100 %
