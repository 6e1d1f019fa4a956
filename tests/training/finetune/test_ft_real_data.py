"""Fine-tuning smoke tests on real SAR samples (../shared/data; skipped when absent): Sen1Floods11
(S1 dB + hand label, -1 = nodata) and HRSID (8-bit chips in pixel space, ship instance masks)."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from ftdata import build_encoder

from training.finetune.config import FinetuneConfig
from training.finetune.segment import finetune_segmenter

pytestmark = pytest.mark.slow


def cfg(encoder, epochs: int, **kw) -> FinetuneConfig:
    """``epochs`` bounds the run; the time cap is only a safety net, so a loaded machine gets the same model."""
    return FinetuneConfig(encoder=str(encoder), epochs=epochs, batch_size=16, lr=1e-3, warmup_epochs=1, drop_path=0.0,
                          device="cpu", max_minutes=3.0, max_chips=300, **kw)


def test_sen1floods11_water(tmp_path, shared_data):
    d = shared_data / "sen1floods11"
    s1, label = d / "Spain_7370579_S1Hand.tif", d / "Spain_7370579_LabelHand.tif"
    if not s1.exists() or not label.exists():
        pytest.skip("Sen1Floods11 sample not found")
    enc = build_encoder(tmp_path / "enc", img_size=64)
    t0 = time.time()
    r = finetune_segmenter(s1, tmp_path / "water.pkg", cfg(enc, 5), label_raster=label, classes=["dry", "water"])
    assert r["classes"] == ["dry", "water"] and r["val_iou"]["water"] is not None
    assert r["val_iou"]["water"] > 0.3, r  # a random-init tiny ViT after a few CPU epochs
    print(f"Sen1Floods11: water IoU {r['val_iou']['water']:.3f}, mean IoU {r['val_mean_iou']:.3f}, "
          f"{r['train_chips']}/{r['val_chips']} chips, {time.time() - t0:.0f} s")


def test_hrsid_ships_from_instance_masks(tmp_path, shared_data):
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    from engine.inference import InferenceOptions, run_inference

    d = shared_data / "hrsid"
    stem = "P0094_0_800_3000_3800"
    img, inst = d / f"{stem}.png", d / f"{stem}_instance_id_RGB.png"
    if not img.exists() or not inst.exists():
        pytest.skip("HRSID sample not found")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(inst) as src:
            ship = (src.read() > 0).any(0).astype(np.uint8)  # instance ids -> 1 = ship, 0 = sea
        with rasterio.open(tmp_path / "ship.tif", "w", driver="GTiff", width=ship.shape[1], height=ship.shape[0],
                           count=1, dtype="uint8") as dst:
            dst.write(ship, 1)
    enc = build_encoder(tmp_path / "enc", in_chans=1, img_size=64, units="uint8", bands=["HH"])
    t0 = time.time()
    r = finetune_segmenter(img, tmp_path / "ships.pkg", cfg(enc, 5, bands=[1], class_weights="auto"),
                           label_raster=tmp_path / "ship.tif", classes=["sea", "ship"])
    assert r["val_iou"]["ship"] is not None and r["val_iou"]["sea"] > 0.8, r  # ships: ~1 % of the pixels
    res = run_inference(str(img), tmp_path / "ships.tif", tmp_path / "ships.pkg",
                        InferenceOptions(device="cpu", bands=[1], batch_size=8))
    assert res.statistics["per_class"]["sea"]["fraction"] > 0.5
    print(f"HRSID: ship IoU {r['val_iou']['ship']:.3f}, sea IoU {r['val_iou']['sea']:.3f}, "
          f"{r['train_chips']}/{r['val_chips']} chips, {time.time() - t0:.0f} s")
