"""The text-search recipe's scoring (training/recipes/eval_sarclip_maps.py): ``best_iou`` in one pass
over the sorted scores gives what a loop over every quantile threshold gives."""

import numpy as np
import pytest

from training.recipes.eval_sarclip_maps import best_iou, iou


def best_iou_loop(score, label):
    """The former implementation: one ``iou`` pass per quantile threshold."""
    best = (float("nan"), -1.0)
    for t in np.unique(np.quantile(score, np.linspace(0.0, 1.0, 401))):
        v = iou(score > t, label)
        if v > best[1]:
            best = (float(t), v)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_best_iou_matches_the_threshold_loop(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    label = rng.random(n) < rng.uniform(0.0, 0.6)
    score = label * rng.uniform(0, 2) + rng.normal(size=n)
    if seed % 2:  # ties: few distinct scores, fewer thresholds than quantiles
        score = np.round(score * 2) / 2
    if seed == 4:
        label[:] = False
    assert best_iou(score, label) == best_iou_loop(score, label)
