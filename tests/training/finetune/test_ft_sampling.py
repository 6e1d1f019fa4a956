"""The spatial split of training/finetune/sampling.py: which labelled blocks are held out."""

from __future__ import annotations

import numpy as np
import pytest

from training.finetune.sampling import split_blocks


@pytest.mark.parametrize("seed", range(8))
def test_a_class_found_in_one_block_stays_in_training(seed):
    """The 12-polygon case of issue 16 (6 per class on Sen1Floods11, seed 2): every water polygon
    lay in one block, whose share of the labels was the closest to the validation fraction, so the
    split held it out and training refused ("the training chips hold labelled pixels of one class
    only"). Training now keeps every class it can; validation without water is reported as weak."""
    present = [np.array([True, True]), np.array([True, False]), np.array([True, False]), np.array([True, False])]
    weights = [6.0, 8.0, 8.0, 8.0]  # block 0 holds exactly 20 % of the labels
    val = split_blocks(present, [True] * 4, 0.2, np.random.default_rng(seed), weights)
    assert not val[0] and val.sum() == 1  # one dry-only block held out, the water block trained on


def test_classes_in_both_splits_still_come_first_when_training_keeps_them():
    present = [np.array([True, True]), np.array([True, True]), np.array([True, False]), np.array([True, False])]
    val = split_blocks(present, [True] * 4, 0.25, np.random.default_rng(0), [1.0, 1.0, 1.0, 1.0])
    assert val.sum() == 1 and (val[0] or val[1])  # water in both splits
