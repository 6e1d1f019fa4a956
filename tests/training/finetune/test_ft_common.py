"""What every fine-tuning task shares (training/finetune/common.py): layer-wise lr decay, early
stopping with the best weights restored, the time budget, progress rows with an ETA, colours."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from training.finetune.common import FinetuneError, class_colours, decay_groups, fit, progress_line
from training.finetune.config import FinetuneConfig


class Toy(nn.Module):
    """An 'encoder' of two blocks and a head: the names fit and decay_groups look at."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.patch_embed = nn.Linear(2, 2)
        self.encoder.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        for b in self.encoder.blocks:
            x = b(x)
        return self.head(x)


def loader(n: int = 4):
    return [torch.randn(3, 2) for _ in range(n)]


def test_layer_decay_scales():
    groups = decay_groups(Toy(), depth=2, weight_decay=0.05, layer_decay=0.75)
    scale = {(round(g["lr_scale"], 6), g["weight_decay"]) for g in groups}
    # embeddings 0.75^3, block 0 0.75^2, block 1 0.75, head 1; biases without weight decay
    assert scale == {(round(0.75 ** k, 6), wd) for k in (3, 2, 1, 0) for wd in (0.0, 0.05)}


def test_early_stopping_restores_the_best_weights():
    torch.manual_seed(0)
    model = Toy()
    scores, snapshots, rows = iter([0.5, 0.9, 0.7, 0.8, 0.6, 0.95]), [], []

    def evaluate(m):
        snapshots.append(m.head.weight.detach().clone())
        return {"accuracy": next(scores)}

    cfg = FinetuneConfig(epochs=6, patience=2, warmup_epochs=0, lr=1e-2)
    hist = fit(model, lambda m, x: m(x).pow(2).mean(), evaluate, loader(), cfg, "cpu", "accuracy", rows.append)
    assert hist.best_epoch == 1 and len(hist.epochs) == 4 and "early stop at epoch 3" in hist.stopped
    assert torch.equal(model.head.weight, snapshots[1])
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and all(r["metric"] == "accuracy" for r in rows)
    assert rows[0]["eta_s"] >= rows[-1]["eta_s"] >= 0
    assert progress_line(rows[1]).startswith("epoch 2/6: loss") and "val accuracy 0.9000 (best 0.9000)" in \
        progress_line(rows[1]) and "ETA" in progress_line(rows[1])


def test_time_budget_keeps_the_best_model_found_in_time():
    def slow_step(m, x):
        time.sleep(0.05)
        return m(x).pow(2).mean()

    rows = []
    cfg = FinetuneConfig(epochs=100, patience=100, warmup_epochs=0, max_minutes=0.1 / 60)
    t0 = time.time()
    hist = fit(Toy(), slow_step, lambda m: {"accuracy": 0.5}, loader(50), cfg, "cpu", "accuracy", rows.append)
    assert time.time() - t0 < 2.0 and len(hist.epochs) == 1 and "time budget" in hist.stopped
    assert rows[-1]["eta_s"] == 0.0  # the budget is spent: nothing left to wait for


def test_class_colours():
    assert class_colours(["a", "b"], None) == {}
    assert class_colours(["bg", "a", "b"], ["#000000", "#ffffff"], ["a", "b"]) == {"a": "#000000", "b": "#ffffff"}
    assert class_colours(["a"], {"a": "#00ff00"}) == {"a": "#00ff00"}
    with pytest.raises(FinetuneError, match="not '#rrggbb'"):
        class_colours(["a"], ["red"])


