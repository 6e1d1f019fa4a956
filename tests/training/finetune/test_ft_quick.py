"""Quick mode (training/finetune/quick.py): a light head on the frozen encoder, from a few polygons,
and the automatic choice between it and a full fine-tune."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ftdata import build_encoder, chip_folders, class_polygons, water_land, write_labels
from shapely.geometry import box

from training.finetune.common import FinetuneError
from training.finetune.config import FinetuneConfig
from training.finetune.quick import AUTO_FULL_MIN_CHIPS, resolve_mode


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return build_encoder(tmp_path_factory.mktemp("enc") / "enc", img_size=32)


def test_resolve_mode():
    n = AUTO_FULL_MIN_CHIPS["segment"]
    assert resolve_mode(FinetuneConfig(), "segment", n - 1)[0] == "head"
    mode, why = resolve_mode(FinetuneConfig(), "segment", n)
    assert mode == "auto" and "better validation score is kept" in why
    assert resolve_mode(FinetuneConfig(mode="full"), "segment", 3)[0] == "full"
    assert resolve_mode(FinetuneConfig(mode="head"), "classify", 10_000)[0] == "head"
    with pytest.raises(FinetuneError, match="--mode 'fast': use head"):
        resolve_mode(FinetuneConfig(mode="fast"), "segment", 3)


def test_quick_segmenter_from_four_polygons(tmp_path, encoder):
    """The analyst's few-polygon case: 2 small polygons per class on a 192 px raster; batch 16 is
    lowered, the light head is fitted on the frozen encoder, and the map over the WHOLE raster beats
    the majority class (which scores 0.5 pixel accuracy here)."""
    from rasterio.transform import from_origin

    from engine.inference import InferenceOptions, run_inference
    from engine.package import load_package
    from training.finetune.segment import finetune_segmenter

    tif, truth = water_land(tmp_path / "scene.tif", size=192, seed=3)
    tf = from_origin(500000.0, 4500000.0, 20.0, 20.0)
    px = [(20, 20, "water"), (70, 10, "water"), (150, 160, "land"), (120, 170, "land")]  # (col, row) of 14 px squares
    feats = []
    for c, r, name in px:
        assert truth[r:r + 14, c:c + 14].mean() == (name == "land")
        (x0, y0), (x1, y1) = tf * (c, r), tf * (c + 14, r + 14)
        feats.append((box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), name))
    gpkg = write_labels(tmp_path / "four.gpkg", feats)
    cfg = FinetuneConfig(encoder=str(encoder), batch_size=16, device="cpu", drop_path=0.0)
    r = finetune_segmenter(tif, tmp_path / "quick.pkg", cfg, labels=gpkg, class_field="class")
    assert r["mode"] == "head" and "quick mode" in r["mode_reason"]
    assert any("batch size lowered" in w for w in r["warnings"])
    assert r["validation"]["chips"] >= 1 and "reliable" in r["validation"]
    assert (tmp_path / "quick.pkg" / "preview.png").stat().st_size > 1000
    pkg = load_package(tmp_path / "quick.pkg")
    assert pkg.card.architecture["head"]["kind"] == "light"
    assert pkg.card.provenance["mode"].startswith("quick")
    # none of 4 polygons is spared: once validated, the head is fitted again on every labelled chip
    refit = [n for n in pkg.card.provenance["log"] if "fitted again on all" in n]
    assert refit and f"all {r['train_chips'] + r['val_chips']} labelled chips" in refit[0]
    if not r["validation"]["reliable"]:  # the results dialog's note says what the package was fitted on
        assert "fitted on all of them" in r["validation"]["note"]
    res = run_inference(str(tif), tmp_path / "map.tif", pkg, InferenceOptions(device="cpu", batch_size=8))
    import rasterio

    with rasterio.open(res.outputs["class"]) as src:
        pred = src.read(1)
    acc = float(np.mean(np.array(["land", "water"])[pred] == np.where(truth == 0, "water", "land")))
    assert acc > 0.9, acc


def test_quick_then_full_keeps_the_better(tmp_path, encoder):
    from training.finetune.segment import finetune_segmenter

    tif, truth = water_land(tmp_path / "train.tif", size=224, seed=0)
    gpkg = write_labels(tmp_path / "labels.gpkg", class_polygons(truth, {0: "water", 1: "land"}))
    cfg = FinetuneConfig(encoder=str(encoder), batch_size=8, device="cpu", drop_path=0.0, epochs=2, mode="auto",
                         warmup_epochs=0.5)
    import training.finetune.quick as quick

    old = dict(quick.AUTO_FULL_MIN_CHIPS), quick.QUICK_MLP_MIN_CHIPS
    quick.AUTO_FULL_MIN_CHIPS["segment"] = 1  # make "auto" run every stage on this tiny scene
    quick.QUICK_MLP_MIN_CHIPS = 1
    try:
        r = finetune_segmenter(tif, tmp_path / "auto.pkg", cfg, labels=gpkg, class_field="class")
    finally:
        quick.AUTO_FULL_MIN_CHIPS.update(old[0])
        quick.QUICK_MLP_MIN_CHIPS = old[1]
    assert r["mode"] in ("head", "full") and "quick mode first" in r["mode_reason"]
    assert any("per-pixel MLP head scored" in line for line in r["log"]), r["log"]
    assert r["val_mean_iou"] > 0.75, r


def test_quick_classifier_on_chip_folders(tmp_path, encoder):
    from engine.package import load_package
    from training.evaluate import evaluate_chips
    from training.finetune.classify import finetune_classifier

    chips = chip_folders(tmp_path / "chips", {"dark": 40, "mid": 110, "bright": 200}, n=12, size=32)
    cfg = FinetuneConfig(encoder=str(encoder), in_chans=1, device="cpu", mode="head", batch_size=64,
                         standardise="none")  # classes told apart by their brightness: keep it
    r = finetune_classifier(chips, tmp_path / "cls.pkg", cfg)
    assert r["mode"] == "head" and r["val_accuracy"] > 0.9, r
    test = chip_folders(tmp_path / "test", {"dark": 40, "mid": 110, "bright": 200}, n=6, size=32, seed=5)
    ev = evaluate_chips(str(tmp_path / "cls.pkg"), str(test), tmp_path / "cm.png")
    assert ev["accuracy"] > 0.9, ev  # chance 1/3: the fitted head is folded into an ordinary classify package
    card = load_package(tmp_path / "cls.pkg").card
    assert card.task == "classify" and card.architecture.head.get("views", 1) == r["views"], (card.architecture, r)
    assert "validation accuracy" in r["views_reason"]


def test_the_quick_classifier_averages_its_views_when_validation_says_so():
    from training.finetune.quick import choose_views

    assert choose_views(0.850, 0.904, True, 386)[0] == 8
    n, why = choose_views(0.90, 0.90, True, 40)  # a tie keeps the cheaper single view
    assert n == 1 and "1/8 the cost" in why
    assert choose_views(0.90, 0.85, True, 40)[0] == 1
    assert choose_views(0.90, None, True, 0)[0] == 8  # no validation chips: the measured default
    assert choose_views(0.80, 0.95, False, 40)[0] == 1  # the plain probe saw one view of each chip


def test_the_default_classifier_does_not_depend_on_the_gain(tmp_path, encoder):
    """Each chip is standardised in dB by default (the card records it, so the engine applies it):
    the same chips 3 dB brighter get the same answers."""
    from engine.package import load_package
    from training.evaluate import evaluate_chips
    from training.finetune.classify import (
        SMOOTH_DEFAULT,
        STANDARDISE,
        class_folders,
        finetune_classifier,
        load_tensors,
    )
    from training.finetune.common import apply_gain, model_input

    levels = {"smooth": 40, "rough": 30, "speckled": 20}  # classes differ by texture: 1, 4, 16 looks
    chips = chip_folders(tmp_path / "chips", levels, n=12, size=32)
    r = finetune_classifier(chips, tmp_path / "cls.pkg", FinetuneConfig(encoder=str(encoder), in_chans=1, device="cpu",
                                                                       mode="head", batch_size=64))
    card = load_package(tmp_path / "cls.pkg").card
    assert card.input["standardise"] == {**STANDARDISE["median"], "smooth": SMOOTH_DEFAULT} and r["val_accuracy"] > 0.8, r
    test = chip_folders(tmp_path / "test", levels, n=6, size=32, seed=5)
    assert evaluate_chips(str(tmp_path / "cls.pkg"), str(test), tmp_path / "cm.png")["accuracy"] > 0.8
    x, _ = load_tensors(class_folders(test).files, 32, 1, card.input["mean"], card.input["std"])
    model = load_package(tmp_path / "cls.pkg").model
    with torch.no_grad():
        p = [model(model_input(apply_gain(x, card.input, db), card.input)).softmax(1) for db in (0.0, -3.0, 3.0)]
    assert float((p[1] - p[0]).abs().max()) < 0.05 and float((p[2] - p[0]).abs().max()) < 0.05
    assert torch.equal(p[1].argmax(1), p[0].argmax(1)) and torch.equal(p[2].argmax(1), p[0].argmax(1))


def test_detect_refuses_head_mode(tmp_path, encoder):
    from training.finetune.detect import finetune_detector

    with pytest.raises(FinetuneError, match="--mode head"):
        finetune_detector("x.tif", tmp_path / "d.pkg", FinetuneConfig(encoder=str(encoder), mode="head"),
                          labels="l.gpkg", class_field="class")


@pytest.mark.parametrize("k_fit, k", [(2, 2), (3, 3), (2, 3)])
def test_fold_logistic_reproduces_the_fitted_probabilities(k_fit, k):
    """The folded linear layer on RAW features gives scikit-learn's probabilities (binary and
    multinomial), and a class absent from the fit gets no probability."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from training.finetune.quick import fold_logistic

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(k_fit), 50)
    x = rng.normal(0, 1, (len(y), 5)) * [1, 10, 100, 0.1, 3] + [5, -2, 300, 0, 1] + y[:, None] * 0.8
    sc = StandardScaler().fit(x)
    lr = LogisticRegression(C=1.0).fit(sc.transform(x), y)
    w, b = fold_logistic(lr, sc, k)
    logits = torch.from_numpy(x @ w.T + b)
    prob = logits.softmax(1).numpy()
    assert np.allclose(prob[:, :k_fit], lr.predict_proba(sc.transform(x)), atol=1e-6)
    assert np.all(prob[:, k_fit:] < 1e-6)


