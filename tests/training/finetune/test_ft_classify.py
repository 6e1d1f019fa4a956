"""Classification fine-tuning (training/finetune/classify.py): from class folders (linear probe,
N-shot with seeds, batch lowered to the data) and from a raster + labelled polygons (chips inside
the polygons, spatial split), packages with metrics and plots that ``sarmae infer`` runs unchanged
(a grid GeoPackage), and the optional ONNX export."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from ftdata import build_encoder, chip_folders, class_polygons, water_land, write_labels

from training.finetune.classify import class_folders, finetune_classifier, split
from training.finetune.common import FinetuneError
from training.finetune.config import FinetuneConfig


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return build_encoder(tmp_path_factory.mktemp("enc") / "enc", img_size=32)


def tiny_cfg(encoder, **kw) -> FinetuneConfig:
    d = dict(encoder=str(encoder), epochs=6, batch_size=16, lr=1e-3, warmup_epochs=1, drop_path=0.0, device="cpu",
             patience=6)
    d.update(kw)
    return FinetuneConfig(**d)


def test_shots_are_per_class_and_follow_the_seed(tmp_path):
    chips = class_folders(chip_folders(tmp_path / "chips", {"dark": 40, "bright": 170}, n=10))
    runs = [split(chips, 0.2, 3, seed) for seed in (0, 0, 1)]
    for tr, va in runs:
        assert np.bincount(chips.labels[tr]).tolist() == [3, 3] and np.bincount(chips.labels[va]).tolist() == [2, 2]
        assert not set(tr) & set(va)
    assert np.array_equal(runs[0][0], runs[1][0]) and not np.array_equal(runs[0][0], runs[2][0])


def test_linear_probe_on_class_folders(tmp_path, encoder, caplog):
    from engine.package import load_package

    root = chip_folders(tmp_path / "chips", {"dark": 40, "bright": 170}, n=12)
    rows = []
    with caplog.at_level(logging.WARNING, logger="sarmae.finetune"):
        r = finetune_classifier(root, tmp_path / "c.pkg", tiny_cfg(encoder, linear_probe=True, shots=4), rows.append)
    assert "batch size lowered from 16 to 8" in caplog.text  # 2 x 4 shots < the batch: lowered, said
    assert r["classes"] == ["bright", "dark"] and r["train_chips"] == 8 and r["val_accuracy"] >= 0.75, r
    assert len(rows) == r["epochs_run"] and all("eta_s" in row for row in rows)
    pkg = load_package(tmp_path / "c.pkg")
    card = pkg.card
    assert card.task == "classify" and card.input["units"] == "uint8" and card.input["clip"] == [0.0, 255.0]
    prov = card.provenance
    assert prov["mode"] == "linear probe" and prov["shots"] == 4 and prov["config"]["label_smoothing"] == 0.1
    assert set(prov["metrics"]["val_per_class_accuracy"]) == {"bright", "dark"}
    assert {"training_curves.png", "confusion_matrix.png"} <= {p.name for p in (tmp_path / "c.pkg").iterdir()}
    with pytest.raises(FinetuneError, match="--bands picks raster bands"):
        finetune_classifier(root, tmp_path / "b.pkg", tiny_cfg(encoder, bands=[1]))


def test_class_folders_need_two_classes(tmp_path, encoder):
    root = chip_folders(tmp_path / "one", {"dark": 40}, n=4)
    (root / "empty").mkdir()
    with pytest.raises(FinetuneError, match=r"one.*at least two class sub-folders with chips \(found 1: dark\)"):
        finetune_classifier(root, tmp_path / "c.pkg", tiny_cfg(encoder))
    with pytest.raises(FinetuneError, match="nowhere: chip folder not found; give a folder with one sub-folder"):
        finetune_classifier(tmp_path / "nowhere", tmp_path / "c.pkg", tiny_cfg(encoder))
    with pytest.raises(FinetuneError, match="give the classification data"):
        finetune_classifier(root, tmp_path / "c.pkg", tiny_cfg(encoder), rasters=["x.tif"], labels="l.gpkg",
                            class_field="class")


def test_classifier_from_polygons_runs_in_infer(tmp_path, encoder):
    import fiona

    from engine.inference import InferenceOptions, run_inference
    from engine.package import load_package

    tif, truth = water_land(tmp_path / "train.tif")
    gpkg = write_labels(tmp_path / "labels.gpkg", class_polygons(truth, {0: "water", 1: "land"}))
    rows = []
    r = finetune_classifier(None, tmp_path / "wl.pkg", tiny_cfg(encoder, export_onnx=True), rows.append,
                            rasters=[tif], labels=gpkg, class_field="class", classes=["water", "land"],
                            colours=["#0000ff", "#00aa00"])
    assert r["classes"] == ["water", "land"] and r["val_accuracy"] > 0.85, r
    assert r["train_chips"] > 20 and r["val_chips"] > 5  # several chips per (large) polygon
    pkg = load_package(tmp_path / "wl.pkg")
    card = pkg.card
    assert [(c["name"], c["colour"]) for c in card.classes] == [("water", "#0000ff"), ("land", "#00aa00")]
    assert card.input == load_package(encoder).card.input  # the encoder's contract: what infer feeds the model
    prov = card.provenance
    assert prov["split"].startswith("spatial blocks") and prov["val_blocks"] >= 1 and prov["labels"] == str(gpkg)
    assert {"training_curves.png", "confusion_matrix.png", "model.onnx"} <= {p.name for p in (tmp_path / "wl.pkg").iterdir()}
    # infer, unchanged, through onnxruntime: a grid of labelled 32 px windows over an unseen scene
    test_tif, test_truth = water_land(tmp_path / "test.tif", size=160, seed=5)
    res = run_inference(str(test_tif), tmp_path / "grid.gpkg", pkg,
                        InferenceOptions(device="cpu", backend="onnxruntime", batch_size=8))
    assert res.task == "classify"
    with fiona.open(res.outputs["grid"]) as src:
        cells = [f.properties for f in src]
    assert len(cells) == 25
    hit = [p["class_name"] == ("land" if test_truth[p["row_off"]:p["row_off"] + 32, p["col_off"]:p["col_off"] + 32]
                                .mean() > 0.5 else "water") for p in cells]
    assert np.mean(hit) > 0.8, np.mean(hit)  # chance: 0.5


def test_classifier_from_polygons_bad_input(tmp_path, encoder):
    tif, truth = water_land(tmp_path / "wl.tif")
    water = write_labels(tmp_path / "water.gpkg", class_polygons(truth, {0: "water"}))
    with pytest.raises(FinetuneError, match=r"only one class \(water\) in water.gpkg over wl.tif.*--background"):
        finetune_classifier(None, tmp_path / "m.pkg", tiny_cfg(encoder), rasters=tif, labels=water, class_field="class")
    with pytest.raises(FinetuneError, match="give the labels"):
        finetune_classifier(None, tmp_path / "m.pkg", tiny_cfg(encoder), rasters=tif, labels=water)
    with pytest.raises(FinetuneError, match="--class-weights applies to segmentation"):
        finetune_classifier(None, tmp_path / "m.pkg", tiny_cfg(encoder, class_weights="auto"), rasters=tif,
                            labels=water, class_field="class")
    with pytest.raises(FinetuneError, match="ONNX export covers"):
        from training.finetune.detect import finetune_detector

        finetune_detector(tif, tmp_path / "m.pkg", tiny_cfg(encoder, export_onnx=True), labels=water,
                          class_field="class")
    with pytest.raises(FinetuneError, match=r"1 colour\(s\) given for 2 class\(es\)"):
        finetune_classifier(None, tmp_path / "m.pkg", tiny_cfg(encoder, epochs=1), rasters=tif, labels=water,
                            class_field="class", background="land", colours=["#ffffff"])


def test_baselines_train_the_small_cnn_on_the_same_chips(tmp_path, encoder):
    from engine.package import load_package

    root = chip_folders(tmp_path / "chips", {"dark": 40, "bright": 170}, n=8)
    r = finetune_classifier(root, tmp_path / "c.pkg", tiny_cfg(encoder, mode="head", baselines=True, epochs=2))
    (row,) = r["baselines"]
    assert row["name"] == "small CNN" and row["epochs_run"] == 2 and 0.0 <= row["val_accuracy"] <= 1.0
    assert row["parameters"] > 100_000
    cnn_wins = row["val_accuracy"] > r["val_accuracy"]
    assert any("small CNN trained from scratch" in w for w in r["warnings"]) == cnn_wins, r["warnings"]
    assert load_package(tmp_path / "c.pkg").card.provenance["metrics"]["baselines"] == [row]
    v = r["validation"]  # 2 chips of each class held out: enough to trust
    assert v["reliable"] is True and v["held_out_per_class"] == {"bright": 2, "dark": 2} and "cross_validation" not in v


def test_weak_validation_is_said_with_a_cross_validation(tmp_path, encoder):
    """Issue 16, item 2, for classification: one chip of each class held out is reported as weak,
    with the quick head's cross-validation by chip, in the result, the card and the plugin's text."""
    from sarmae_qgis.model_cards import describe_html, read_card, validation_doubts

    root = chip_folders(tmp_path / "chips", {"dark": 40, "bright": 170}, n=6)  # 0.2 of 6: 1 held out per class
    r = finetune_classifier(root, tmp_path / "c.pkg", tiny_cfg(encoder, mode="head"))
    v = r["validation"]
    assert r["val_chips"] == 2 and v["reliable"] is False and v["held_out_per_class"] == {"bright": 1, "dark": 1}
    assert "only 2 validation chip(s)" in v["note"] and "only 1 dark chip held out" in v["note"]
    cv = v["cross_validation"]
    assert cv["folds"] == 5 and cv["by"] == "training chip" and 0.0 <= cv["balanced_accuracy"] <= 1.0
    assert "cross-validation over the training chips (5 folds by chip" in v["note"] and v["note"] in r["warnings"]
    assert v["note"] in validation_doubts(r, r["classes"])  # the results dialog's yellow box
    card = read_card(tmp_path / "c.pkg")
    assert card.raw["provenance"]["metrics"]["validation"] == v
    assert "Validation not reliable" in describe_html(card)  # the Models dialog's card


def test_block_pooling_package_runs_in_the_engine_and_onnx(tmp_path, encoder):
    from engine.package import load_package
    from training.evaluate import evaluate_chips

    root = chip_folders(tmp_path / "chips", {"dark": 40, "bright": 170}, n=8)
    r = finetune_classifier(root, tmp_path / "c.pkg", tiny_cfg(encoder, mode="head", pool="blocks", export_onnx=True))
    pkg = load_package(tmp_path / "c.pkg")
    assert pkg.card.architecture.head == {"pool": "blocks", "blocks": 2}  # the 2-block test encoder: both
    assert pkg.model.head.in_features == 2 * 2 * pkg.model.encoder.embed_dim and "fp32" in pkg.card.onnx
    ev = evaluate_chips(str(tmp_path / "c.pkg"), str(root), tmp_path / "cm.png")
    assert ev["accuracy"] >= r["val_accuracy"] - 0.25
    with pytest.raises(FinetuneError, match="--pool 'max'"):
        finetune_classifier(root, tmp_path / "d.pkg", tiny_cfg(encoder, pool="max"))


def test_standardised_chips_are_smoothed_by_default_and_smooth_is_checked():
    from training.finetune.classify import SMOOTH_DEFAULT, with_standardise

    c8 = {"bands": ["VV"], "units": "uint8", "clip": [0, 255], "mean": [0.5], "std": [0.5]}
    spec, why = with_standardise(c8, FinetuneConfig())  # auto: median for 8-bit chips, then the default low-pass
    assert spec["standardise"]["smooth"] == SMOOTH_DEFAULT > 0 and "low-pass" in why
    assert "smooth" not in with_standardise(c8, FinetuneConfig(smooth=0))[0]["standardise"]
    assert with_standardise(c8, FinetuneConfig(standardise="iqr", smooth=2))[0]["standardise"] == {
        "per": "window", "centre": "median", "spread": "iqr", "smooth": 2.0}
    cdb = {**c8, "units": "db", "clip": [-35, 10]}
    assert "standardise" not in with_standardise(cdb, FinetuneConfig())[0]  # calibrated: neither by default
    with pytest.raises(FinetuneError, match="not standardised .*add --standardise median or iqr"):
        with_standardise(cdb, FinetuneConfig(smooth=1.5))
    with pytest.raises(FinetuneError, match="--smooth -1: .smooth. must be a Gaussian sigma in pixels from 0"):
        with_standardise(c8, FinetuneConfig(smooth=-1))
