"""The small CNN as a classify package (``--arch cnn``): it trains from a tiny chip set and runs
through the engine (torch and onnxruntime, int8), and ``--mode auto`` keeps the candidate with the
better validation score (each outcome, by making the other candidate clearly worse); bad settings
are refused with a sentence."""

from __future__ import annotations

import numpy as np
import pytest
from ftdata import build_encoder, chip_folders

from training.finetune.classify import finetune_classifier
from training.finetune.common import FinetuneError
from training.finetune.config import FinetuneConfig

LEVELS = {"dark": 40, "bright": 170}  # and 1 / 4 looks: told apart after per-chip standardisation too


def cnn_cfg(**kw) -> FinetuneConfig:
    # smooth 0: these classes differ only by their speckle's looks once each chip is standardised, the
    # texture that the default low-pass (finetune --smooth) is there to take away
    d = dict(arch="cnn", img_size=32, epochs=8, batch_size=16, device="cpu", seed=0, smooth=0)
    d.update(kw)
    return FinetuneConfig(**d)


def test_cnn_package_trains_and_runs_in_the_engine(tmp_path):
    import fiona
    import rasterio
    from rasterio.transform import from_origin

    from engine.export import export_package
    from engine.inference import InferenceOptions, run_inference
    from engine.models.small_cnn import SmallCNN
    from engine.package import load_package
    from training.evaluate import evaluate_chips

    root = chip_folders(tmp_path / "chips", LEVELS, n=16)
    r = finetune_classifier(root, tmp_path / "cnn.pkg", cnn_cfg(export_onnx=True))
    assert r["mode"] == "cnn" and r["val_accuracy"] >= 0.75 and r["epochs_run"] == 8, r
    pkg = load_package(tmp_path / "cnn.pkg")
    card = pkg.card
    assert card.task == "classify" and card.architecture.name == "small_cnn" and isinstance(pkg.model, SmallCNN)
    assert card.input_size == (32, 32) and card.in_chans == 1 and card.input["units"] == "uint8"
    assert card.input["standardise"]["centre"] == "median"  # 8-bit chips: auto = median, as the ViT route
    assert card.provenance["encoder"].startswith("none") and "fp32" in card.onnx
    assert evaluate_chips(str(tmp_path / "cnn.pkg"), str(root), tmp_path / "cm.png")["accuracy"] >= 0.75
    # infer, unchanged, through onnxruntime: a 64 px scene of 2 x 2 windows, left half dark, right half bright
    rng = np.random.default_rng(3)
    scene = np.concatenate([np.clip(40 * rng.gamma(1, 1, (64, 32)), 0, 255),
                            np.clip(170 * rng.gamma(4, 1 / 4, (64, 32)), 0, 255)], 1).astype(np.uint8)
    tif = tmp_path / "scene.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(scene, 1)
    res = run_inference(str(tif), tmp_path / "grid.gpkg", pkg, InferenceOptions(device="cpu", backend="onnxruntime"))
    with fiona.open(res.outputs["grid"]) as src:
        cells = {(f.properties["row_off"], f.properties["col_off"]): f.properties["class_name"] for f in src}
    assert cells == {(0, 0): "dark", (32, 0): "dark", (0, 32): "bright", (32, 32): "bright"}, cells
    rep = export_package(tmp_path / "cnn.pkg", precision="int8", calibration=tif, log=lambda *_: None)
    assert rep.int8 and (tmp_path / "cnn.pkg" / "model.int8.onnx").is_file()


def _dead_encoder(dest):
    """A real encoder package whose weights are all zero: its features are the same for every chip."""
    import torch

    from engine.models import create_model
    from engine.package import default_input, new_card, save_package

    enc = create_model("vit_tiny_patch16", in_chans=1, img_size=32, depth=2)
    with torch.no_grad():
        for p in enc.parameters():
            p.zero_()
    card = new_card("dead-encoder", "embed", {"name": "vit_tiny_patch16", "encoder": enc.cfg.to_dict()},
                    default_input(1), [], {"training": "none: zero weights (a useless encoder, for tests)"})
    return save_package(enc.state_dict(), card, dest)


def test_auto_keeps_the_better_candidate_on_validation(tmp_path):
    from engine.package import load_package

    root = chip_folders(tmp_path / "chips", LEVELS, n=16)
    # a useless encoder: the quick head is at chance, the small CNN is kept
    r = finetune_classifier(root, tmp_path / "a.pkg", cnn_cfg(arch="vit_tiny_patch16", mode="auto",
                                                                 encoder=str(_dead_encoder(tmp_path / "dead.pkg"))))
    names = [c["name"] for c in r["candidates"]]
    assert names == ["ViT quick head", "small CNN"] and r["mode"] == "cnn", r
    vit, cnn = (c["validation"] for c in r["candidates"])
    assert cnn["score"] > vit["score"] + 0.2 and "kept the small CNN" in r["mode_reason"]
    card = load_package(tmp_path / "a.pkg").card
    assert card.architecture.name == "small_cnn" and "kept the small CNN" in card.provenance["metrics"]["mode_reason"]
    # a working encoder, and a CNN given one optimiser step (one epoch, one batch) on four texture classes:
    # the ViT's quick head is kept
    enc = build_encoder(tmp_path / "enc", in_chans=1, img_size=32)
    four = chip_folders(tmp_path / "four", {"a": 40, "b": 170, "c": 40, "d": 170}, n=16)  # 1 / 4 / 16 / 64 looks
    r = finetune_classifier(four, tmp_path / "b.pkg", cnn_cfg(arch="vit_tiny_patch16", mode="auto", encoder=str(enc),
                                                                 epochs=1, batch_size=64))
    vit, cnn = (c["validation"] for c in r["candidates"])
    assert r["mode"] == "head" and vit["score"] > cnn["score"] + 0.2, r["candidates"]
    assert "kept the ViT quick head" in r["mode_reason"]
    assert load_package(tmp_path / "b.pkg").card.architecture.head == {"pool": "blocks", "blocks": 2}  # the ViT


def test_bad_architecture_settings_are_sentences(tmp_path):
    root = chip_folders(tmp_path / "chips", LEVELS, n=4)
    with pytest.raises(FinetuneError, match="--arch 'resnet50': use cnn .* or a ViT size"):
        finetune_classifier(root, tmp_path / "m.pkg", cnn_cfg(arch="resnet50"))
    with pytest.raises(FinetuneError, match=r"--arch cnn trains a small CNN from scratch and takes no --encoder \(e.pkg\)"):
        finetune_classifier(root, tmp_path / "m.pkg", cnn_cfg(encoder="e.pkg"))
    with pytest.raises(FinetuneError, match="--mode head and --linear-probe belong to a pretrained encoder"):
        finetune_classifier(root, tmp_path / "m.pkg", cnn_cfg(mode="head"))
    with pytest.raises(FinetuneError, match="--img-size 40: the small CNN needs a multiple of 16 px"):
        finetune_classifier(root, tmp_path / "m.pkg", cnn_cfg(img_size=40))
    assert not (tmp_path / "m.pkg").exists()
