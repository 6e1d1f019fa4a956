"""The fine-tuning front ends: ``sarmae finetune`` / ``sarmae evaluate`` (training/cli.py, through
the engine's ``main``) and the worker's ``finetune`` run task (training/worker_tasks.py): data
options, progress with ETA, clear errors."""

from __future__ import annotations

import json

import pytest
from ftdata import build_encoder, class_polygons, water_land, write_labels

from engine.cli import main
from engine.errors import CancelledError, SarmaeError
from training import worker_tasks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    enc = build_encoder(d / "enc", img_size=32)
    tif, truth = water_land(d / "wl.tif")
    gpkg = write_labels(d / "wl.gpkg", class_polygons(truth, {0: "water", 1: "land"}))
    return d, str(enc), str(tif), str(gpkg)


def test_finetune_classify_from_polygons_then_evaluate(tmp_path, data, capsys):
    _, enc, tif, gpkg = data
    out = tmp_path / "wl.pkg"
    rc = main(["finetune", "--task", "classify", "--encoder", enc, "--output", str(out), "--raster", tif,
               "--labels", gpkg, "--class-field", "class", "--bands", "VV,VH", "--input-units", "db",
               "--max-chips", "60", "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--export-onnx",
               "--mode", "full"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "epoch 2/2: loss" in cap.err and "ETA" in cap.err  # progress with ETA on stderr
    r = json.loads(cap.out)
    assert r["classes"] == ["land", "water"] and r["train_chips"] + r["val_chips"] <= 60
    assert (out / "model.onnx").exists()
    card = json.loads((out / "model.json").read_text())
    assert card["provenance"]["config"]["bands"] == ["VV", "VH"] and card["provenance"]["config"]["max_chips"] == 60
    png = tmp_path / "cm.png"
    rc = main(["evaluate", str(out), "--raster", tif, "--labels", gpkg, "--class-field", "class", "--bands", "1,2",
               "--report", str(png)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    ev = json.loads(cap.out)
    assert ev["task"] == "classify" and 0.0 <= ev["accuracy"] <= 1.0 and png.exists()


@pytest.mark.parametrize("args, message", [
    (["--task", "classify", "--chips", "c", "--raster", "r.tif"], "one kind of training data"),
    (["--task", "segment", "--chips", "c"], "--chips (class folders) is for --task classify"),
    (["--task", "detect", "--raster", "{tif}", "--label-raster", "{tif}"], "detection learns boxes from polygons"),
    (["--task", "classify", "--raster", "{tif}", "--labels", "{gpkg}", "--class-field", "class",
      "--class-weights", "auto"], "--class-weights applies to segmentation"),
    (["--task", "detect", "--raster", "{tif}", "--labels", "{gpkg}", "--class-field", "class", "--export-onnx"],
     "ONNX export covers classify, embed, segment"),
    (["--task", "classify", "--raster", "{tif}", "--labels", "{gpkg}", "--class-field", "kind"],
     "no field 'kind' to read classes from; the layer has: class"),
    (["--task", "classify", "--raster", "{tif}", "--labels", "{gpkg}", "--class-field", "class", "--arch", "cnn"],
     "--arch cnn trains a small CNN from scratch and takes no --encoder"),
    (["--task", "classify", "--raster", "{tif}", "--labels", "{gpkg}", "--class-field", "class", "--arch", "vgg16",
      "--acquisition-jitter"], "--arch 'vgg16': use cnn (a small CNN trained from scratch, classify only)"),
])
def test_finetune_errors_are_clear(tmp_path, data, capsys, args, message):
    _, enc, tif, gpkg = data
    argv = ["finetune", "--encoder", enc, "--output", str(tmp_path / "m.pkg")]
    argv += [a.format(tif=tif, gpkg=gpkg) for a in args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_class_weights_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--task", "segment", "--output", str(tmp_path / "m"), "--class-weights", "1,x"])
    assert "one number per class" in capsys.readouterr().err


def test_worker_task_classify_from_polygons(tmp_path, data):
    _, enc, tif, gpkg = data
    messages = []
    params = {"kind": "classify", "output": str(tmp_path / "w.pkg"), "encoder": enc, "rasters": [tif],
              "labels": gpkg, "class_field": "class", "classes": ["water", "land"], "colours": ["#0000ff", "#00ff00"],
              "config": {"epochs": 2, "batch_size": 16, "max_chips": 40, "device": "cpu", "bands": ["VV", "VH"],
                         "mode": "full"}}
    r = worker_tasks.finetune(params, lambda f, m: messages.append((f, m)), lambda: False)
    assert "history" not in r and r["classes"] == ["water", "land"]
    assert [f for f, _ in messages] == [0.5, 1.0] and all("ETA" in m for _, m in messages)
    card = json.loads((tmp_path / "w.pkg" / "model.json").read_text())
    assert [c["colour"] for c in card["classes"]] == ["#0000ff", "#00ff00"]
    with pytest.raises(CancelledError):
        worker_tasks.finetune({**params, "output": str(tmp_path / "c.pkg")}, lambda f, m: None, lambda: True)
    assert not (tmp_path / "c.pkg").exists()
    with pytest.raises(SarmaeError, match="'rasters' with 'labels'.*or 'chips'"):
        worker_tasks.finetune({"kind": "classify", "output": "x"}, lambda f, m: None, lambda: False)
    with pytest.raises(ValueError, match="unknown fine-tuning options"):
        worker_tasks.finetune({**params, "config": {"bandz": [1]}}, lambda f, m: None, lambda: False)
