"""build_pretrain_data: mixed sources in one dataset, one collate, loader determinism, bad input."""

import functools
import json
import random

import numpy as np
import pytest
import torch
from chipgen import gray8, write_image
from helpers.rasters import speckle, write_raster
from torch.utils.data import DataLoader

from training.data import DataConfig, DataError, build_pretrain_data, worker_init_fn


@pytest.fixture
def mixed(tmp_path, chip_folder):
    """6 chips in a folder, one 64x64 raster, 4 pairs + 2 unpaired chips in an index."""
    raster = write_raster(tmp_path / "scene.tif", speckle((64, 64)))
    entries = []
    for i in range(4):
        write_image(tmp_path / "p" / f"s{i}.png", gray8(40, seed=10 + i))
        write_image(tmp_path / "p" / f"o{i}.png", gray8(40, seed=20 + i, channels=3))
        entries.append({"sar": f"p/s{i}.png", "optical": f"p/o{i}.png"})
    for i in range(2):
        write_image(tmp_path / "u" / f"u{i}.jpg", gray8(24, seed=30 + i))
    (tmp_path / "pairs.json").write_text(json.dumps({"paired": entries, "unpaired": ["u"]}))
    return DataConfig(paths=[str(chip_folder), str(raster)], pairs=str(tmp_path / "pairs.json"),
                      img_size=32, windows_per_raster=4, paired_ratio=0.5)


def test_one_dataset_one_collate(mixed):
    ds, sampler = build_pretrain_data(mixed, batch_size=4)
    assert (ds.n_paired, ds.n_unpaired, len(ds)) == (4, 2 + 6 + 4, 16)
    assert sampler.epoch_size == 16 and sampler.n_paired_per_epoch == 8
    batches = list(DataLoader(ds, batch_size=4, sampler=sampler))
    assert len(batches) == 4
    for b in batches:
        assert b["sar"].shape == (4, 1, 32, 32) and b["optical"].shape == (4, 3, 32, 32)
        assert b["paired"].dtype == torch.bool and len(b["source"]) == 4
        assert torch.equal(b["optical"].flatten(1).abs().sum(1) > 0, b["paired"])
    assert sum(int(b["paired"].sum()) for b in batches) == 8
    assert any("@" in s for b in batches for s in b["source"])  # raster windows are in


def test_workers_load_the_same_items_as_the_main_process(mixed):
    ds, sampler = build_pretrain_data(mixed, batch_size=4)
    sampler.set_epoch(1)
    init = functools.partial(worker_init_fn, seed=mixed.seed, rank=0)
    seq = [b["sar"] for b in DataLoader(ds, batch_size=4, sampler=sampler)]
    par = [b["sar"] for b in DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, worker_init_fn=init)]
    assert all(torch.equal(a, b) for a, b in zip(seq, par))


def test_rank_shares_interleave_to_the_global_order(mixed):
    a, b = (list(build_pretrain_data(mixed, batch_size=2, rank=r, world_size=2)[1]) for r in range(2))
    whole = list(build_pretrain_data(mixed, batch_size=4)[1])
    assert len(a) == len(b) == 8 and [k for pair in zip(a, b) for k in pair] == whole


def test_nothing_found_and_batch_too_large(tmp_path, chip_folder):
    with pytest.raises(DataError, match="no training data found"):
        build_pretrain_data(DataConfig(img_size=32), batch_size=2)
    with pytest.raises(DataError, match=r"batch \(4 x 2 rank\(s\) = 8\) is larger than the dataset \(6 items\)"):
        build_pretrain_data(DataConfig(paths=[str(chip_folder)], img_size=32), batch_size=4, world_size=2)
    with pytest.raises(DataError, match="data path not found.*nope"):
        build_pretrain_data(DataConfig(paths=[str(tmp_path / "nope")], img_size=32), batch_size=2)


def test_channel_mixing_is_checked_across_sources(tmp_path):
    dual = write_raster(tmp_path / "dual.tif", np.stack([speckle((40, 40)), speckle((40, 40), seed=1)]))
    chips = tmp_path / "chips"
    write_image(chips / "a.png", gray8(32))
    cfg = DataConfig(paths=[str(chips), str(dual)], img_size=32, in_chans=2, windows_per_raster=2)
    with pytest.raises(DataError, match=r"1 band\(s\): 1 file\(s\) \(.*a.png.*2 band\(s\): 1 file\(s\) \(.*dual.tif"):
        build_pretrain_data(cfg, batch_size=1)


def test_worker_init_fn_differs_per_rank_and_worker():
    draws = set()
    for rank in range(2):
        for worker in range(2):
            worker_init_fn(worker, seed=0, rank=rank)
            draws.add((random.random(), float(np.random.random())))
    assert len(draws) == 4


def test_input_scaling_reports_what_the_contract_can_say(tmp_path, chip_folder, caplog):
    ds, _ = build_pretrain_data(DataConfig(paths=[str(chip_folder)], img_size=32), batch_size=2)
    assert ds.input_scaling() == "uint8" and ds.scaling_counts() == {"uint8": 6}
    raster = write_raster(tmp_path / "scene.tif", speckle((64, 64)))
    cfg = DataConfig(paths=[str(chip_folder), str(raster)], img_size=32, windows_per_raster=3)
    ds, _ = build_pretrain_data(cfg, batch_size=2)
    assert ds.input_scaling() == "mixed" and ds.scaling_counts() == {"uint8": 6, "db": 3}
    assert "mix scalings" in caplog.text