def test_one_band_encoder_on_dual_pol_raster_takes_the_raster_band_names(tmp_path):
    """A single-band encoder adapted to a VV + VH raster: the new channels are named by the data
    (the package's contract says VV, VH), instead of a repeated VV that refuses the raster."""
    from engine.package import load_package
    from training.finetune.segment import finetune_segmenter

    enc1 = build_encoder(tmp_path / "enc1", in_chans=1, img_size=32, bands=["VV"])
    tif, truth = water_land(tmp_path / "scene.tif", size=128, seed=1)
    gpkg = write_labels(tmp_path / "labels.gpkg", class_polygons(truth, {0: "water", 1: "land"}))
    cfg = FinetuneConfig(encoder=str(enc1), in_chans=2, device="cpu", drop_path=0.0, mode="head")
    finetune_segmenter(tif, tmp_path / "m.pkg", cfg, labels=gpkg, class_field="class")
    assert load_package(tmp_path / "m.pkg").card.input["bands"] == ["VV", "VH"]


def test_a_richer_candidate_must_win_on_more_than_the_folds_noise():
    """The quick mode's choice of features and strength: the simplest candidate within one standard
    error (paired by fold) of the best; a richer one is kept only when it wins consistently."""
    from training.finetune.quick import simplest_within_noise

    simple, rich = ("pixel", 0.001), ("pixel+encoder", 1.0)
    noisy = {simple: [1.0, 1.0, 1.0, 0.94], rich: [1.0, 1.0, 1.0, 1.0]}  # the richer wins one fold of four
    cv = {k: sum(v) / len(v) for k, v in noisy.items()}
    assert simplest_within_noise([simple, rich], cv, noisy) == simple
    steady = {simple: [0.98, 0.97, 0.98, 0.97], rich: [1.0, 0.99, 1.0, 0.99]}  # it wins every fold
    cv = {k: sum(v) / len(v) for k, v in steady.items()}
    assert simplest_within_noise([simple, rich], cv, steady) == rich
    tie = {simple: [0.99, 0.99], rich: [0.993, 0.993]}  # within TIE: the simpler
    cv = {k: sum(v) / len(v) for k, v in tie.items()}
    assert simplest_within_noise([simple, rich], cv, tie) == simple


def test_a_quick_classifier_on_a_random_encoder_says_what_a_pretrained_one_adds(tmp_path):
    """No --encoder in quick mode: the result warns that random features only tie a small CNN and
    names the pretrained encoder's score; with --baselines (both scores shown) it does not."""
    from training.finetune.classify import finetune_classifier

    chips = chip_folders(tmp_path / "chips", {"dark": 40, "bright": 170}, n=6, size=32)
    cfg = FinetuneConfig(encoder="", img_size=32, in_chans=1, device="cpu", mode="head", batch_size=64)
    r = finetune_classifier(chips, tmp_path / "r.pkg", cfg)
    (w,) = [w for w in r["warnings"] if w.startswith("no pretrained encoder")]
    assert "only tie a small CNN" in w and "pretrained encoder scores 90.4 %" in w
