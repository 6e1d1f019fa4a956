"""Paired index: layouts, relative paths, missing files; optical bands, scaling and alignment."""

import json

import numpy as np
import pytest
import torch
from chipgen import gray8, write_image

from training.data import DataConfig, DataError
from training.data.pairs import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PairedChipDataset,
    load_pair_index,
    optical_bands,
)


def s2_stack(size=16, red=3000, green=2000, blue=1000):
    """13 int16 bands in Sentinel-2 L1C order (B1, B2, B3, B4, ...), reflectance x 10000."""
    x = np.full((13, size, size), 500, np.int16)
    x[1], x[2], x[3] = blue, green, red
    return x


def test_index_layouts_and_relative_paths(tmp_path):
    write_image(tmp_path / "sar" / "a.png", gray8(16))
    write_image(tmp_path / "opt" / "a.tif", s2_stack())
    write_image(tmp_path / "sar" / "b.png", gray8(16, seed=1))
    doc = {"paired": [{"sar": "sar/a.png", "optical": "opt/a.tif"}], "unpaired": ["sar/b.png"]}
    (tmp_path / "index.json").write_text(json.dumps(doc))
    index = load_pair_index(tmp_path / "index.json")
    assert index.paired == [(str(tmp_path / "sar/a.png"), str(tmp_path / "opt/a.tif"))]
    assert index.unpaired == [str(tmp_path / "sar/b.png")]
    (tmp_path / "list.json").write_text(json.dumps(doc["paired"]))
    assert load_pair_index(tmp_path / "list.json").paired == index.paired


def test_missing_files_are_listed_before_training(tmp_path):
    write_image(tmp_path / "a.png", gray8(16))
    doc = {"paired": [{"sar": "a.png", "optical": f"missing_{i}.tif"} for i in range(7)]}
    (tmp_path / "index.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"lists 7 missing file\(s\): .*missing_0.tif, .*missing_4.tif, \.\.\."):
        load_pair_index(tmp_path / "index.json")


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"),
    ('{"paired": [{"sar": "a.png"}]}', "must have 'sar' and 'optical'"),
    ('{"pairs": []}', "expected"),
])
def test_malformed_index(tmp_path, text, words):
    (tmp_path / "index.json").write_text(text)
    with pytest.raises(DataError, match=words):
        load_pair_index(tmp_path / "index.json")


def test_optical_band_choice(tmp_path):
    assert optical_bands(str(write_image(tmp_path / "s2.tif", s2_stack()))) == (4, 3, 2)
    named = write_image(tmp_path / "named.tif", s2_stack()[[3, 2, 1, 7]], descriptions=["B4", "B3", "B2", "B8"])
    assert optical_bands(str(named)) == (1, 2, 3)
    assert optical_bands(str(write_image(tmp_path / "rgb.png", gray8(8, channels=3)))) == (1, 2, 3)
    assert optical_bands(str(write_image(tmp_path / "g.png", gray8(8)))) == (1, 1, 1)
    with pytest.raises(DataError, match="has 6 bands"):
        optical_bands(str(write_image(tmp_path / "six.tif", np.zeros((6, 8, 8), np.uint8))))


def test_paired_items_scaled_normalised_and_aligned(tmp_path):
    ramp = np.tile(np.linspace(10, 250, 48).astype(np.uint8), (48, 1))  # brightness grows to the right
    sar = write_image(tmp_path / "sar.png", ramp)
    s2 = s2_stack(size=24)
    s2[3] = np.tile(np.linspace(0, 10000, 24).astype(np.int16), (24, 1))  # red ramp at half the resolution
    opt = write_image(tmp_path / "opt.tif", s2)
    ds = PairedChipDataset([(str(sar), str(opt))], DataConfig(img_size=32, resize="crop"))
    item = ds[(0, 0)]
    assert item["paired"] and item["sar"].shape == (1, 32, 32) and item["optical"].shape == (3, 32, 32)
    green = item["optical"][1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]
    assert torch.allclose(green, torch.tensor(0.2), atol=1e-4)  # 2000 / 10000
    red = item["optical"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    corr = np.corrcoef(item["sar"][0].flatten().numpy(), red.flatten().numpy())[0, 1]
    assert corr > 0.99  # the same crop box on both sides
    assert not torch.equal(item["sar"], ds[(1, 0)]["sar"])  # another epoch, another crop


def test_unreadable_optical_skips_the_pair(tmp_path):
    pairs = []
    for i in range(30):
        s = write_image(tmp_path / f"s{i}.png", gray8(16, seed=i))
        o = write_image(tmp_path / f"o{i}.png", gray8(16, seed=i, channels=3))
        pairs.append((str(s), str(o)))
    (tmp_path / "o0.png").write_text("broken")
    ds = PairedChipDataset(pairs, DataConfig(img_size=16))
    assert len(ds) == 29 and all(o != str(tmp_path / "o0.png") for _, o, _ in ds.pairs)
