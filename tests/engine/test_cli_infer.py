"""``sarmae infer`` and ``sarmae export`` from the command line: help, exit codes and one-line errors,
torch vs onnxruntime after an export, and real SAR files (../shared/data) through tiny models.

Most commands run in-process (``engine.cli.main``); two run as a real subprocess to see exactly what
a user sees (exit code, stderr, no traceback).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from helpers.rasters import speckle, write_raster
from rasterio.merge import merge

from engine.cli import main
from engine.inference import InferenceOptions, run_inference
from engine.reader import npy_complex_to_geotiff

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # pixel-space files
INFER_FLAGS = ("--model", "--input", "--output", "--window", "--overlap", "--batch-size", "--device", "--backend",
               "--threads", "--bands", "--input-units", "--complex-mode", "--vector", "--min-area",
               "--probabilities", "--score-threshold", "--nms-iou", "--cog", "--overwrite", "--json", "--quiet")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def db_raster(path: Path, height: int = 40, width: int = 40) -> Path:
    return write_raster(path, 10 * np.log10(speckle((2, height, width))), descriptions=["VV", "VH"])


def infer(capsys, *args: str) -> tuple[int, dict | None, str]:
    """``sarmae infer --threads 1 --quiet --json ARGS`` in-process -> (exit code, result record, stderr)."""
    rc = main(["infer", "--threads", "1", "--quiet", "--json", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def sarmae(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("sarmae infer: error: "), err
    assert err.rstrip().endswith(lines[0])  # the last thing printed
    for w in words:
        assert w in lines[0], (w, lines[0])


# ------------------------------------------------------------------------------------ the CLI
def test_infer_help_lists_every_option():
    proc = sarmae("infer", "--help")
    assert proc.returncode == 0
    for flag in INFER_FLAGS:
        assert flag in proc.stdout, flag
    assert "window by window" in proc.stdout


def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, tiny_package):
    proc = sarmae("infer", "--model", tiny_package("segment"), "--input", tmp_path / "missing.tif",
                  "--output", tmp_path / "out.tif")
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line_error(proc.stderr, "missing.tif", "not found", "Check the path")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("case, words", [
    ("text file", ("notes.tif", "not a raster")),
    ("three bands", ("three.tif", "--bands")),
    ("output exists", ("out.tif already exists", "--overwrite")),
    ("output is input", ("in.tif", "would overwrite the input")),
    ("corrupt package", ("pkg", "do not match model.json")),
    ("no package", ("nothing", "model package not found")),
])
def test_bad_input_messages(tmp_path, capsys, tiny_package, case, words):
    src = db_raster(tmp_path / "in.tif")
    out = tmp_path / "out.tif"
    model = tiny_package("segment")
    if case == "text file":
        src = tmp_path / "notes.tif"
        src.write_text("not a raster")
    elif case == "three bands":
        src = write_raster(tmp_path / "three.tif", np.concatenate([speckle((3, 40, 40))]),
                           descriptions=["VV", "VH", "HH"])
    elif case == "output exists":
        out.write_text("keep")
    elif case == "output is input":
        out = src
    elif case == "corrupt package":
        model = shutil.copytree(model, tmp_path / "pkg")
        (model / "weights.safetensors").write_bytes(b"\0" * 64)
    else:
        model = tmp_path / "nothing"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    rc = main(["infer", "--threads", "1", "-m", str(model), "-i", str(src), "-o", str(out)])
    _, err = capsys.readouterr()
    assert rc == 2
    assert_one_line_error(err, *words)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_infer_prints_outputs_and_json(tmp_path, capsys, tiny_package):
    src = db_raster(tmp_path / "in.tif")
    rc = main(["infer", "--threads", "1", "-q", "-m", str(tiny_package("segment")), "-i", str(src),
               "-o", str(tmp_path / "out.tif")])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert f"class: {tmp_path / 'out.tif'}" in out and "confidence:" in out and "% of valid pixels" in out
    rc, rec, _ = infer(capsys, "-m", tiny_package("segment"), "-i", src, "-o", tmp_path / "out.tif", "--overwrite",
                       "--probabilities")
    assert rc == 0 and rec["task"] == "segment" and set(rec["outputs"]) == {"class", "confidence", "probabilities"}
    assert rec["provenance"]["options"]["overwrite"] is True and rec["timings"]["total_s"] > 0


# ------------------------------------------------------------------------- torch vs onnxruntime
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("task, role", [("segment", "confidence"), ("embed", "embedding")])
def test_torch_and_onnxruntime_agree_after_export(tmp_path, capsys, tiny_package, task, role):
    pkg = shutil.copytree(tiny_package(task), tmp_path / "pkg")
    assert main(["export", str(pkg)]) == 0
    assert "torch vs onnxruntime max abs diff" in capsys.readouterr().out
    assert (pkg / "model.onnx").is_file()
    src = db_raster(tmp_path / "in.tif", 70, 90)
    outs = {}
    for backend in ("torch", "onnxruntime"):
        rc, rec, err = infer(capsys, "-m", pkg, "-i", src, "-o", tmp_path / f"{backend}.tif", "--backend", backend)
        assert rc == 0, err
        assert rec["provenance"]["backend"].startswith(backend)
        outs[backend] = rec["outputs"][role]
    with rasterio.open(outs["torch"]) as a, rasterio.open(outs["onnxruntime"]) as b:
        assert (a.shape, a.count, a.dtypes, a.crs, a.transform) == (b.shape, b.count, b.dtypes, b.crs, b.transform)
        ta, tb = a.read(), b.read()
    if task == "segment":
        assert np.abs(ta - tb).max() <= 1e-4
    else:  # float16 on disk: at most one float16 step apart
        np.testing.assert_allclose(ta, tb, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_export_keeps_the_packages_other_files(tmp_path, capsys, tiny_package, suffix):
    """A fine-tuned package's curves and confusion matrix survive ``sarmae export`` (in place, and
    into a new package with --output)."""
    from engine.package import load_package, load_state_dict, read_card, save_package

    extra = {"training_curves.png": b"\x89PNG curves", "confusion_matrix.png": b"\x89PNG cm", "notes/data.txt": b"hi"}
    card, sd = load_state_dict(tiny_package("segment"))
    pkg = save_package(sd, card, tmp_path / f"pkg{suffix}", extra_files=extra)
    assert main(["export", str(pkg), "--output", str(tmp_path / f"new{suffix}")]) == 0
    assert "; kept confusion_matrix.png, notes/data.txt, training_curves.png" in capsys.readouterr().out
    assert main(["export", str(pkg)]) == 0
    for path in (pkg, tmp_path / f"new{suffix}"):
        loaded = load_package(path, lazy=True)
        assert loaded.has_onnx and read_card(path).name == card.name
        if suffix:
            import zipfile

            with zipfile.ZipFile(path) as z:
                got = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
        else:
            got = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
        assert {k: v for k, v in got.items() if k in extra} == extra
        assert set(got) == {*extra, "model.json", "weights.safetensors", "model.onnx"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


# ---------------------------------------------------------------------------------- real data
def assert_same_grid(out: str, src: Path) -> None:
    with rasterio.open(out) as o, rasterio.open(src) as s:
        assert o.shape == s.shape and o.crs == s.crs and o.transform.almost_equals(s.transform)


def check_segmentation(rec: dict, src: Path, invalid: np.ndarray | None = None) -> np.ndarray:
    """Class raster on the input's grid, 0/1 where data, 255 exactly where ``invalid``."""
    for role in ("class", "confidence"):
        assert_same_grid(rec["outputs"][role], src)
    with rasterio.open(rec["outputs"]["class"]) as o:
        cls = o.read(1)
    with rasterio.open(rec["outputs"]["confidence"]) as o:
        conf = o.read(1)
    nodata = cls == 255
    if invalid is not None:
        assert np.array_equal(nodata, invalid)
    assert set(np.unique(cls[~nodata])) <= {0, 1} and (~nodata).any()
    assert np.array_equal(np.isnan(conf), nodata) and (conf[~nodata] >= 0.5).all()
    return cls


