"""The int8 CPU path: ``sarmae export --precision int8`` (quantisation, quality gate recorded in model.json,
sha256), ``sarmae infer --precision int8|auto`` and every bad input's message. Tiny real models
(depth-2 ViT-Tiny, 32 px), real onnxruntime quantisation, real rasters written here."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from helpers.rasters import speckle, write_raster

from engine.backends import OnnxBackend
from engine.cli import main
from engine.errors import PackageError, RasterInputError, SarmaeError
from engine.inference import InferenceOptions, run_inference
from engine.package import load_package, read_card
from engine.precision import INT8_CPU_FLAGS, cpu_flags, int8_cpu_flag, resolve_precision
from engine.quantize import QuantizationGateError, calibration_windows, make_int8
from engine.radiometry import Radiometry
from engine.reader import SarRaster
from engine.tasks import get_task
from engine.tasks.segment import SegmentTask
from engine.tiling import Window

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def db_raster(path: Path, height: int = 64, width: int = 96, bands: int = 2, seed: int = 0) -> Path:
    return write_raster(path, 10 * np.log10(speckle((bands, height, width), seed=seed)),
                        descriptions=["VV", "VH"][:bands])


def export(*args: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about shape-dependent branches
        return main(["export", *map(str, args)])


@pytest.fixture(scope="module")
def int8_pkg(tiny_package, tmp_path_factory):
    """Factory: a copy of ``tiny_package(task)`` with model.onnx and model.int8.onnx (forced through
    the gate: a random model's class scores are near ties), calibrated on a raster written here."""
    made: dict[str, tuple[Path, Path]] = {}

    def make(task: str) -> tuple[Path, Path]:
        if task not in made:
            d = tmp_path_factory.mktemp(f"int8_{task}")
            pkg = shutil.copytree(tiny_package(task), d / "model")
            calib = db_raster(d / "calib.tif")
            assert export(pkg, "--precision", "int8", "--calibration", calib, "--force") == 0
            made[task] = pkg, calib
        return made[task]

    return make


def onnx_outputs(model, task: str, x: np.ndarray) -> np.ndarray:
    return OnnxBackend(model, task, "cpu", threads=1).run(x)


# ------------------------------------------------------------------------------ export and gate
@pytest.mark.parametrize("task", ["segment", "classify", "embed"])
def test_export_records_gate_and_hashes(int8_pkg, task):
    pkg, calib = int8_pkg(task)
    card = read_card(pkg)
    rec = card.onnx["int8"]
    assert rec["file"] == "model.int8.onnx" and rec["method"] == "dynamic" and "onnxruntime" in rec["quantizer"]
    assert card.onnx["fp32"]["file"] == "model.onnx"
    import hashlib

    for prec, name in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        assert card.onnx[prec]["sha256"] == hashlib.sha256((pkg / name).read_bytes()).hexdigest()
    gate = rec["gate"]
    t = get_task(task)
    assert gate["metric"] == t.agreement_metric and gate["threshold"] == t.agreement_threshold
    assert gate["calibration"] == "calib.tif" and gate["forced"] == (gate["value"] < gate["threshold"])
    # the recorded figure is the task's agreement of the two files on the calibration windows
    x, valid = calibration_windows(card, calib, 32)
    assert gate["windows"] == len(x) == 6  # 64 x 96 px in windows of 32 px
    value = t.agreement(onnx_outputs(pkg / "model.onnx", task, x), onnx_outputs(pkg / "model.int8.onnx", task, x), valid)
    assert gate["value"] == pytest.approx(value, abs=1e-6)
    assert 0.5 < value <= 1.0
    # the int8 file is really quantised: smaller, with integer weights
    assert (pkg / "model.int8.onnx").stat().st_size < 0.6 * (pkg / "model.onnx").stat().st_size


def test_gate_refuses_below_threshold_and_writes_nothing(tiny_package, tmp_path, monkeypatch, capsys):
    pkg = shutil.copytree(tiny_package("segment"), tmp_path / "model")
    before = (pkg / "model.json").read_text()
    calib = db_raster(tmp_path / "calib.tif")
    monkeypatch.setattr(SegmentTask, "agreement_threshold", 1.01)  # no model reaches it
    assert export(pkg, "--precision", "int8", "--calibration", calib) == 2
    err = capsys.readouterr().err
    assert str(pkg) in err and "pixel label agreement with the fp32 model is" in err and "below the gate of 1.01" in err
    assert "--force" in err and "nothing was written" in err
    assert not (pkg / "model.int8.onnx").exists() and (pkg / "model.json").read_text() == before
    with pytest.raises(QuantizationGateError, match=r"is 0\.\d{4} on 6 calibration window"):
        make_int8(pkg, read_card(pkg), _fp32_bytes(tmp_path, pkg), calib, log=lambda m: None)


def _fp32_bytes(tmp_path: Path, pkg: Path) -> bytes:
    out = tmp_path / "with_onnx"
    assert export(pkg, "--output", out) == 0
    return (out / "model.onnx").read_bytes()


def test_export_int8_reuses_model_onnx_and_fp32_export_keeps_int8(int8_pkg, tmp_path, capsys):
    pkg = shutil.copytree(int8_pkg("embed")[0], tmp_path / "model")
    int8_before = (pkg / "model.int8.onnx").read_bytes()
    assert export(pkg) == 0  # fp32 again: same weights, the int8 model and its record stay
    assert (pkg / "model.int8.onnx").read_bytes() == int8_before and "int8" in read_card(pkg).onnx
    onnx_before = (pkg / "model.onnx").read_bytes()
    assert export(pkg, "--precision", "int8") == 0  # no calibration raster: random windows, said so
    out = capsys.readouterr()
    assert "random windows" in out.err and read_card(pkg).onnx["int8"]["gate"]["calibration"].startswith("random")
    assert (pkg / "model.onnx").read_bytes() == onnx_before  # reused, not exported again


# ------------------------------------------------------------------------------ infer
def test_infer_int8_equals_the_int8_session(int8_pkg, tmp_path):
    pkg, _ = int8_pkg("segment")
    src = db_raster(tmp_path / "scene.tif", 64, 64, seed=3)
    opts = InferenceOptions(precision="int8", overlap=0.0, batch_size=4, threads=1)
    res = run_inference([str(src)], tmp_path / "out8.tif", pkg, opts)
    assert "int8 model" in res.provenance["backend"] and res.provenance["options"]["precision"] == "int8"
    assert any("precision int8 (asked for)" in m for m in res.log)
    # the same windows through the int8 session directly: argmax of its logits is the class raster
    card = read_card(pkg)
    with SarRaster.open([str(src)]) as r:
        rad = Radiometry.for_raster(card.input, r)
        wins = [Window(i, j, 32, 32) for i in (0, 32) for j in (0, 32)]
        x = np.stack([rad.apply(*r.read(w)) for w in wins])
    y = onnx_outputs(pkg / "model.int8.onnx", "segment", x).argmax(1)
    expect = np.zeros((64, 64), np.uint8)
    for w, lab in zip(wins, y, strict=True):
        expect[w.row_off:w.row_off + 32, w.col_off:w.col_off + 32] = lab
    with rasterio.open(res.outputs["class"]) as ds:
        np.testing.assert_array_equal(ds.read(1), expect)


def test_infer_cli_precision_flag_and_bad_combinations(int8_pkg, tiny_package, tmp_path, capsys):
    pkg, calib = int8_pkg("classify")
    rc = main(["infer", "-m", str(pkg), "-i", str(calib), "-o", str(tmp_path / "c.gpkg"), "--precision", "int8",
               "--threads", "1", "--quiet", "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "int8 model" in json.loads(out)["provenance"]["backend"]
    # int8 through torch: refused, naming the package and what to use instead
    rc = main(["infer", "-m", str(pkg), "-i", str(calib), "-o", str(tmp_path / "t.gpkg"), "--precision", "int8",
               "--backend", "torch", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(pkg) in err and "--backend onnxruntime" in err
    # no int8 model in the package: say how to make one
    plain = tiny_package("classify")
    rc = main(["infer", "-m", str(plain), "-i", str(calib), "-o", str(tmp_path / "n.gpkg"), "--precision", "int8",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(plain) in err and "no model.int8.onnx" in err
    assert f"sarmae export {plain} --precision int8 --calibration RASTER" in err


def test_worker_option_precision():
    assert InferenceOptions.from_dict({"precision": "int8"}).precision == "int8"
    assert InferenceOptions().precision == "auto"
    with pytest.raises(SarmaeError, match="unknown inference options"):
        InferenceOptions.from_dict({"int8": True})


# ------------------------------------------------------------------------------ auto
def test_auto_choice_from_cpu_flags(int8_pkg, tiny_package):
    with_int8 = load_package(int8_pkg("segment")[0], lazy=True)
    without = load_package(tiny_package("segment"), lazy=True)
    for flag in INT8_CPU_FLAGS:
        prec, why = resolve_precision("auto", with_int8, "cpu", flags={"sse4_2", "avx2", flag})
        assert prec == "int8" and flag in why
    assert resolve_precision("auto", with_int8, "cpu", flags={"avx512_vnni", "amx_int8"})[1].endswith("amx_int8")
    prec, why = resolve_precision("auto", with_int8, "cpu", flags={"avx2", "fma"})
    assert prec == "fp32" and "no int8 dot-product instructions" in why
    assert resolve_precision("auto", without, "cpu", flags={"avx512_vnni"}) == ("fp32", "the package has no int8 model")
    assert resolve_precision("auto", with_int8, "cuda", flags={"avx512_vnni"})[0] == "fp32"
    assert resolve_precision("fp32", with_int8, "cpu", flags={"avx512_vnni"})[0] == "fp32"
    assert resolve_precision("int8", with_int8, "cpu", flags=set())[0] == "int8"
    with pytest.raises(SarmaeError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", with_int8, "cpu")


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n"
                   "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU implementer\t: 0x41\n")
    assert int8_cpu_flag(cpu_flags(x86)) == "avx512_vnni"
    assert int8_cpu_flag(cpu_flags(arm)) == "i8mm"
    assert cpu_flags(tmp_path / "missing") == set() and int8_cpu_flag(set()) is None


# ------------------------------------------------------------------------------ bad input, integrity
def test_calibration_raster_must_fit_the_model(tiny_package, tmp_path, capsys):
    pkg = shutil.copytree(tiny_package("segment"), tmp_path / "model")
    one_band = db_raster(tmp_path / "vv.tif", bands=1)
    assert export(pkg, "--precision", "int8", "--calibration", one_band) == 2
    err = capsys.readouterr().err
    assert str(pkg) in err and "calibration raster does not fit" in err and "VV+VH" in err
    uint8 = write_raster(tmp_path / "display.tif", np.full((2, 64, 64), 120, np.uint8), descriptions=["VV", "VH"])
    with pytest.raises(RasterInputError, match="calibration raster does not fit"):
        calibration_windows(read_card(pkg), uint8, 4, pkg)
    empty = write_raster(tmp_path / "nodata.tif", np.full((2, 64, 64), np.nan, np.float32), descriptions=["VV", "VH"])
    with pytest.raises(RasterInputError, match="no window of 32 px with at least 50% valid"):
        calibration_windows(read_card(pkg), empty, 4, pkg, input_units="db")
    assert not (pkg / "model.int8.onnx").exists()


def test_int8_file_checked_against_model_json(int8_pkg, tmp_path, capsys):
    pkg = shutil.copytree(int8_pkg("segment")[0], tmp_path / "model")
    assert main(["info", str(pkg), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "model.onnx:" in out and "model.int8.onnx: sha256 verified" in out and "pixel label agreement" in out
    blob = bytearray((pkg / "model.int8.onnx").read_bytes())
    blob[-10] ^= 0xFF
    (pkg / "model.int8.onnx").write_bytes(bytes(blob))
    assert main(["info", str(pkg), "--verify"]) == 2
    assert "model.int8.onnx does not match model.json" in capsys.readouterr().err
    with pytest.raises(PackageError, match=r"model\.int8\.onnx does not match model\.json.*--precision int8"):
        run_inference([str(db_raster(tmp_path / "s.tif"))], tmp_path / "o.tif", pkg, InferenceOptions(precision="int8"))
    # an int8 file the card does not record (copied in by hand): refused, it passed no gate
    card = json.loads((pkg / "model.json").read_text())
    del card["onnx"]["int8"]
    (pkg / "model.json").write_text(json.dumps(card))
    with pytest.raises(PackageError, match="not recorded in model.json"):
        load_package(pkg, lazy=True).onnx_model("int8")


def test_card_onnx_record_validated(tiny_package, tmp_path):
    pkg = shutil.copytree(tiny_package("segment"), tmp_path / "model")
    card = json.loads((pkg / "model.json").read_text())
    card["onnx"] = {"int8": {"file": "model.int8.onnx", "sha256": "abc"}, "fp16": {}}
    (pkg / "model.json").write_text(json.dumps(card))
    with pytest.raises(PackageError, match=r"'onnx\.int8' must hold 'file' and a 64-character.*'onnx\.fp16': unknown"):
        read_card(pkg)


def test_every_entry_point_builds_the_backend_of_the_asked_precision(int8_pkg, tmp_path):
    """The worker's cache and a torchrun rank build their backend with engine.backends.make_backend,
    as run_inference does: an int8 request gets the int8 model there too (torchrun once ran fp32)."""
    from engine.backends import make_backend
    from engine.package import load_package
    from engine.serve import ModelCache
    from engine.tasks import task_for

    pkg_path, _ = int8_pkg("segment")
    cache = ModelCache(2)
    entry, _ = cache.package(str(pkg_path))
    size = entry.package.card.input_size[0]
    fp32, _ = cache.backend(entry, InferenceOptions(precision="fp32", backend="onnxruntime", device="cpu"), size, print)
    int8, hit = cache.backend(entry, InferenceOptions(precision="int8", device="cpu"), size, print)
    assert not hit and int8 is not fp32 and "int8" in int8.describe() and "int8" not in fp32.describe()
    pkg = load_package(pkg_path, lazy=True)
    direct = make_backend(task_for(pkg.card), pkg, InferenceOptions(precision="int8", device="cpu"), size, print)
    assert "int8" in direct.describe()
