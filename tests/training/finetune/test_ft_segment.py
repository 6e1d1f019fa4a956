"""Segmentation fine-tuning (training/finetune/segment.py): losses, paired augmentation, learning on
a tiny scene, and the package running through ``engine.inference.run_inference`` unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ftdata import build_encoder, class_polygons, water_land, write_labels

from training.finetune.common import FinetuneError, progress_line
from training.finetune.config import FinetuneConfig
from training.finetune.labels import IGNORE
from training.finetune.segment import (
    augment_pair,
    class_weights_of,
    dense_config,
    dice_loss,
    finetune_segmenter,
    seg_loss,
)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return build_encoder(tmp_path_factory.mktemp("enc") / "enc", img_size=32)


def tiny_cfg(encoder, **kw) -> FinetuneConfig:
    d = dict(encoder=str(encoder), epochs=8, batch_size=16, lr=1e-3, warmup_epochs=1, drop_path=0.0, device="cpu",
             patience=8)
    d.update(kw)
    return FinetuneConfig(**d)


def test_dice_and_loss_ignore_255():
    t = torch.tensor([[[0, 1], [IGNORE, 1]]])
    perfect = torch.tensor([[[[9.0, -9], [0, -9]], [[-9.0, 9], [0, 9]]]])  # (1, 2, 2, 2)
    assert dice_loss(perfect, t) < 1e-3
    wrong = -perfect
    assert dice_loss(wrong, t) > 0.6  # (smoothed by +1 on 3 valid pixels)
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    all_ignored = seg_loss(logits, logits, torch.full((1, 2, 2), IGNORE), None, 0.4)
    assert all_ignored.item() == 0 and all_ignored.requires_grad
    a = seg_loss(logits, None, t, None, 0.4)
    b = seg_loss(logits, logits, t, None, 0.4)
    assert torch.isfinite(a) and b > a


def test_augment_pair_moves_image_and_mask_together():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (4, 8, 8))
    x = torch.stack([y.float(), -y.float()], 1)
    for _ in range(12):
        xa, ya = augment_pair(x, y)
        assert torch.equal(xa[:, 0].long(), ya) and torch.equal(xa[:, 1], -xa[:, 0])


def test_class_weights():
    m = torch.tensor([[0, 0, 0, 1], [0, 0, 0, IGNORE]], dtype=torch.uint8)
    abc = ["a", "b", "c"]
    w = class_weights_of(m, abc, "auto")
    assert w[1] > w[0] and w[2] == 1.0
    assert torch.equal(class_weights_of(m, abc, "inverse"), w)
    sq = class_weights_of(m, abc, "sqrt")  # the same ordering, a smaller spread
    assert sq[1] > sq[0] and sq[2] == 1.0 and sq[1] / sq[0] == pytest.approx(float(w[1] / w[0]) ** 0.5)
    assert class_weights_of(m, abc, None) is None and class_weights_of(m, abc, "none") is None
    assert class_weights_of(m, abc, [1, 2, 3]).tolist() == [1, 2, 3]
    with pytest.raises(FinetuneError, match=r"2 class weight\(s\) given for 3 classes \(a, b, c\)"):
        class_weights_of(m, abc, [1, 2])
    with pytest.raises(FinetuneError, match="auto"):
        class_weights_of(m, abc, "square")


def test_dense_layer_decay_default():
    assert dense_config(FinetuneConfig(), "segment").decay == 0.9
    assert dense_config(FinetuneConfig(layer_decay=0.8), "segment").decay == 0.8
    assert FinetuneConfig().decay == 0.75  # classification


def test_needs_one_kind_of_labels(tmp_path, encoder):
    with pytest.raises(FinetuneError, match="give the labels"):
        finetune_segmenter("x.tif", tmp_path / "m", tiny_cfg(encoder))
    with pytest.raises(FinetuneError, match="give the labels"):
        finetune_segmenter("x.tif", tmp_path / "m", tiny_cfg(encoder), labels="a.gpkg", class_field="c",
                           label_raster="b.tif")


def test_segmenter_learns_and_runs_in_inference(tmp_path, encoder):
    from engine.inference import InferenceOptions, run_inference
    from engine.package import load_package

    tif, truth = water_land(tmp_path / "train.tif", size=192, seed=0)
    gpkg = write_labels(tmp_path / "labels.gpkg", class_polygons(truth, {0: "water", 1: "land"}))
    rows = []
    r = finetune_segmenter(tif, tmp_path / "water.pkg", tiny_cfg(encoder, class_weights="auto", mode="full",
                                                                  seg_head="upernet"), labels=gpkg,
                           class_field="class", progress=rows.append, colours={"water": "#0000ff"})
    assert r["classes"] == ["land", "water"] and len(rows) == r["epochs_run"]
    # trivial baseline: one class everywhere -> mean IoU = majority share / 2 <= 0.5
    assert r["val_mean_iou"] > 0.75, r
    assert r["val_pixel_accuracy"] > 0.85
    pkg = load_package(tmp_path / "water.pkg")
    card = pkg.card
    assert card.task == "segment" and [c["name"] for c in card.classes] == ["land", "water"]
    assert all(c["colour"].startswith("#") for c in card.classes) and card.classes[1]["colour"] == "#0000ff"
    assert all("ETA" in progress_line(row) for row in rows)
    assert len(card.provenance["class_weights"]) == 2  # "auto": the weights used are recorded
    enc_card = json.loads((encoder / "model.json").read_text())
    assert card.input == enc_card["input"]
    m = card.provenance["metrics"]
    assert set(m["val_iou"]) == {"land", "water"} and m["val_mean_iou"] == pytest.approx(r["val_mean_iou"])
    assert {"training_curves.png", "confusion_matrix.png"} <= {p.name for p in (tmp_path / "water.pkg").iterdir()}
    assert card.architecture["encoder"]["drop_path_rate"] == 0.0 and card.architecture["head"]["channels"] == 128
    # the package runs in the engine unchanged, on a scene it never saw
    test_tif, test_truth = water_land(tmp_path / "test.tif", size=160, seed=7)
    res = run_inference(str(test_tif), tmp_path / "out.tif", pkg, InferenceOptions(device="cpu", batch_size=8))
    import rasterio

    with rasterio.open(res.outputs["class"]) as src:
        pred = src.read(1)
    names = np.array(["land", "water"])[np.clip(pred, 0, 1)]
    acc = float(np.mean(names == np.where(test_truth == 0, "water", "land")))
    assert acc > 0.85, acc  # chance: 0.5
    with pytest.raises(Exception, match="exists"):
        finetune_segmenter(tif, tmp_path / "water.pkg", tiny_cfg(encoder, epochs=1), labels=gpkg, class_field="class")