@pytest.mark.slow
def test_pyrosar_grd_in_db(tmp_path, capsys, shared_data, tiny_package):
    src = shared_data / "pyrosar" / "S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"
    rc, rec, err = infer(capsys, "-m", tiny_package("segment", in_chans=1), "-i", src, "-o", tmp_path / "grd.tif")
    assert rc == 0, err
    units = next(m for m in rec["log"] if m.startswith("input units"))
    assert "dB" in units and "converted" not in units
    with rasterio.open(src) as s:
        check_segmentation(rec, src, invalid=s.read(1) == s.nodata)


@pytest.mark.slow
def test_sen1floods11_vv_vh_db(tmp_path, capsys, shared_data, tiny_package):
    src = shared_data / "sen1floods11" / "Spain_7370579_S1Hand.tif"
    rc, rec, err = infer(capsys, "-m", tiny_package("segment", img_size=64), "-i", src, "-o", tmp_path / "flood.tif")
    assert rc == 0, err
    assert "VV+VH" in rec["log"][0] and "dB" in next(m for m in rec["log"] if m.startswith("input units"))
    with rasterio.open(src) as s:
        check_segmentation(rec, src, invalid=~np.isfinite(s.read()).all(axis=0))
    assert rec["statistics"]["area_unit"] == "m2"  # EPSG:4326: areas on the sphere


