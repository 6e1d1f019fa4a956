"""Classical baselines (training/baselines.py): thresholds, Otsu, the random forest, the small CNN."""

from __future__ import annotations

import numpy as np
import torch

from training.baselines import SegBaselines, SmallCNN, otsu_threshold, train_small_cnn


def _scene(seed: int, size: int = 96):
    """Dark smooth 'water' (class 1) left of a wavy line, bright textured 'land' (class 0) right."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[:size, :size]
    y = (c < size / 2 + 8 * np.sin(r / 7)).astype(np.int64)
    x = np.where(y == 1, -1.0, 0.6) + np.where(y == 1, 0.15, 0.6) * rng.standard_normal((size, size))
    return x[None].astype(np.float32), y


def test_otsu_splits_a_bimodal_sample():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(-2, 0.3, 5000), rng.normal(3, 0.5, 5000)])
    assert -1.5 < otsu_threshold(v) < 2.5  # between the modes


def test_seg_baselines_learn_the_dark_class_and_beat_chance():
    x, y = _scene(0)
    y_train = y.copy()
    y_train[:, 40:56] = 255  # unlabelled pixels are ignored
    fitted = SegBaselines.fit([x], [y_train], 2, ["VV"])
    assert fitted.thresholds[0][1] is False and fitted.dark_is_one[0]  # water = below the threshold
    xt, yt = _scene(1)
    rows = fitted.predict(xt)
    assert set(rows) == {"threshold VV", "Otsu VV", "random forest"}
    for name, pred in rows.items():
        assert pred.shape == yt.shape and pred.dtype == np.uint8
        assert (pred == yt).mean() > 0.85, name  # the majority class alone scores about 0.5


def test_small_cnn_learns_separable_chips():
    torch.manual_seed(0)
    n = 48
    y = np.repeat(np.arange(3), n // 3)
    x = torch.randn(n, 1, 32, 32) * 0.3 + torch.from_numpy(y).float().view(-1, 1, 1, 1)
    idx = np.random.default_rng(0).permutation(n)
    model, info = train_small_cnn(x, y, idx[:36], idx[36:], epochs=15, batch_size=12)
    assert isinstance(model, SmallCNN) and 100_000 < info["parameters"] < 1_000_000
    assert info["val_accuracy"] > 0.9, info
