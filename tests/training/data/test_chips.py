"""ChipFolderDataset: finding chips, bad files (up front and at read time), channels, sizes."""

import logging
import os

import numpy as np
import pytest
import torch
from chipgen import gray8, make_chip_folder, write_image

from training.data import DataConfig, DataError
from training.data.chips import ChipFolderDataset


def test_items_from_a_nested_folder(chip_folder, cfg):
    ds = ChipFolderDataset(chip_folder, cfg)
    assert len(ds) == 6
    item = ds[0]
    assert set(item) == {"sar", "optical", "paired", "source"}
    assert item["sar"].shape == (1, 32, 32) and item["sar"].dtype == torch.float32
    assert 0.0 <= item["sar"].min() and item["sar"].max() <= 1.0
    assert item["optical"].shape == (3, 32, 32) and not item["optical"].any()
    assert item["paired"].dtype == torch.bool and not item["paired"]
    assert item["source"].endswith("chip00.png")
    np.testing.assert_allclose(item["sar"][0].numpy(), gray8(32, seed=0)[0] / 255.0, atol=1e-6)


def test_empty_or_missing_folder_is_named(tmp_path, cfg):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no chips here")
    with pytest.raises(DataError, match=r"empty.*\.png, \.jpg, \.jpeg, \.tif, \.tiff"):
        ChipFolderDataset(tmp_path / "empty", cfg)
    with pytest.raises(DataError, match="not found.*nowhere"):
        ChipFolderDataset(tmp_path / "nowhere", cfg)


def test_truncated_and_fake_files_are_skipped_and_counted(tmp_path, caplog):
    root = make_chip_folder(tmp_path / "c", n=40)
    good = (root / "class0" / "chip00.png").read_bytes()
    jpg = write_image(tmp_path / "x.jpg", gray8(32)).read_bytes()
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "fake.png").write_text("not an image")
    (root / "cut.png").write_bytes(good[:-20])
    with caplog.at_level(logging.WARNING):
        ds = ChipFolderDataset(root, DataConfig(img_size=32, max_bad_fraction=0.1))
    assert len(ds) == 40
    assert "skipped 3 unreadable chip file(s) of 43" in caplog.text and "truncated.jpg" in caplog.text
    with pytest.raises(DataError, match="3 of 43 chip files are unreadable.*max_bad_fraction=0.05"):
        ChipFolderDataset(root, DataConfig(img_size=32, max_bad_fraction=0.05))


def test_decoding_errors_during_training_are_replaced_then_fatal(tmp_path):
    root = make_chip_folder(tmp_path / "c", n=20)
    ds = ChipFolderDataset(root, DataConfig(img_size=32, max_bad_fraction=0.1))
    victims = [ds.chips[k].path for k in (3, 4, 5)]
    for p in victims:  # corrupted after the scan (e.g. a network file system hiccup)
        with open(p, "r+b") as f:
            f.seek(60)
            f.write(b"\0" * (os.path.getsize(p) - 80))
    item = ds[(0, 3)]
    assert item["source"] not in victims and item["sar"].shape == (1, 32, 32)
    assert ds.failed == {3}
    assert ds[(0, 3)]["source"] == item["source"]  # deterministic replacement
    ds[(0, 4)]
    with pytest.raises(DataError, match="3 of 20 files are unreadable"):
        ds[(0, 5)]