def opera_mosaic(shared_data: Path, folder: Path, res: float = 150.0) -> list[Path]:
    """Mosaic the 15 OPERA footprints per polarisation (native 30 m would be 4428 x 3498 px, 99 %
    empty: 150 m keeps the test fast) into one single-band file per polarisation."""
    paths = []
    for pol in ("VV", "VH"):
        files = sorted((shared_data / "opera_rtc_s1" / "one_date_all_bursts").glob(f"*_{pol}.tif"))
        assert len(files) == 15
        arr, transform = merge(files, res=res, nodata=np.nan)
        with rasterio.open(files[0]) as first:
            profile = first.profile
        profile.update(width=arr.shape[2], height=arr.shape[1], transform=transform, nodata=np.nan)
        path = folder / f"opera_mosaic_{pol}.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(arr)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_opera_rtc_mosaic_linear_to_db(tmp_path, capsys, shared_data, tiny_package):
    vv, vh = opera_mosaic(shared_data, tmp_path)
    rc, rec, err = infer(capsys, "-m", tiny_package("segment", img_size=64), "-i", vv, "-i", vh,
                         "-o", tmp_path / "opera.tif")
    assert rc == 0, err
    units = next(m for m in rec["log"] if m.startswith("input units"))
    assert "linear power" in units and "converted to dB" in units
    with rasterio.open(vv) as a, rasterio.open(vh) as b:
        invalid = ~(np.isfinite(a.read(1)) & np.isfinite(b.read(1)))
    check_segmentation(rec, vv, invalid=invalid)
    assert rec["provenance"]["inputs"] == [str(vv), str(vh)]


def test_opera_mosaic_units_detected_at_native_resolution(tmp_path, shared_data):
    from engine.radiometry import detect_units
    from engine.reader import SarRaster

    # 99 % of the native 30 m mosaic is empty: the five default sample windows miss the data and
    # detection falls back to a sparse grid of small windows over the whole raster
    with SarRaster.open([str(p) for p in opera_mosaic(shared_data, tmp_path, res=30.0)]) as r:
        assert detect_units(r)[0] == "linear_power"


@pytest.mark.slow
def test_envisat_slc_through_the_vrt(tmp_path, capsys, shared_data, tiny_package):
    src = shared_data / "complex_slc" / "warped_envisat.slc.vrt"
    rc, rec, err = infer(capsys, "-m", tiny_package("segment", in_chans=1, img_size=64), "-i", src,
                         "-o", tmp_path / "envisat.tif")
    assert rc == 0, err
    units = next(m for m in rec["log"] if m.startswith("input units"))
    assert "complex" in units and "|z|^2" in units and "converted to dB" in units
    assert "radar geometry" in rec["log"][0]
    check_segmentation(rec, src)
    with rasterio.open(rec["outputs"]["class"]) as o:
        assert o.transform == Affine.identity()


@pytest.mark.slow
def test_slc_npy_converted_to_geotiff(tmp_path, capsys, shared_data, tiny_package):
    tif = npy_complex_to_geotiff(str(shared_data / "complex_slc" / "test_image_data.npy"), str(tmp_path / "slc.tif"))
    rc, rec, err = infer(capsys, "-m", tiny_package("segment", in_chans=1, img_size=64), "-i", tif,
                         "--complex-mode", "amplitude", "-o", tmp_path / "slc_seg.tif")
    assert rc == 0, err
    assert any("no CRS" in m and "pixel coordinates" in m for m in rec["log"])
    assert "|z|, i.e. amplitude" in next(m for m in rec["log"] if m.startswith("input units"))
    check_segmentation(rec, Path(tif))
    assert rec["statistics"]["area_unit"] == "px"
    # the .npy itself is refused with a hint to convert it
    rc = main(["infer", "-m", str(tiny_package("segment", in_chans=1, img_size=64)), "-i",
               str(shared_data / "complex_slc" / "test_image_data.npy"), "-o", str(tmp_path / "x.tif")])
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, "NumPy array", "npy_complex_to_geotiff")


@pytest.mark.slow
def test_real_embedding_grid(tmp_path, shared_data, tiny_package):
    """An embedding of a real GRD: grid ceil(H/16) x ceil(W/16), transform scaled by 16."""
    src = shared_data / "pyrosar" / "S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"
    res = run_inference(str(src), tmp_path / "emb.tif", tiny_package("embed", in_chans=1),
                        InferenceOptions(threads=1))
    with rasterio.open(res.outputs["embedding"]) as o, rasterio.open(src) as s:
        assert o.shape == (-(-s.height // 16), -(-s.width // 16)) == (14, 17)
        assert o.crs == s.crs and o.transform.almost_equals(s.transform * Affine.scale(16))
