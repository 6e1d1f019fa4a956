"""run_inference end to end with tiny models: bad input, outputs per task, determinism, equivalence.

Every failure must be a ``SarmaeError`` subclass whose message names the file and says what to do,
leave no output (not even a hidden ``.<name>.<hex>.tmp*`` file) and never touch a pre-existing file.
Outputs must keep the input's grid (CRS, transform or GCPs, size) and carry provenance tags.
The models are 2-block ViT-Tiny packages at 32 px (``tiny_package`` in conftest.py); torch runs on
one thread (two cores shared with other test runs: more threads only spin).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import threading
import zipfile
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from helpers.rasters import DEFAULT_TRANSFORM, speckle, write_raster
from rasterio.errors import RasterioIOError

from engine.errors import CancelledError, OutputError, PackageError, RasterInputError, SarmaeError
from engine.inference import InferenceOptions, run_inference
from engine.package import read_card
from engine.writers import hex_to_rgba

TAGS = ("SARMAE_MODEL", "SARMAE_MODEL_SHA256", "SARMAE_TASK", "SARMAE_INPUT_UNITS", "SARMAE_SOFTWARE",
        "SARMAE_INPUTS")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(inputs, output, model, **options):
    """run_inference on one CPU thread (the tests' default)."""
    options.setdefault("threads", 1)
    return run_inference(inputs, output, model, InferenceOptions(**options))


def db_raster(path: Path, height: int = 50, width: int = 40, seed: int = 0, **kw) -> Path:
    """A VV+VH backscatter raster in dB (band descriptions name the polarisations)."""
    kw.setdefault("descriptions", ["VV", "VH"])
    return write_raster(path, 10 * np.log10(speckle((2, height, width), seed=seed)), **kw)


def hidden_temps(folder: Path) -> list[str]:
    """Temporary files of the writers (``.<name>.<hex>.tmp.tif`` and the like) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def read(path, band: int | None = None) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(band) if band else ds.read()


def assert_same_grid(out, src, scale: int = 1) -> None:
    """``out`` has ``src``'s CRS and transform (scaled by ``scale``) and size ceil(H/scale) x ceil(W/scale)."""
    with rasterio.open(out) as o, rasterio.open(src) as s:
        assert (o.height, o.width) == (-(-s.height // scale), -(-s.width // scale))
        assert o.crs == s.crs
        assert o.transform.almost_equals(s.transform * Affine.scale(scale))


@pytest.fixture
def seg(tiny_package) -> Path:
    return tiny_package("segment")


# ------------------------------------------------------------------------------------ bad input
def test_missing_input(tmp_path, seg):
    with pytest.raises(RasterInputError, match=r"not found: .*nope\.tif.*Check the path"):
        run(str(tmp_path / "nope.tif"), tmp_path / "out.tif", seg)
    assert names(tmp_path) == []


def test_text_file_named_tif(tmp_path, seg):
    (tmp_path / "notes.tif").write_text("this is not a raster\n")
    with pytest.raises(RasterInputError, match=r"notes\.tif is not a raster GDAL can read.*Give a GeoTIFF"):
        run(str(tmp_path / "notes.tif"), tmp_path / "out.tif", seg)
    assert names(tmp_path) == ["notes.tif"]


@pytest.mark.parametrize("kind", ["1x1", "0x0"])
def test_degenerate_raster(tmp_path, seg, kind):
    if kind == "1x1":
        path = write_raster(tmp_path / "dot.tif", np.zeros((2, 1, 1), np.float32))
        words = r"dot\.tif is too small.*1x1 px.*need at least 2x2"
    else:  # GeoTIFF cannot hold 0x0; a VRT can say it
        path = tmp_path / "dot.vrt"
        path.write_text('<VRTDataset rasterXSize="0" rasterYSize="0">'
                        '<VRTRasterBand dataType="Float32" band="1"/></VRTDataset>')
        words = r"dot\.vrt is not a raster GDAL can read.*0 x 0"
    with pytest.raises(RasterInputError, match=words):
        run(str(path), tmp_path / "out.tif", seg)
    assert not (tmp_path / "out.tif").exists() and hidden_temps(tmp_path) == []


def test_no_crs_runs_in_pixel_space_and_says_so(tmp_path, seg):
    src = db_raster(tmp_path / "radar.tif", georef="none")
    res = run(str(src), tmp_path / "out.tif", seg)
    assert any("no CRS" in m and "pixel" in m for m in res.log), res.log
    for path in res.outputs.values():
        with rasterio.open(path) as o:
            assert o.crs is None and o.transform == Affine.identity() and o.shape == (50, 40)
    assert res.statistics["area_unit"] == "px"


def test_all_nodata(tmp_path, seg):
    src = write_raster(tmp_path / "empty.tif", np.full((2, 40, 40), -99, np.float32), nodata=-99,
                       descriptions=["VV", "VH"])
    with pytest.raises(RasterInputError, match=r"empty\.tif.*no valid pixel.*--input-units"):
        run(str(src), tmp_path / "out.tif", seg)
    # with the units given, the sink finds every window empty
    with pytest.raises(RasterInputError, match=r"empty\.tif: every pixel is nodata.*nodata value"):
        run(str(src), tmp_path / "out.tif", seg, input_units="db")
    assert names(tmp_path) == ["empty.tif"]


def test_nan_and_inf_pixels_are_masked(tmp_path, seg):
    x = 10 * np.log10(speckle((2, 60, 50), seed=3))
    x[0, :10, :12] = np.nan
    x[1, 30:33, :] = np.inf
    x[0, 45, 20] = -np.inf
    bad = ~np.isfinite(x).all(axis=0)
    src = write_raster(tmp_path / "holes.tif", x, descriptions=["VV", "VH"])
    res = run(str(src), tmp_path / "out.tif", seg, probabilities=True)
    cls, conf = read(res.outputs["class"], 1), read(res.outputs["confidence"], 1)
    assert np.array_equal(cls == 255, bad)
    assert np.array_equal(np.isnan(conf), bad)
    assert np.isnan(read(res.outputs["probabilities"])[:, bad]).all()
    assert set(np.unique(cls[~bad])) <= {0, 1} and (conf[~bad] >= 0.5).all()
    assert res.statistics["pixels"] == int((~bad).sum())


def test_wrong_band_count(tmp_path, seg):
    x = 10 * np.log10(speckle((3, 40, 40)))
    src = write_raster(tmp_path / "three.tif", x, descriptions=["VV", "VH", "HH"])
    with pytest.raises(RasterInputError, match=r"wants VV\+VH \(2 channel.*three\.tif has 3 bands.*--bands"):
        run(str(src), tmp_path / "out.tif", seg)
    assert names(tmp_path) == ["three.tif"]
    res = run(str(src), tmp_path / "out.tif", seg, bands=["VV", "VH"])  # what the message suggests
    assert Path(res.outputs["class"]).exists()


def test_wrong_polarisations(tmp_path, seg):
    hh = db_raster(tmp_path / "hh.tif", descriptions=["HH", "HV"])
    with pytest.raises(RasterInputError, match=r"wants VV\+VH.*hh\.tif.*channel 1 is HH, not VV"):
        run(str(hh), tmp_path / "out.tif", seg)
    swapped = db_raster(tmp_path / "swapped.tif", descriptions=["VH", "VV"])
    with pytest.raises(RasterInputError, match=r"swapped\.tif.*channel 1 is VH.*--bands VV,VH"):
        run(str(swapped), tmp_path / "out.tif", seg)
    assert hidden_temps(tmp_path) == [] and not (tmp_path / "out.tif").exists()
    # reordered as suggested, it gives what the same data in model order gives
    ordered = write_raster(tmp_path / "ordered.tif", read(swapped)[::-1], descriptions=["VV", "VH"])
    a = run(str(swapped), tmp_path / "a.tif", seg, bands=["VV", "VH"])
    b = run(str(ordered), tmp_path / "b.tif", seg)
    assert np.array_equal(read(a.outputs["confidence"]), read(b.outputs["confidence"]))


def complex_raster(path: Path, height: int = 40, width: int = 40) -> Path:
    rng = np.random.default_rng(7)
    z = (rng.standard_normal((2, height, width)) + 1j * rng.standard_normal((2, height, width))) * 0.1
    return write_raster(path, z.astype(np.complex64), descriptions=["VV", "VH"])


def test_complex_input_to_db_model_is_converted(tmp_path, seg):
    """SLC bands become |z|^2 (linear power), converted to the model's dB, and the log says so;
    amplitude mode gives the same dB (20 log10 |z| = 10 log10 |z|^2)."""
    src = complex_raster(tmp_path / "slc.tif")
    res = run(str(src), tmp_path / "int.tif", seg)
    units = next(m for m in res.log if m.startswith("input units"))
    assert "complex" in units and "|z|^2" in units and "converted to dB" in units
    assert res.provenance["input_units"] == units
    with rasterio.open(res.outputs["class"]) as o:
        assert o.tags()["SARMAE_INPUT_UNITS"] == units and o.shape == (40, 40)
        assert (o.read(1) != 255).all()
    amp = run(str(src), tmp_path / "amp.tif", seg, complex_mode="amplitude")
    assert "|z|, i.e. amplitude" in next(m for m in amp.log if m.startswith("input units"))
    np.testing.assert_allclose(read(amp.outputs["confidence"]), read(res.outputs["confidence"]), atol=1e-4)


def test_complex_input_to_uint8_model_is_refused(tmp_path, tiny_package):
    pkg = tiny_package("segment", units="uint8")
    src = complex_raster(tmp_path / "slc.tif")
    with pytest.raises(RasterInputError, match=r"cannot convert linear power values to 8-bit display.*--input-units"):
        run(str(src), tmp_path / "out.tif", pkg)
    assert names(tmp_path) == ["slc.tif"]


# -------------------------------------------------------------------------------- bad output
def test_output_under_a_regular_file(tmp_path, seg):
    """A folder that cannot exist (its path is a file): refused, even for root."""
    src = db_raster(tmp_path / "in.tif")
    (tmp_path / "file.txt").write_text("keep")
    with pytest.raises(OutputError, match=r"file\.txt/out\.tif: .*file\.txt is a file, not a folder"):
        run(str(src), tmp_path / "file.txt" / "out.tif", seg)
    with pytest.raises(OutputError, match=r"cannot create the output folder"):
        run(str(src), tmp_path / "file.txt" / "sub" / "out.tif", seg)
    assert (tmp_path / "file.txt").read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the next test")
def test_output_folder_not_writable(tmp_path, seg):
    src = db_raster(tmp_path / "in.tif")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=r"ro/out\.tif.*not writable"):
            run(str(src), ro / "out.tif", seg)
        assert names(ro) == []
    finally:
        ro.chmod(0o755)


def test_output_file_cannot_be_created(tmp_path, seg, monkeypatch):
    """What a read-only folder does (os.access says yes for root, GDAL's create then fails)."""
    src = db_raster(tmp_path / "in.tif")
    real_open = rasterio.open

    def refuse_writes(path, mode="r", *args, **kw):
        if mode == "w":
            raise RasterioIOError(f"Attempt to create new tiff file '{path}' failed: Permission denied")
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(rasterio, "open", refuse_writes)
    with pytest.raises(OutputError, match=r"out\.tif: writing failed .*Permission denied.*nothing was written"):
        run(str(src), tmp_path / "out.tif", seg)
    assert names(tmp_path) == ["in.tif"]


def test_output_equal_to_input(tmp_path, seg):
    src = db_raster(tmp_path / "in.tif")
    before = src.read_bytes()
    for out in (src, tmp_path / "." / "in.tif"):
        with pytest.raises(OutputError, match=r"would overwrite the input raster; choose another output"):
            run(str(src), out, seg, overwrite=True)
    assert src.read_bytes() == before and names(tmp_path) == ["in.tif"]


def test_output_exists_without_and_with_overwrite(tmp_path, seg):
    src = db_raster(tmp_path / "in.tif")
    out = tmp_path / "out.tif"
    out.write_text("precious")
    with pytest.raises(OutputError, match=r"out\.tif already exists; .*--overwrite"):
        run(str(src), out, seg)
    assert out.read_text() == "precious" and names(tmp_path) == ["in.tif", "out.tif"]
    res = run(str(src), out, seg, overwrite=True)
    with rasterio.open(out) as o:
        assert o.dtypes[0] == "uint8" and o.shape == (50, 40)
    assert res.outputs["class"] == str(out)


@pytest.mark.parametrize("task, existing, options", [
    ("segment", "out_confidence.tif", {}),
    ("segment", "out_probabilities.tif", {"probabilities": True}),
    ("segment", "out.gpkg", {"vector": True}),
    ("embed", "out_pca.tif", {}),
])
def test_extra_output_exists_without_overwrite(tmp_path, tiny_package, task, existing, options):
    """The files written beside the main output are protected like it, before anything is opened."""
    src = db_raster(tmp_path / "in.tif")
    (tmp_path / existing).write_text("precious")
    with pytest.raises(OutputError, match=rf"{existing} already exists; .*--overwrite"):
        run(str(src), tmp_path / "out.tif", tiny_package(task), **options)
    assert (tmp_path / existing).read_text() == "precious"
    assert names(tmp_path) == sorted(["in.tif", existing])  # no temporary files either


def damage_package(pkg: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / "pkg"
    if how == "missing":
        return tmp_path / "no_such_package"
    if how == "not a zip":
        bad = tmp_path / "model.zip"
        bad.write_bytes(b"not a zip at all")
        return bad
    shutil.copytree(pkg, bad)
    if how == "malformed json":
        (bad / "model.json").write_text("{ this is not json")
    elif how == "hash mismatch":
        w = bad / "weights.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 0xFF
        w.write_bytes(bytes(data))
    elif how == "no weights":
        (bad / "weights.safetensors").unlink()
    elif how == "zip without card":
        zpath = tmp_path / "model.zip"
        with zipfile.ZipFile(zpath, "w") as z:
            z.write(bad / "weights.safetensors", "model/weights.safetensors")
        return zpath
    return bad


@pytest.mark.parametrize("how, words", [
    ("missing", r"no_such_package: model package not found"),
    ("not a zip", r"model\.zip: not a model package"),
    ("zip without card", r"model\.zip: the zip holds no model\.json"),
    ("malformed json", r"pkg/model\.json: malformed JSON.*Re-export"),
    ("hash mismatch", r"pkg: the weights do not match model\.json.*re-copy or re-export"),
    ("no weights", r"pkg: weights\.safetensors is missing"),
])
def test_bad_model_package(tmp_path, seg, how, words):
    src = db_raster(tmp_path / "in.tif")
    model = damage_package(seg, tmp_path, how)
    with pytest.raises(PackageError, match=words):
        run(str(src), tmp_path / "out.tif", model)
    assert not (tmp_path / "out.tif").exists() and hidden_temps(tmp_path) == []


def test_unavailable_backend_leaves_nothing(tmp_path, seg):
    src = db_raster(tmp_path / "in.tif")
    with pytest.raises(SarmaeError, match=r"no model\.onnx; run 'sarmae export"):
        run(str(src), tmp_path / "out.tif", seg, backend="onnxruntime")
    assert names(tmp_path) == ["in.tif"]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sarmae-reader" and t.is_alive()]


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RasterioIOError("TIFFAppendToStrip:Write error at scanline 12: No space left on device"),
])
def test_disk_full_while_writing(tmp_path, seg, monkeypatch, error):
    """Disk full midway: OutputError saying so, no output, the existing output untouched, and the
    reader thread stopped (before the input is closed)."""
    src = db_raster(tmp_path / "in.tif", 100, 100)
    out = tmp_path / "out.tif"
    out.write_text("yesterday's result")
    real_write = rasterio.io.DatasetWriter.write
    calls = []

    def write(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return real_write(self, *args, **kw)

    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", write)
    with pytest.raises(OutputError, match=r"disk full while writing \S*out(_confidence)?\.tif \(needed about [\d.]+ [KM]B, [\d.]+ [KM]B free\)") as info:
        run(str(src), out, seg, overwrite=True, batch_size=1)
    assert not reader_threads()
    assert isinstance(info.value, OSError)
    assert out.read_text() == "yesterday's result"
    assert names(tmp_path) == ["in.tif", "out.tif"]


def test_disk_full_when_flushing_the_last_output(tmp_path, seg, monkeypatch):
    """ENOSPC when GDAL flushes the second output at close: the first, already complete, is not
    published either (a run leaves all its outputs or none)."""
    src = db_raster(tmp_path / "in.tif")
    out = tmp_path / "out.tif"
    out.write_text("yesterday's result")
    real_close = rasterio.io.DatasetWriter.close

    def close(self):
        real_close(self)
        if "_confidence" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rasterio.io.DatasetWriter, "close", close)
    with pytest.raises(OutputError, match=r"disk full while writing \S*out_confidence\.tif"):
        run(str(src), out, seg, overwrite=True)
    assert out.read_text() == "yesterday's result"
    assert names(tmp_path) == ["in.tif", "out.tif"]


@pytest.mark.parametrize("task", ["segment", "embed", "reconstruct", "classify"])
def test_cancel_midway(tmp_path, tiny_package, task):
    src = db_raster(tmp_path / "in.tif", 100, 100)
    polls = []

    def should_cancel() -> bool:
        polls.append(1)
        return len(polls) > 3

    out = tmp_path / ("out.gpkg" if task == "classify" else "out.tif")
    with pytest.raises(CancelledError, match="cancelled by the user; no output was written"):
        run_inference(str(src), out, tiny_package(task), InferenceOptions(threads=1, batch_size=1),
                      should_cancel=should_cancel)
    assert len(polls) == 4
    assert names(tmp_path) == ["in.tif"] and not reader_threads()


# ----------------------------------------------------------------------------------- outputs
def assert_provenance(path, pkg: Path, task: str, input_name: str) -> dict:
    with rasterio.open(path) as o:
        tags = o.tags()
    assert set(TAGS) <= set(tags), tags
    assert tags["SARMAE_MODEL_SHA256"] == read_card(pkg).weights["sha256"]
    assert tags["SARMAE_TASK"] == task and tags["SARMAE_MODEL"] == f"tiny-{task}"
    assert tags["SARMAE_INPUTS"] == input_name and tags["SARMAE_SOFTWARE"].startswith("sarmae ")
    assert "dB" in tags["SARMAE_INPUT_UNITS"]
    return tags


def test_segment_outputs(tmp_path, seg):
    src = db_raster(tmp_path / "in.tif", 70, 90)
    res = run(str(src), tmp_path / "out.tif", seg, probabilities=True, vector=True)
    assert set(res.outputs) == {"class", "confidence", "probabilities", "vectors"}
    classes = read_card(seg).classes
    with rasterio.open(res.outputs["class"]) as o:
        assert (o.count, o.dtypes[0], o.nodata) == (1, "uint8", 255)
        cmap = o.colormap(1)
        assert [cmap[i] for i in range(2)] == [hex_to_rgba(c["colour"]) for c in classes]
        assert cmap[255][3] == 0  # nodata transparent
        cls = o.read(1)
    with rasterio.open(res.outputs["confidence"]) as o:
        assert (o.count, o.dtypes[0]) == (1, "float32") and np.isnan(o.nodata)
        conf = o.read(1)
    probs = read(res.outputs["probabilities"])
    assert probs.shape == (2, 70, 90)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    np.testing.assert_allclose(probs.max(0), conf, atol=1e-6)
    assert np.array_equal(probs.argmax(0), cls)
    for role in ("class", "confidence", "probabilities"):
        assert_same_grid(res.outputs[role], src)
        assert_provenance(res.outputs[role], seg, "segment", "in.tif")
    with fiona.open(res.outputs["vectors"]) as f:
        assert {"class_id", "class_name"} <= set(f.schema["properties"])
        assert f.crs_wkt and rasterio.crs.CRS.from_wkt(f.crs_wkt) == rasterio.crs.CRS.from_epsg(32631)
        assert {r["properties"]["class_name"] for r in f} <= {"water", "land"} and len(f) > 0
    stats = res.statistics
    assert stats["pixels"] == 70 * 90 and stats["area_unit"] == "m2"
    assert sum(s["pixels"] for s in stats["per_class"].values()) == 70 * 90
    assert stats["per_class"]["water"]["area"] == pytest.approx(400.0 * int((cls == 0).sum()))
    assert res.classes == classes
    assert res.provenance["model_sha256"] == read_card(seg).weights["sha256"]
    json.dumps(res.to_dict())  # the record is JSON-serialisable
    assert hidden_temps(tmp_path) == []


@pytest.mark.parametrize("task", ["segment", "embed"])
def test_cloud_optimised_outputs(tmp_path, tiny_package, task):
    src = db_raster(tmp_path / "in.tif", 70, 90)
    res = run(str(src), tmp_path / "out.tif", tiny_package(task), cog=True)
    main = res.outputs["class" if task == "segment" else "embedding"]
    with rasterio.open(main) as o:
        assert o.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert o.tags()["SARMAE_TASK"] == task
    assert_same_grid(main, src, scale=16 if task == "embed" else 1)
    assert hidden_temps(tmp_path) == []


def test_embed_outputs(tmp_path, tiny_package):
    pkg = tiny_package("embed")
    src = db_raster(tmp_path / "in.tif", 70, 90)
    res = run(str(src), tmp_path / "emb.tif", pkg)
    assert res.statistics == {"grid": [5, 6], "dim": 192, "stride_px": 16}
    with rasterio.open(res.outputs["embedding"]) as o:
        assert (o.count, o.dtypes[0]) == (192, "float32")
        assert o.tags()["SARMAE_PATCH_SIZE"] == "16"
        emb = o.read()
    with rasterio.open(res.outputs["pca"]) as o:
        assert (o.count, o.dtypes[0], o.nodata) == (3, "uint8", 0)
    for role in ("embedding", "pca"):
        assert_same_grid(res.outputs[role], src, scale=16)
        assert_provenance(res.outputs[role], pkg, "embed", "in.tif")
    # the bottom token row covers 70 - 64 = 6 of 16 rows: mostly padding, so nodata
    assert np.isnan(emb[:, 4]).all() and np.isfinite(emb[:, :4]).all()


def test_reconstruct_outputs(tmp_path, tiny_package):
    pkg = tiny_package("reconstruct")
    src = db_raster(tmp_path / "in.tif", 70, 90)
    res = run(str(src), tmp_path / "rec.tif", pkg)
    with rasterio.open(res.outputs["reconstruction"]) as o:
        assert (o.count, o.dtypes[0]) == (2, "float32") and o.descriptions == ("VV", "VH")
        assert o.tags()["SARMAE_UNITS"] == "db"
        rec = o.read()
    assert_same_grid(res.outputs["reconstruction"], src)
    assert_provenance(res.outputs["reconstruction"], pkg, "reconstruct", "in.tif")
    assert np.isfinite(rec).all() and rec.min() >= -35 and rec.max() <= 10  # the model's clip range, dB


def test_classify_outputs(tmp_path, tiny_package):
    pkg = tiny_package("classify")
    src = db_raster(tmp_path / "in.tif", 70, 90)
    res = run(str(src), tmp_path / "grid.gpkg", pkg)
    with fiona.open(res.outputs["grid"]) as f:
        assert set(f.schema["properties"]) == {"class_id", "class_name", "score", "valid_fraction", "row_off",
                                               "col_off", "p_water", "p_land"}
        assert rasterio.crs.CRS.from_wkt(f.crs_wkt) == rasterio.crs.CRS.from_epsg(32631)
        feats = list(f)
    assert len(feats) == res.statistics["windows"] == 9  # 3 x 3 windows of 32 px, no overlap
    x0, y0 = DEFAULT_TRANSFORM * (0, 0)
    x1, y1 = DEFAULT_TRANSFORM * (90, 70)
    for feat in feats:
        (xs, ys) = zip(*feat["geometry"]["coordinates"][0])
        assert x0 <= min(xs) and max(xs) <= x1 and y1 <= min(ys) and max(ys) <= y0
        p = feat["properties"]
        assert p["p_water"] + p["p_land"] == pytest.approx(1) and p["valid_fraction"] == 1.0


@pytest.mark.slow
def test_detect_outputs(tmp_path, tiny_package):
    pkg = tiny_package("detect")
    src = db_raster(tmp_path / "in.tif", 40, 40)
    res = run(str(src), tmp_path / "boxes.gpkg", pkg, score_threshold=0.0)
    with fiona.open(res.outputs["detections"]) as f:
        assert set(f.schema["properties"]) == {"class_id", "class_name", "score", "px_col", "px_row",
                                               "px_width", "px_height"}
        assert rasterio.crs.CRS.from_wkt(f.crs_wkt) == rasterio.crs.CRS.from_epsg(32631)
        feats = list(f)
    assert len(feats) == res.statistics["detections"]
    for feat in feats:
        p = feat["properties"]
        assert 0 <= p["px_col"] and p["px_col"] + p["px_width"] <= 40 + 1e-6
        assert 0 <= p["px_row"] and p["px_row"] + p["px_height"] <= 40 + 1e-6
        assert p["class_name"] in ("water", "land")


def test_gcps_are_kept(tmp_path, tiny_package):
    src = db_raster(tmp_path / "grd.tif", 48, 40, georef="gcps")
    with rasterio.open(src) as s:
        gcps, gcp_crs = s.gcps
    seg = run(str(src), tmp_path / "seg.tif", tiny_package("segment"))
    emb = run(str(src), tmp_path / "emb.tif", tiny_package("embed"))
    for path, scale in ((seg.outputs["class"], 1), (seg.outputs["confidence"], 1), (emb.outputs["embedding"], 16)):
        with rasterio.open(path) as o:
            out_gcps, out_crs = o.gcps
            assert out_crs == gcp_crs and len(out_gcps) == len(gcps) == 4
            for a, b in zip(out_gcps, gcps):
                assert (a.row, a.col) == pytest.approx((b.row / scale, b.col / scale))
                assert (a.x, a.y) == pytest.approx((b.x, b.y))
            assert o.shape == (-(-48 // scale), -(-40 // scale))


@pytest.mark.parametrize("task", ["segment", "embed", "reconstruct", "classify"])
def test_raster_smaller_than_one_window(tmp_path, tiny_package, task):
    src = db_raster(tmp_path / "in.tif", 20, 25)
    out = tmp_path / ("out.gpkg" if task == "classify" else "out.tif")
    res = run(str(src), out, tiny_package(task))
    if task == "classify":
        with fiona.open(out) as f:
            (feat,) = list(f)
        assert feat["properties"]["valid_fraction"] == 1.0
        return
    main = res.outputs[{"segment": "class", "embed": "embedding", "reconstruct": "reconstruction"}[task]]
    assert_same_grid(main, src, scale=16 if task == "embed" else 1)
    data = read(main)
    if task == "segment":
        assert (data != 255).all()
    elif task == "reconstruct":
        assert np.isfinite(data).all()
    else:  # token (0, 0) is all image; the others are mostly padding
        assert np.isfinite(data[:, 0, 0]).all()


def test_extent(tmp_path, tiny_package):
    src = db_raster(tmp_path / "in.tif", 80, 90)
    res = run(str(src), tmp_path / "part.tif", tiny_package("segment"), extent=(10, 20, 40, 50))
    with rasterio.open(res.outputs["class"]) as o:
        assert o.shape == (40, 50) and o.crs.to_epsg() == 32631
        assert o.transform.almost_equals(DEFAULT_TRANSFORM * Affine.translation(20, 10))
        assert (o.read(1) != 255).all()
    # clipped to the raster; and refused when it misses the raster
    res = run(str(src), tmp_path / "edge.tif", tiny_package("segment"), extent=(60, -5, 100, 30))
    with rasterio.open(res.outputs["class"]) as o:
        assert o.shape == (20, 25) and o.transform.almost_equals(DEFAULT_TRANSFORM * Affine.translation(0, 60))
    with pytest.raises(RasterInputError, match=r"extent .* does not overlap the 80x90 raster .*in\.tif"):
        run(str(src), tmp_path / "none.tif", tiny_package("segment"), extent=(100, 0, 10, 10))
    assert not (tmp_path / "none.tif").exists()


# ---------------------------------------------------------------------- determinism, equivalence
@pytest.mark.parametrize("task", ["segment", "embed", "reconstruct"])
def test_two_runs_are_identical(tmp_path, tiny_package, task):
    src = db_raster(tmp_path / "in.tif", 60, 70)
    a = run(str(src), tmp_path / "a.tif", tiny_package(task))
    b = run(str(src), tmp_path / "b.tif", tiny_package(task))
    assert a.outputs.keys() == b.outputs.keys()
    for role in a.outputs:
        assert np.array_equal(read(a.outputs[role]), read(b.outputs[role]), equal_nan=True), role
    assert a.statistics == b.statistics
    if task == "reconstruct":
        return  # its random masks are drawn per batch: another batch size hides other patches
    # another batch size changes torch's summation order only (float rounding)
    c = run(str(src), tmp_path / "c.tif", tiny_package(task), batch_size=3)
    for role in a.outputs:
        if role not in ("class", "pca"):  # argmax / 8-bit preview may flip on a rounding tie
            np.testing.assert_allclose(read(c.outputs[role]), read(a.outputs[role]), atol=1e-3 if task == "embed" else 1e-5)


class PixelBackend:
    """A 'model' whose logits at a pixel depend only on that pixel: stitching must not change them."""

    def run(self, x: np.ndarray) -> np.ndarray:
        a, b = x[:, 0], x[:, 1]
        return np.stack([np.tanh(2 * a) + 0.5 * b * b, a * b - 0.1], axis=1).astype(np.float32)

    def describe(self) -> str:
        return "per-pixel test function"


class PatchMeanBackend:
    """An 'encoder' whose token is a function of its own 16 x 16 patch only."""

    def __init__(self, dim: int):
        self.scale = (1 + np.arange(dim) / dim).astype(np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        b, c, s, _ = x.shape
        means = x.reshape(b, c, s // 16, 16, s // 16, 16).mean(axis=(3, 5))  # (B, C, g, g)
        ch = np.arange(len(self.scale)) % c
        return (means[:, ch] * self.scale[None, :, None, None]).astype(np.float32)

    def describe(self) -> str:
        return "per-patch test function"


def normalised(src: Path) -> tuple[np.ndarray, np.ndarray]:
    """The whole raster through the default dB contract (clip -35..10, mean 0.5, std 0.5)."""
    x = read(src).astype(np.float64)
    valid = np.isfinite(x).all(axis=0)
    y = ((np.clip(np.nan_to_num(x), -35, 10) + 35) / 45 - 0.5) / 0.5
    y[:, ~valid] = 0
    return y, valid


def odd_raster(tmp_path: Path) -> Path:
    x = 10 * np.log10(speckle((2, 203, 157), seed=5, mean_power=0.3))  # some values above the clip
    x[:, 90:97, 60:64] = np.nan  # a hole across window seams
    return write_raster(tmp_path / "odd.tif", x, descriptions=["VV", "VH"])


def test_stitched_segmentation_equals_whole_image(tmp_path, seg):
    src = odd_raster(tmp_path)
    res = run_inference(str(src), tmp_path / "out.tif", seg,
                        InferenceOptions(window=64, overlap=0.25, probabilities=True), backend=PixelBackend())
    y, valid = normalised(src)
    logits = PixelBackend().run(y[None].astype(np.float32))[0].astype(np.float64)
    e = np.exp(logits - logits.max(0))
    probs = e / e.sum(0)
    probs[:, ~valid] = np.nan
    got = read(res.outputs["probabilities"])
    np.testing.assert_allclose(got, probs, atol=1e-5)
    np.testing.assert_allclose(read(res.outputs["confidence"], 1), probs.max(0), atol=1e-5)  # NaN where nodata
    cls = read(res.outputs["class"], 1)
    clear = valid & (np.abs(probs[0] - probs[1]) > 1e-4)
    assert np.array_equal(cls[clear], probs.argmax(0)[clear]) and (cls[~valid] == 255).all()
    assert "per-pixel test function" in res.provenance["backend"]


class PixelBackendK(PixelBackend):
    """``PixelBackend`` with ``k`` logits per pixel (the segment sink blends logit_k - logit_0)."""

    def __init__(self, k: int):
        self.k = k

    def run(self, x: np.ndarray) -> np.ndarray:
        a, b = x[:, 0], x[:, 1]
        return np.stack([np.tanh(2 * a) + 0.5 * b * b, a * b - 0.1, 0.3 * a - b][: self.k], axis=1).astype(np.float32)


@pytest.mark.parametrize("classes", [("water",), ("water", "land", "ice")])
def test_stitched_segmentation_equals_whole_image_for_one_and_three_classes(tmp_path, tiny_package, classes):
    src = odd_raster(tmp_path)
    k = len(classes)
    res = run_inference(str(src), tmp_path / "out.tif", tiny_package("segment", classes=classes),
                        InferenceOptions(window=64, overlap=0.25, probabilities=True), backend=PixelBackendK(k))
    y, valid = normalised(src)
    logits = PixelBackendK(k).run(y[None].astype(np.float32))[0].astype(np.float64)
    e = np.exp(logits - logits.max(0))
    probs = e / e.sum(0)
    probs[:, ~valid] = np.nan
    np.testing.assert_allclose(read(res.outputs["probabilities"]), probs, atol=1e-5)
    cls = read(res.outputs["class"], 1)
    top2 = np.sort(np.nan_to_num(probs), axis=0)[-2:] if k > 1 else np.array([np.zeros_like(probs[0]), probs[0]])
    clear = valid & (top2[1] - top2[0] > 1e-4)
    assert np.array_equal(cls[clear], probs.argmax(0)[clear]) and (cls[~valid] == 255).all()
    assert set(res.statistics["per_class"]) == set(classes)


def test_stitched_embedding_equals_whole_image(tmp_path, tiny_package):
    pkg = tiny_package("embed")
    src = odd_raster(tmp_path)
    backend = PatchMeanBackend(192)
    res = run_inference(str(src), tmp_path / "emb.tif", pkg, InferenceOptions(window=64, overlap=0.25),
                        backend=backend)
    y, valid = normalised(src)
    gh, gw = -(-203 // 16), -(-157 // 16)
    pad = np.zeros((2, gh * 16, gw * 16), np.float32)
    pad[:, :203, :157] = y
    vpad = np.zeros((gh * 16, gw * 16), bool)
    vpad[:203, :157] = valid
    want = backend.run(_square(pad))[0][:, :gh, :gw]
    token_valid = vpad.reshape(gh, 16, gw, 16).mean(axis=(1, 3)) > 0.5
    want[:, ~token_valid] = np.nan
    got = read(res.outputs["embedding"])
    assert got.shape == (192, gh, gw)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)  # stored as float16


def _square(pad: np.ndarray) -> np.ndarray:
    """Pad (C, H, W) to a square (1, C, S, S) (the test backend wants square windows)."""
    s = max(pad.shape[1:])
    sq = np.zeros((1, pad.shape[0], s, s), pad.dtype)
    sq[0, :, : pad.shape[1], : pad.shape[2]] = pad
    return sq


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_reader_thread_is_nicer_than_the_model():
    """The reader thread lowers its own priority only (the caller's threads keep theirs)."""
    from engine.inference import _lower_thread_priority

    seen = {}

    def reader():
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        _lower_thread_priority(5)
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=reader)
    t.start()
    t.join()
    assert seen["delta"] == min(5, 19 - main_before)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


# ---------------------------------------------------------------- the writer thread (SinkThread)
class _RecordingSink:
    def __init__(self, fail_at: int | None = None):
        self.seen: list[int] = []
        self.fail_at = fail_at
        self.threads: set[str] = set()

    def consume(self, windows, outputs, valid):
        import threading
        import time

        time.sleep(0.002)  # slower than the producer: the queue fills and put() must wait
        self.threads.add(threading.current_thread().name)
        if windows == self.fail_at:
            raise OSError(f"disk full at batch {windows}")
        self.seen.append(windows)


def test_sink_thread_consumes_in_order_off_the_calling_thread():
    from engine.inference import SinkThread

    sink = _RecordingSink()
    w = SinkThread(sink, depth=2)
    for i in range(40):
        w.put(i, None, None)
    w.close()
    assert sink.seen == list(range(40))
    assert sink.threads == {"sarmae-writer"}
    assert not w.thread.is_alive()


def test_sink_thread_raises_a_consume_error_on_the_caller_and_drops_the_rest():
    from engine.inference import SinkThread

    sink = _RecordingSink(fail_at=5)
    w = SinkThread(sink, depth=2)
    with pytest.raises(OSError, match="disk full at batch 5"):
        for i in range(40):
            w.put(i, None, None)
        w.close()
    w.stop()
    assert sink.seen == list(range(5))  # nothing consumed after the failure
    assert not w.thread.is_alive()


def test_sink_thread_stop_waits_for_the_batch_in_hand():
    from engine.inference import SinkThread

    sink = _RecordingSink()
    w = SinkThread(sink, depth=4)
    for i in range(4):
        w.put(i, None, None)
    w.stop()  # e.g. Ctrl-C in the model: the sink is aborted only after this returns
    assert not w.thread.is_alive()
    assert sink.seen == list(range(len(sink.seen)))  # a prefix, in order