def test_16bit_and_float_chips(tmp_path):
    write_image(tmp_path / "u16.tif", np.full((8, 8), 65535 // 2, np.uint16))
    db = np.full((8, 8), -12.5, np.float32)
    db[0, :4] = -99.0
    write_image(tmp_path / "db.tif", db, nodata=-99.0)
    ds = ChipFolderDataset(tmp_path, DataConfig(img_size=8))
    by_name = {os.path.basename(ds[i]["source"]): ds[i]["sar"] for i in range(len(ds))}
    assert torch.allclose(by_name["u16.tif"], torch.tensor(0.5), atol=1e-4)
    x = by_name["db.tif"][0]
    assert torch.allclose(x[1:], torch.tensor(0.5)) and torch.all(x[0, :4] == 0)  # nodata -> 0


def test_gray_stored_as_rgb_becomes_one_band(tmp_path):
    write_image(tmp_path / "g.png", gray8(40, channels=3))
    one = ChipFolderDataset(tmp_path, DataConfig(img_size=40, in_chans=1))
    assert one.chips[0].gray and one[0]["sar"].shape == (1, 40, 40)
    three = ChipFolderDataset(tmp_path, DataConfig(img_size=40, in_chans=3))[0]["sar"]
    assert torch.equal(three[0], three[1]) and torch.equal(three[0], three[2])  # SARE shares the field


def test_gray_plus_alpha_png_drops_alpha(tmp_path):
    write_image(tmp_path / "ga.png", np.stack([gray8(16)[0], np.full((16, 16), 255, np.uint8)]))
    ds = ChipFolderDataset(tmp_path, DataConfig(img_size=16, in_chans=2))
    assert ds.chips[0].bands == (1,) and ds[0]["sar"].shape == (2, 16, 16)


def test_dual_pol_is_ordered_co_pol_first(tmp_path):
    vv = np.full((8, 8), 0.1, np.float32)
    vh = np.full((8, 8), 0.01, np.float32)
    write_image(tmp_path / "a" / "vh_first.tif", np.stack([vh, vv]))  # unnamed, OpenSARShip order
    write_image(tmp_path / "a" / "named.tif", np.stack([vh, vv]), descriptions=["VH", "VV"])
    for name in ("vh_first.tif", "named.tif"):
        pair = ChipFolderDataset(tmp_path / "a" / name, DataConfig(img_size=8, in_chans=2))[0]["sar"]
        assert pair[0].mean() > pair[1].mean()
        single = ChipFolderDataset(tmp_path / "a" / name, DataConfig(img_size=8, in_chans=1))[0]["sar"]
        assert torch.allclose(single[0], pair[0])


def test_channel_counts_that_cannot_be_mapped_are_refused(tmp_path):
    for i in range(3):
        write_image(tmp_path / "mix" / f"single{i}.tif", np.full((8, 8), 0.1, np.float32))
    write_image(tmp_path / "mix" / "dual.tif", np.full((2, 8, 8), 0.1, np.float32))
    assert len(ChipFolderDataset(tmp_path / "mix", DataConfig(img_size=8, in_chans=1))) == 4
    with pytest.raises(DataError, match=r"1 band\(s\): 3 file\(s\) \(.*single0.tif.*2 band\(s\): 1 file\(s\) \(.*dual.tif"):
        ChipFolderDataset(tmp_path / "mix", DataConfig(img_size=8, in_chans=2))
    rgb = np.random.default_rng(0).integers(0, 255, (3, 8, 8), dtype=np.uint8)
    write_image(tmp_path / "rgb" / "colour.png", rgb)
    with pytest.raises(DataError, match=r"cannot become in_chans=1.*3 band\(s\).*colour.png"):
        ChipFolderDataset(tmp_path / "rgb", DataConfig(img_size=8, in_chans=1))
    assert ChipFolderDataset(tmp_path / "rgb", DataConfig(img_size=8, in_chans=3))[0]["sar"].shape == (3, 8, 8)
    with pytest.raises(DataError, match="cannot become in_chans=3"):
        ChipFolderDataset(tmp_path / "mix" / "dual.tif", DataConfig(img_size=8, in_chans=3))


def test_resize_and_deterministic_random_crops(tmp_path):
    write_image(tmp_path / "big.jpg", gray8(48))
    write_image(tmp_path / "small.png", gray8(20))
    resized = ChipFolderDataset(tmp_path, DataConfig(img_size=32))
    assert [tuple(resized[i]["sar"].shape) for i in range(2)] == [(1, 32, 32)] * 2
    crop = ChipFolderDataset(tmp_path, DataConfig(img_size=32, resize="crop"))
    big = next(i for i in range(2) if crop.chips[i].path.endswith("big.jpg"))
    a, b, c = crop[(0, big)]["sar"], crop[(0, big)]["sar"], crop[(1, big)]["sar"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    small = crop[(0, 1 - big)]["sar"]
    assert small.shape == (1, 32, 32) and small[0, 0, 0] == 0 and small[0, 16, 16] > 0  # padded