def test_gain_jitter_moves_brightness_within_the_contract():
    import torch

    from training.finetune.common import gain_jitter

    torch.manual_seed(0)
    db = {"units": "db", "clip": [-35.0, 10.0], "mean": [0.5], "std": [0.5]}
    x = torch.zeros(64, 1, 8, 8)  # normalised 0 = -12.5 dB
    assert torch.equal(gain_jitter(x, db, 0.0), x)
    y = gain_jitter(x, db, 3.0)
    shift_db = (y[:, 0, 0, 0] * 0.5) * 45.0  # back to dB offsets
    assert float(shift_db.abs().max()) <= 3.0 + 1e-4 and float(shift_db.std()) > 0.5
    assert torch.all(y == y[:, :, :1, :1])  # one gain per chip, the same over its pixels
    u8 = {"units": "uint8", "clip": [0, 255], "mean": [0.5], "std": [0.5]}
    v = torch.full((64, 1, 4, 4), -0.5)  # 0.25 of the 8-bit range
    ratio = ((gain_jitter(v, u8, 6.0) * 0.5 + 0.5) / 0.25)[:, 0, 0, 0]
    assert float(ratio.min()) >= 10 ** (-6 / 20) - 1e-4 and float(ratio.max()) <= 10 ** (6 / 20) + 1e-4
    assert float(gain_jitter(torch.ones(8, 1, 2, 2), u8, 6.0).max()) <= 1.0  # clipped like real data


def test_validation_report_is_shared_by_every_task():
    """One record for segment (pixels), classify (chips) and detect (boxes): reliable, or why not."""
    import numpy as np

    from training.finetune.common import validation_report

    # segmentation: pixels; a class missing from the held-out area, too few chips
    seg = validation_report(["water", "land"], np.array([[1, 1], [255, 1]]), 2)
    assert not seg["reliable"] and seg["classes_present"] == ["land"] and "held_out_per_class" not in seg
    assert "only 2 validation chip(s)" in seg["note"] and "no water pixel in the held-out area" in seg["note"]
    # classification: one class per chip; a class held out once is not enough, cross-validation is named
    cv = {"cv_balanced_accuracy": 0.875, "cv_folds": 5}
    cls = validation_report(["dark", "bright"], np.array([0, 0, 0, 1]), 4, cv, unit="chip")
    assert not cls["reliable"] and cls["held_out_per_class"] == {"dark": 3, "bright": 1}
    assert "only 1 bright chip held out" in cls["note"] and "only 4" not in cls["note"]
    assert "cross-validation over the training chips (5 folds by chip" in cls["note"] and "0.88" in cls["note"]
    assert cls["cross_validation"] == {"balanced_accuracy": 0.875, "folds": 5, "by": "training chip"}
    # detection: one class per box (labels 1..K minus 1)
    det = validation_report(["ship", "boat"], np.array([0, 0]), 6, unit="box")
    assert not det["reliable"] and "no boat box in the held-out area" in det["note"]
    ok = validation_report(["ship"], np.zeros(5), 6, unit="box")
    assert ok["reliable"] and ok["note"] == "" and ok["held_out_per_class"] == {"ship": 5}


def test_curve_and_confusion_pictures_are_sized_for_a_dialog(tmp_path):
    """Issue 16, item 7: the curves were illegible thumbnails and the confusion matrix 189 x 162 px
    with its title cut; now 800 x 320 px and at least 480 x 400 px (read back from the files)."""
    import numpy as np
    from PIL import Image

    from training.finetune.common import History, plot_history
    from training.finetune.metrics import confusion_png

    hist = History(epochs=[0, 1, 2], train_loss=[1.0, 0.6, 0.5], val_score=[0.5, 0.7, 0.65], best_epoch=1)
    plot_history(hist, "mean_iou", tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size == (800, 320)
    for k in (2, 6):
        cm = np.arange(k * k).reshape(k, k) + 1
        confusion_png(cm, [f"class {i}" for i in range(k)], tmp_path / f"cm{k}.png")
        with Image.open(tmp_path / f"cm{k}.png") as im:
            w, h = im.size
            assert w >= 480 and h >= 400, im.size
            rgb = np.asarray(im.convert("L"))
        assert (rgb[0] > 200).all() and (rgb[:, 0] > 200).all(), "nothing (title, labels) cut at the edges"
