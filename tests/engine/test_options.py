"""Issue 15, item 5: bad options, cards and files get a sentence, never a traceback or a silent default.

Options are checked in one place (``engine.options``) for the CLI, ``run_inference`` and the worker;
model.json's sizes are checked against the weights' safetensors header before anything is built; a
truncated GeoTIFF, a container of subdatasets and a damaged checkpoint name the file and what to do.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers.rasters import speckle, write_raster

from engine.cli import main
from engine.errors import OptionError, PackageError, RasterInputError
from engine.inference import InferenceOptions, run_inference
from engine.options import check_options, check_window
from engine.package import load_package, read_card


@pytest.fixture
def raster(tmp_path):
    return write_raster(tmp_path / "in.tif", 10 * np.log10(speckle((2, 40, 40))), descriptions=["VV", "VH"])


@pytest.mark.parametrize("args, words", [
    (["--overlap", "1.5"], "--overlap 1.5: out of range"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--batch-size", "-1"], "--batch-size -1: must be at least 1"),
    (["--threads", "-3"], "--threads -3: must be at least 1"),
    (["--threads", "0"], "--threads 0: must be at least 1 (or left out: all cores"),
    (["--window", "0"], "--window 0: must be at least 32 (or left out: the model's input size)"),
    (["--window", "100000"], "--window 100000 with --batch-size 4 needs about"),
    (["--window", "40"], "--window 40: must be a multiple of the model's patch size 16"),
    (["--score-threshold", "5"], "--score-threshold 5.0: out of range: a box score between 0 and 1"),
    (["--nms-iou", "-1"], "--nms-iou -1.0: out of range"),
    (["--mask-ratio", "1"], "--mask-ratio 1.0: out of range"),
    (["--device", "gpu"], "--device 'gpu': must be auto, cpu, cuda, cuda:N or mps"),
])
def test_cli_refuses_bad_options_with_a_sentence(tiny_package, raster, tmp_path, capsys, args, words):
    out = tmp_path / "out.tif"
    assert main(["infer", "-m", str(tiny_package("segment")), "-i", str(raster), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_options_from_json_are_checked_for_type_and_range():
    assert InferenceOptions.from_dict({"batch_size": 8.0, "window": 64}).batch_size == 8  # JSON's 8.0 is 8
    for bad, words in (({"batch_size": "8"}, "--batch-size '8': must be a whole number"),
                       ({"overlap": True}, "--overlap True: must be a number"),
                       ({"vector": "yes"}, "--vector 'yes': must be true or false"),
                       ({"bands": []}, "--bands []"),
                       ({"extent": [0, 0, 0, 10]}, "--extent"),
                       ({"precision": "int4"}, "--precision 'int4': must be one of fp32, int8, auto")):
        with pytest.raises(OptionError, match=words.replace("[", r"\[").replace("]", r"\]")):
            InferenceOptions.from_dict(bad)
    with pytest.raises(OptionError, match="'options' must be an object"):
        InferenceOptions.from_dict([1])


def test_window_memory_is_estimated_against_what_is_available(tiny_package):
    card = read_card(tiny_package("segment"))
    opts = InferenceOptions(window=2048)
    check_options(opts)
    assert check_window(opts, card, 4000, available=64 << 30) == 2048
    with pytest.raises(OptionError, match=r"needs about .* GiB of memory, more than the 0.5 GiB available"):
        check_window(opts, card, 4000, available=1 << 29)


@pytest.mark.parametrize("mutate, words", [
    (lambda e: e.update(img_size=1_000_000), "img_size 1000000 must be a multiple of the patch size 16 between"),
    (lambda e: e.update(img_size=64), "the weights' position table is for 4 patches"),
    (lambda e: e.update(depth=5), "depth is 5 but the weights hold 2 blocks"),
    (lambda e: e.update(embed_dim=96), "embed_dim is 96 but the weights have 192"),
])
def test_card_sizes_are_checked_against_the_weights_before_building(tiny_package, tmp_path, mutate, words):
    pkg = shutil.copytree(tiny_package("segment"), tmp_path / "pkg")
    card = json.loads((pkg / "model.json").read_text())
    mutate(card["architecture"]["encoder"])
    (pkg / "model.json").write_text(json.dumps(card))
    with pytest.raises(PackageError, match="model.json does not describe the weights: .*" + words):
        load_package(pkg, lazy=True)


def test_card_in_chans_against_the_weights(tiny_package, tmp_path, raster, capsys):
    pkg = shutil.copytree(tiny_package("segment"), tmp_path / "pkg")
    card = json.loads((pkg / "model.json").read_text())
    card["architecture"]["encoder"]["in_chans"] = 1
    card["input"].update(bands=["VV"], mean=[0.5], std=[0.5])
    (pkg / "model.json").write_text(json.dumps(card))
    assert main(["infer", "-m", str(pkg), "-i", str(raster), "-o", str(tmp_path / "o.tif"), "--bands", "VV"]) == 2
    assert "in_chans is 1 but the weights have 2" in capsys.readouterr().err


def test_truncated_geotiff_names_the_file(tiny_package, tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    src = tmp_path / "big.tif"
    data = (np.random.default_rng(0).random((2, 256, 256)) * -20).astype("float32")
    with rasterio.open(src, "w", driver="GTiff", width=256, height=256, count=2, dtype="float32", tiled=True,
                       blockxsize=64, blockysize=64, crs="EPSG:32631", transform=from_origin(5e5, 4.6e6, 10, 10)) as d:
        d.write(data)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(RasterInputError, match=r"cut\.tif: reading rows .* failed .* truncated or damaged"):
        run_inference([str(cut)], tmp_path / "o.tif", tiny_package("segment"),
                      InferenceOptions(backend="torch", device="cpu", threads=1, input_units="db"))
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob(".o*"))


def test_a_container_lists_its_subdatasets(tiny_package, tmp_path, capsys):
    from scipy.io import netcdf_file

    nc = tmp_path / "scene.nc"
    f = netcdf_file(str(nc), "w")
    f.createDimension("y", 40)
    f.createDimension("x", 40)
    for name in ("VV", "VH"):
        f.createVariable(name, "f4", ("y", "x"))[:] = np.random.default_rng(0).random((40, 40)).astype("f4")
    f.close()
    assert main(["infer", "-m", str(tiny_package("segment")), "-i", str(nc), "-o", str(tmp_path / "o.tif")]) == 2
    err = capsys.readouterr().err
    assert "is a container of 2 raster(s) (subdatasets)" in err and f"netcdf:{nc}:VH" in err
    rc = main(["infer", "-m", str(tiny_package("segment")), "-i", f"netcdf:{nc}:VV", "-i", f"netcdf:{nc}:VH",
               "-o", str(tmp_path / "o.tif"), "--input-units", "linear_power", "--quiet"])  # its subdatasets run
    assert rc == 0, capsys.readouterr().err


def test_convert_an_empty_checkpoint_says_so(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04garbage")
    assert main(["convert", str(tmp_path / "empty.pth"), "-o", str(tmp_path / "p")]) == 2
    assert "empty.pth is empty (0 bytes)" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "cut.pth"), "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "not a readable PyTorch checkpoint (" in err and "()" not in err


def test_system_errors_on_bad_input_are_sentences_not_internal():
    import errno

    from engine import protocol as P
    from engine.errors import describe_system_error

    cases = [(FileNotFoundError(errno.ENOENT, "No such file", "/d/a.tif"), "/d/a.tif: no such file"),
             (PermissionError(errno.EACCES, "Permission denied", "/d/o.tif"), "/d/o.tif: permission denied"),
             (OSError(errno.ENOSPC, "No space left on device", "/d/o.tif"), "disk full while writing /d/o.tif"),
             (MemoryError(), "out of memory"), (IsADirectoryError(errno.EISDIR, "Is a directory", "/d"), "/d is a folder")]
    for exc, words in cases:
        event = P.error_from_exception("r1", exc)
        assert event["error"]["code"] == "failed" and "traceback" not in event["error"], event
        assert words in event["error"]["message"] and words in describe_system_error(exc)
    bug = P.error_from_exception("r2", ZeroDivisionError("boom"))
    assert bug["error"]["code"] == "internal" and "traceback" in bug["error"]  # a real bug keeps its traceback
    assert describe_system_error(KeyError("x")) is None


def test_cli_turns_a_system_error_into_a_sentence(monkeypatch, capsys, tiny_package):
    import errno

    import engine.cli as cli

    def full_disk(a):
        raise OSError(errno.ENOSPC, "No space left on device", "/mnt/full/out.tif")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["info"].set_defaults(func=full_disk)
    assert cli.main(["info", str(tiny_package("segment"))]) == 2
    err = capsys.readouterr().err
    assert "sarmae info: error: disk full while writing /mnt/full/out.tif" in err and "Traceback" not in err
