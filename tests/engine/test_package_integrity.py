"""Issue 15, item 2: every file a package uses is covered by model.json and checked.

A model.onnx from another model (in a package whose card does not cover it: an older export), a
garbage model.onnx, or one whose inputs / opset do not match the card is refused by ``sarmae info
--verify`` and by ``--backend onnxruntime`` with a sentence; ``--backend auto`` warns and runs the
package's own weights with torch. Other files (vocabularies, curves) are hashed into ``files``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
from helpers.rasters import speckle, write_raster

from engine.cli import main
from engine.errors import PackageError
from engine.package import load_package, load_state_dict, read_card, save_package, verify_package


@pytest.fixture(scope="module")
def exported(tiny_package, tmp_path_factory):
    made: dict[tuple, Path] = {}

    def make(task: str = "segment", in_chans: int = 2) -> Path:
        if (task, in_chans) not in made:
            pkg = shutil.copytree(tiny_package(task, in_chans=in_chans),
                                  tmp_path_factory.mktemp(f"onnx_{task}") / "model")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert main(["export", str(pkg)]) == 0
            made[(task, in_chans)] = pkg
        return made[(task, in_chans)]

    return make


def old_package(src: Path, dest: Path, onnx_bytes: bytes) -> Path:
    """A copy of ``src`` whose model.json does not cover its model.onnx (as an older export wrote it)."""
    pkg = shutil.copytree(src, dest)
    card = json.loads((pkg / "model.json").read_text())
    card.pop("onnx", None)
    (pkg / "model.json").write_text(json.dumps(card))
    (pkg / "model.onnx").write_bytes(onnx_bytes)
    return pkg


@pytest.fixture
def raster(tmp_path) -> Path:
    return write_raster(tmp_path / "in.tif", 10 * np.log10(speckle((2, 48, 48))), descriptions=["VV", "VH"])


def infer(pkg: Path, raster: Path, out: Path, backend: str, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["infer", "-m", str(pkg), "-i", str(raster), "-o", str(out), "--backend", backend, "--device", "cpu",
               "--threads", "1", "--precision", "fp32", *extra])
    return rc, capsys.readouterr().err


def test_export_records_the_opset_and_an_old_package_still_runs_not_covered(exported, tmp_path, raster, capsys):
    pkg = exported()
    assert read_card(pkg).onnx["fp32"]["opset"] == 17
    old = old_package(pkg, tmp_path / "old", (pkg / "model.onnx").read_bytes())
    assert main(["info", str(old), "--verify"]) == 0
    assert "model.onnx:      not covered by model.json" in capsys.readouterr().out
    rc, err = infer(old, raster, tmp_path / "a.tif", "onnxruntime", capsys)
    assert rc == 0, err


def test_another_models_onnx_is_refused_and_auto_falls_back_to_torch(exported, tmp_path, raster, capsys, tiny_package):
    pkg = exported()
    other = exported("segment", in_chans=1)  # a valid model.onnx of another segment model
    old = old_package(pkg, tmp_path / "old", (other / "model.onnx").read_bytes())
    assert main(["info", str(old), "--verify"]) == 2
    assert "exported from other weights" in capsys.readouterr().err
    rc, err = infer(old, raster, tmp_path / "a.tif", "onnxruntime", capsys)
    assert rc == 2 and "exported from other weights" in err and "Traceback" not in err
    assert not (tmp_path / "a.tif").exists()
    rc, err = infer(old, raster, tmp_path / "b.tif", "auto", capsys)
    assert rc == 0 and "warning:" in err and "falls back to torch" in err
    rc, err = infer(pkg, raster, tmp_path / "c.tif", "torch", capsys)
    with rasterio.open(tmp_path / "b.tif") as b, rasterio.open(tmp_path / "c.tif") as c:
        np.testing.assert_array_equal(b.read(), c.read())  # the package's own weights, not the other model


@pytest.mark.parametrize("covered", [True, False])
def test_garbage_onnx_refused_by_verify_and_onnxruntime_auto_runs_torch(exported, tmp_path, raster, capsys, covered):
    pkg = exported()
    garbage = np.random.default_rng(1).bytes(4096)
    if covered:  # a package rewritten with a garbage model.onnx whose hash the card records
        card, sd = load_state_dict(pkg)
        bad = tmp_path / "bad"
        with pytest.raises(PackageError, match="not a valid ONNX model"):
            save_package(sd, card, bad, onnx_bytes=garbage)
        bad = shutil.copytree(pkg, bad)
        (bad / "model.onnx").write_bytes(garbage)
        expect = "does not match model.json"
    else:
        bad = old_package(pkg, tmp_path / "bad", garbage)
        expect = "not a valid ONNX model"
    assert main(["info", str(bad), "--verify"]) == 2
    assert expect in capsys.readouterr().err
    rc, err = infer(bad, raster, tmp_path / "a.tif", "onnxruntime", capsys)
    assert rc == 2 and expect in err and "Traceback" not in err
    rc, err = infer(bad, raster, tmp_path / "b.tif", "auto", capsys, "--quiet")  # --quiet keeps warnings
    assert rc == 0 and "falls back to torch" in err


def test_signature_and_opset_are_checked_against_the_card(exported, tmp_path, raster, capsys):
    pkg = exported()
    other = exported("segment", in_chans=1)
    proto = onnx.load(str(other / "model.onnx"))
    del proto.metadata_props[:]  # no sarmae metadata: only the signature can tell
    old = old_package(pkg, tmp_path / "old", proto.SerializeToString())
    rc, err = infer(old, raster, tmp_path / "a.tif", "onnxruntime", capsys)
    assert rc == 2 and "input has 1 channels but model.json says 2" in err
    opset = shutil.copytree(pkg, tmp_path / "opset")
    card = json.loads((opset / "model.json").read_text())
    card["onnx"]["fp32"]["opset"] = 13
    (opset / "model.json").write_text(json.dumps(card))
    assert main(["info", str(opset), "--verify"]) == 2
    assert "opset 17 but model.json records opset 13" in capsys.readouterr().err


def test_other_files_are_hashed_and_checked(tiny_package, tmp_path, capsys):
    card, sd = load_state_dict(tiny_package("segment"))
    pkg = save_package(sd, card, tmp_path / "pkg", extra_files={"vocab/tokens.txt": b"water\nland\n"})
    card = read_card(pkg)
    assert set(card.files) == {"vocab/tokens.txt"}
    assert verify_package(pkg, card)["vocab/tokens.txt"] is True
    assert load_package(pkg, lazy=True).read_file("vocab/tokens.txt") == b"water\nland\n"
    (pkg / "vocab/tokens.txt").write_bytes(b"ship\n")
    with pytest.raises(PackageError, match="vocab/tokens.txt does not match model.json"):
        verify_package(pkg, card)
    with pytest.raises(PackageError, match="does not match model.json"):
        load_package(pkg, lazy=True).read_file("vocab/tokens.txt")
    (pkg / "notes.txt").write_text("added later")
    (pkg / "vocab/tokens.txt").write_bytes(b"water\nland\n")
    assert main(["info", str(pkg), "--verify"]) == 0
    assert "notes.txt:" in capsys.readouterr().out
