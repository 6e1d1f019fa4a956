"""Zero-shot and retrieval metrics on cases whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.clip.evaluate import logistic_baseline, retrieval, topk_metrics


def test_topk_and_mean_per_class_accuracy():
    classes = ["a", "b", "c", "d", "e", "f"]
    truth = np.array([0, 0, 0, 1, 2, 5])
    logits = torch.tensor([
        [9, 1, 0, 0, 0, 0],  # a: right
        [9, 1, 0, 0, 0, 0],  # a: right
        [1, 9, 0, 0, 0, 0],  # a: second
        [1, 2, 3, 4, 5, 6],  # b: fifth, in the top 5
        [0, 0, 9, 0, 0, 0],  # c: right
        [6, 5, 4, 3, 2, 1],  # f: last, not in the top 5
    ], dtype=torch.float32)
    m = topk_metrics(logits, truth, classes)
    assert m["top1"] == pytest.approx(3 / 6)
    assert m["top5"] == pytest.approx(5 / 6)
    # per class: a 2/3, b 0, c 1, f 0 (classes without rows are left out of the mean)
    assert m["per_class"]["a"] == pytest.approx(2 / 3) and m["per_class"]["c"] == 1.0
    assert m["mean_per_class"] == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)


def test_retrieval_with_shared_captions():
    # 4 images, 2 unique captions: images 0, 1 have caption 0; images 2, 3 caption 1
    txt = torch.eye(2)
    img = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.0, 1.0], [0.9, 0.1]])
    cap = np.array([0, 0, 1, 1])
    r = retrieval(img, txt, cap, ks=(1, 2))
    assert r["image_to_text_r1"] == pytest.approx(2 / 4)  # images 0 and 2 rank their caption first
    assert r["image_to_text_r2"] == 1.0
    # caption 0: most similar image is 0 (its own) -> hit; caption 1: image 2 (its own) -> hit
    assert r["text_to_image_r1"] == 1.0
    assert r["unique_captions"] == 2 and r["images"] == 4
    swapped = retrieval(img, txt.flip(0), cap, ks=(1,))
    assert swapped["image_to_text_r1"] == pytest.approx(2 / 4)  # images 1 and 3 now
    assert swapped["text_to_image_r1"] == 0.0


def test_logistic_baseline_separates_separable_embeddings():
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 4
    y = [c for c in ("x", "y", "z") for _ in range(20)]
    x = np.concatenate([centres[i] + rng.normal(0, 0.3, (20, 3)) for i in range(3)])
    m = logistic_baseline(x[::2], y[::2], x[1::2], y[1::2], ["x", "y", "z"])
    assert m["top1"] == 1.0
