"""The loaders on real SAR data from ../shared/data (skipped when it is absent)."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from training.data import DataConfig, DataError, build_pretrain_data
from training.data.chips import ChipFolderDataset
from training.data.pairs import PairedChipDataset, load_pair_index
from training.data.windows import RasterWindowDataset


def test_mstar_folder_batches(shared_data):
    cfg = DataConfig(paths=[str(shared_data / "mstar_soc10" / "train_17deg")], img_size=128, in_chans=1)
    ds, sampler = build_pretrain_data(cfg, batch_size=64)
    assert len(ds) == 2747 and sampler.epoch_size == 2688
    batch = next(iter(DataLoader(ds, batch_size=64, sampler=sampler)))
    sar = batch["sar"]
    assert sar.shape == (64, 1, 128, 128) and sar.min() >= 0 and sar.max() <= 1
    assert 0.03 < sar.mean() < 0.3 and not batch["paired"].any()  # dark clutter, bright targets


def test_opensarship_float_chips(shared_data):
    root = shared_data / "opensarship"
    ds = ChipFolderDataset(root, DataConfig(img_size=64, in_chans=1))
    assert len(ds) == 299 and {n: len(p) for n, p in ds.channel_groups.items()} == {1: 180, 2: 119}
    x = torch.stack([ds[i]["sar"] for i in range(0, 299, 7)])
    assert x.shape[1:] == (1, 64, 64) and 0 <= x.min() and x.max() <= 1 and 0.2 < x.mean() < 0.6
    with pytest.raises(DataError, match=r"1 band\(s\): 180 file\(s\).*2 band\(s\): 119 file\(s\)"):
        ChipFolderDataset(root, DataConfig(img_size=64, in_chans=2))
    dual = ChipFolderDataset(str(root / "*GRDH_1SDV*"), DataConfig(img_size=64, in_chans=2))
    pols = torch.stack([dual[i]["sar"].mean((1, 2)) for i in range(0, len(dual), 10)])
    assert (pols[:, 0] > pols[:, 1]).all()  # stored VH, VV: reordered co-pol first


def test_hrsid_gray_rgb_crops(shared_data):
    with pytest.raises(DataError, match="instance_color_RGB.png"):  # the colour masks are not SAR
        ChipFolderDataset(shared_data / "hrsid", DataConfig(img_size=224))
    ds = ChipFolderDataset(str(shared_data / "hrsid" / "P*[0-9].png"), DataConfig(img_size=224, resize="crop"))
    assert len(ds) == 4 and all(c.gray for c in ds.chips)
    a = ds[(0, 0)]["sar"]
    assert a.shape == (1, 224, 224) and not torch.equal(a, ds[(1, 0)]["sar"])


def test_opera_linear_power_windows(shared_data):
    files = str(shared_data / "opera_rtc_s1" / "one_burst_all_dates" / "*_VV.tif")
    ds = RasterWindowDataset([files], DataConfig(img_size=64, windows_per_raster=2))
    assert len(ds.rasters) == 21 and {r.units for r in ds.rasters} == {"linear_power"}
    x = torch.stack([ds[(0, i)]["sar"] for i in range(0, len(ds), 3)])
    assert x.shape[1:] == (1, 64, 64) and 0 <= x.min() and x.max() <= 1 and 0.25 < x.mean() < 0.6
    padded = RasterWindowDataset([files], DataConfig(img_size=128, windows_per_raster=1))[0]["sar"]
    assert (padded[:, 100:] == 0).all() and (padded[:, :100, :100] > 0).float().mean() > 0.99


def test_pyrosar_db_windows_skip_nodata(shared_data):
    path = next((shared_data / "pyrosar").glob("*.tif"))
    ds = RasterWindowDataset([path], DataConfig(img_size=128, windows_per_raster=8, max_nodata=0.05))
    assert ds.rasters[0].units == "db"
    for i in range(8):
        assert (ds[(0, i)]["sar"] == 0).float().mean() <= 0.05


def test_sen1floods11_pair(shared_data, tmp_path):
    d = shared_data / "sen1floods11"
    index = {"paired": [{"sar": str(d / "Spain_7370579_S1Hand.tif"), "optical": str(d / "Spain_7370579_S2Hand.tif")}]}
    (tmp_path / "pairs.json").write_text(json.dumps(index))
    ds = PairedChipDataset(load_pair_index(tmp_path / "pairs.json").paired, DataConfig(img_size=128, in_chans=2))
    assert ds.pairs[0][2] == (4, 3, 2)
    item = ds[0]
    assert item["sar"].shape == (2, 128, 128) and item["sar"][0].mean() > item["sar"][1].mean()  # VV, VH
    assert item["optical"].shape == (3, 128, 128) and -2.2 < item["optical"].min() and item["optical"].max() < 2.7
