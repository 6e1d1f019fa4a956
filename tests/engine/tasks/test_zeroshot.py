"""The zeroshot and textquery tasks: class maps and similarity rasters from a CLIP package, with the
scene's image embeddings cached so that a second class list or phrase runs only the text tower."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from helpers.rasters import write_raster

from engine.clip import load_clip, prepare_images, text_embeddings
from engine.clip.scene import plan_cells
from engine.errors import RasterInputError, SarmaeError
from engine.inference import InferenceOptions, run_inference


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SARMAE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def scene(tmp_path):
    """100 x 70 px, VV + VH in dB: dark water on the left, bright land on the right, a nodata corner."""
    rng = np.random.default_rng(0)
    x = np.empty((2, 100, 70), np.float32)
    x[0], x[1] = -22 + rng.normal(0, 1, (100, 70)), -29 + rng.normal(0, 1, (100, 70))
    x[:, :, 35:] += 15
    x[:, 96:, 64:] = np.nan  # the last cell (rows 96.., cols 64..) has no data
    return write_raster(tmp_path / "scene_db.tif", x, descriptions=["VV", "VH"])


def _expected(pkg, path, names, stride=32):
    """Class probabilities of every cell, computed directly with engine.clip (no task, no cache)."""
    clip = load_clip(pkg)
    with rasterio.open(path) as src:
        x = src.read().astype(np.float32)
    rows, cols, wins = plan_cells(x.shape[1], x.shape[2], 32, stride)
    imgs = []
    for w in wins:
        chip = np.full((2, 32, 32), np.nan, np.float32)
        part = x[:, w.row_off:w.row_off + 32, w.col_off:w.col_off + 32]
        chip[:, :part.shape[1], :part.shape[2]] = part
        imgs.append(chip)
    e = clip.encode_images(prepare_images(np.stack(imgs), clip.card)).numpy()
    k = text_embeddings(clip, names).numpy()
    p = torch.softmax(torch.from_numpy(100 * e @ k.T), -1).numpy()
    return e.reshape(rows, cols, -1), p.reshape(rows, cols, -1)


def test_zeroshot_class_map_confidence_and_grid(tiny_clip_package, scene, tmp_path):
    out = tmp_path / "classes.tif"
    names = ["water", "urban area", "forest"]
    r = run_inference([str(scene)], out, tiny_clip_package, InferenceOptions(classes=names))
    assert r.task == "zeroshot" and set(r.outputs) == {"class", "confidence", "grid"}
    _, p = _expected(tiny_clip_package, scene, names)
    with rasterio.open(out) as src:
        cls = src.read(1)
        assert src.shape == (4, 3) and src.nodata == 255 and src.transform.a == 32 * 20.0
        assert src.colormap(1)[0][:3] != src.colormap(1)[1][:3]
    with rasterio.open(r.outputs["confidence"]) as src:
        conf = src.read(1)
    assert cls[3, 2] == 255 and np.isnan(conf[3, 2])  # the nodata cell
    ok = cls != 255
    np.testing.assert_array_equal(cls[ok], p.argmax(-1)[ok])
    np.testing.assert_allclose(conf[ok], p.max(-1)[ok], atol=1e-5)
    import fiona

    with fiona.open(r.outputs["grid"]) as layer:
        feats = list(layer)
    assert len(feats) == 11 and {f"p_{n}" for n in names} <= set(feats[0]["properties"])
    assert sum(v["cells"] for v in r.statistics["per_class"].values()) == 11
    assert r.statistics["embeddings"]["cached"] is False


def test_second_class_list_and_phrases_reuse_the_cached_embeddings(tiny_clip_package, scene, tmp_path, monkeypatch):
    run_inference([str(scene)], tmp_path / "a.tif", tiny_clip_package, InferenceOptions(classes=["water", "land"]))
    import engine.backends

    def no_image_tower(*a, **k):
        raise AssertionError("the image tower ran although the embeddings are cached")

    monkeypatch.setattr(engine.backends, "make_backend", no_image_tower)
    r = run_inference([str(scene)], tmp_path / "b.tif", tiny_clip_package,
                      InferenceOptions(classes=["ship", "sea"], templates=["a radar image of {}."]))
    assert r.statistics["embeddings"]["cached"] is True and any("cached" in m for m in r.log)
    phrases = ["ships at sea", "flooded fields"]
    q = run_inference([str(scene)], tmp_path / "q.tif", tiny_clip_package, InferenceOptions(query=phrases))
    assert q.task == "textquery" and set(q.statistics["per_query"]) == set(phrases)
    e, _ = _expected(tiny_clip_package, scene, ["x"])
    t = load_clip(tiny_clip_package).encode_text(phrases).numpy()
    with rasterio.open(q.outputs["similarity"]) as src:
        sim = src.read()
        assert src.count == 2 and "ships at sea" in src.descriptions[0]
    want = np.einsum("rcd,qd->qrc", e, t)
    ok = ~np.isnan(sim)
    assert ok.sum() == 22
    np.testing.assert_allclose(sim[ok], want[ok], atol=1e-5)
    long = run_inference([str(scene)], tmp_path / "long.tif", tiny_clip_package, InferenceOptions(query=["ship " * 90]))
    assert any("truncated to its first 75 tokens" in m for m in long.log)  # the warning reaches the run's log


def test_overlap_gives_a_finer_grid(tiny_clip_package, scene, tmp_path):
    r = run_inference([str(scene)], tmp_path / "q.tif", tiny_clip_package,
                      InferenceOptions(query=["water"], overlap=0.5))
    with rasterio.open(r.outputs["similarity"]) as src:
        assert src.shape == (7, 5) and src.transform.a == 16 * 20.0
    assert r.statistics["cell_px"] == 16


@pytest.mark.parametrize("opts, match", [
    ({}, "needs --classes"),
    ({"classes": ["water"], "query": ["ships"]}, "give one of them"),
    ({"classes": ["water", "land", "Water"]}, "given more than once: Water, water"),
    ({"classes": ["water"], "templates": ["no slot"]}, "exactly one"),
    ({"query": ["  "]}, "empty phrase"),
    ({"query": ["ships"], "templates": ["a {}"]}, "--templates applies to --classes"),
    ({"classes": ["water"], "window": 64}, "--window 64"),
])
def test_bad_options_are_refused_before_any_pixel_is_read(tiny_clip_package, scene, tmp_path, opts, match):
    with pytest.raises(SarmaeError, match=match):
        run_inference([str(scene)], tmp_path / "o.tif", tiny_clip_package, InferenceOptions(**opts))
    assert not (tmp_path / "o.tif").exists()


def test_a_raster_that_does_not_fit_the_contract_is_named(tiny_clip_package, tmp_path):
    one = write_raster(tmp_path / "hh_only.tif", np.full((1, 40, 40), -10, np.float32), descriptions=["HH"])
    with pytest.raises(RasterInputError, match=r"hh_only\.tif has 1 band"):
        run_inference([str(one)], tmp_path / "o.tif", tiny_clip_package, InferenceOptions(query=["ships"]))


def test_cli_query_and_classes(tiny_clip_package, scene, tmp_path, capsys):
    from engine.cli import main

    assert main(["infer", "-m", str(tiny_clip_package), "-i", str(scene), "-o", str(tmp_path / "ships.tif"),
                 "--query", "ships at sea", "--query", "a harbour", "-q"]) == 0
    assert "similarity" in capsys.readouterr().out
    assert main(["infer", "-m", str(tiny_clip_package), "-i", str(scene), "-o", str(tmp_path / "c.tif"),
                 "--classes", "water,urban,forest", "-q"]) == 0
    assert (tmp_path / "c_grid.gpkg").is_file() and (tmp_path / "c_confidence.tif").is_file()


def test_the_image_tower_runs_from_model_onnx(tiny_clip_package, scene, tmp_path, monkeypatch):
    import shutil

    from engine.export import export_package

    pkg = shutil.copytree(tiny_clip_package, tmp_path / "pkg")
    export_package(str(pkg))
    assert (pkg / "model.onnx").is_file()
    sims = {}
    for backend in ("torch", "onnxruntime"):
        monkeypatch.setenv("SARMAE_CACHE_DIR", str(tmp_path / f"cache_{backend}"))
        r = run_inference([str(scene)], tmp_path / f"{backend}.tif", pkg,
                          InferenceOptions(query=["ships at sea"], backend=backend))
        assert any(backend in m for m in r.log)
        with rasterio.open(r.outputs["similarity"]) as src:
            sims[backend] = src.read(1)
    np.testing.assert_allclose(sims["onnxruntime"], sims["torch"], atol=1e-5)


def test_int8_image_tower_passes_its_gate_and_keeps_its_own_cache(tiny_clip_package, scene, tmp_path):
    import shutil

    from engine.export import export_package
    from engine.package import read_card

    pkg = shutil.copytree(tiny_clip_package, tmp_path / "pkg")
    export_package(str(pkg), precision="int8", calibration=str(scene), log=lambda _: None)
    gate = read_card(pkg).onnx["int8"]["gate"]
    assert gate["metric"] == "mean cosine similarity" and gate["value"] >= gate["threshold"]
    sims, caches = {}, {}
    for precision in ("fp32", "int8"):
        r = run_inference([str(scene)], tmp_path / f"{precision}.tif", pkg,
                          InferenceOptions(query=["ships at sea"], precision=precision, backend="onnxruntime"))
        assert not r.statistics["embeddings"]["cached"]  # int8 never reads the fp32 tower's cache, nor back
        caches[precision] = r.statistics["embeddings"]["file"]
        with rasterio.open(r.outputs["similarity"]) as src:
            sims[precision] = src.read(1)
    assert caches["fp32"] != caches["int8"]
    ok = np.isfinite(sims["fp32"])
    np.testing.assert_allclose(sims["int8"][ok], sims["fp32"][ok], atol=0.05)
    again = run_inference([str(scene)], tmp_path / "again.tif", pkg,
                          InferenceOptions(query=["water"], precision="int8", backend="onnxruntime", overlap=0.75))
    assert again.statistics["cell_px"] == 8 and not again.statistics["embeddings"]["cached"]
    third = run_inference([str(scene)], tmp_path / "third.tif", pkg,
                          InferenceOptions(query=["ship"], precision="int8", backend="onnxruntime", overlap=0.75))
    assert third.statistics["embeddings"]["cached"]  # the finer grid is cached too


def test_8bit_rasters_are_read_as_the_db_range_or_refused_by_a_calibrated_model(tmp_path):
    from engine.clip import TINY_CONFIG, build_clip, clip_card, save_clip_package

    rng = np.random.default_rng(0)
    png = write_raster(tmp_path / "quicklook.tif", rng.integers(0, 256, (1, 40, 40)).astype(np.uint8),
                       descriptions=["VV"])
    torch.manual_seed(0)
    for source in ("db", "sarclip"):
        card = clip_card(f"tiny-{source}", config=TINY_CONFIG, source=source, bands=["VV"])
        pkg = save_clip_package(build_clip(card), card, tmp_path / source)
        opts = InferenceOptions(query=["water"])
        if source == "sarclip":
            assert "display_db" not in card.input.to_dict()
            with pytest.raises(RasterInputError, match="cannot convert 8-bit display values to dB"):
                run_inference([str(png)], tmp_path / f"{source}.tif", pkg, opts)
            continue
        lo, hi = card.input.display_db
        r = run_inference([str(png)], tmp_path / f"{source}.tif", pkg, opts)
        assert any(f"read as {lo:g}..{hi:g} dB" in m for m in r.log + [r.provenance["input_units"]])
        # the same pixels given in dB as lo + x / 255 (hi - lo) give the same similarity
        with rasterio.open(png) as src:
            db = lo + src.read().astype(np.float32) / 255 * (hi - lo)
        same = write_raster(tmp_path / "as_db.tif", db, descriptions=["VV"])
        r2 = run_inference([str(same)], tmp_path / "db2.tif", pkg, InferenceOptions(query=["water"], input_units="db"))
        with rasterio.open(r.outputs["similarity"]) as a, rasterio.open(r2.outputs["similarity"]) as b:
            np.testing.assert_allclose(a.read(), b.read(), atol=1e-5)


def test_extent_embeds_that_part_as_a_raster_cropped_to_it_would_be(tiny_clip_package, scene, tmp_path):
    with rasterio.open(scene) as src:
        crop = src.read(window=rasterio.windows.Window(6, 32, 64, 64))  # col 6, row 32, 64 x 64
        t = src.transform
    cropped = write_raster(tmp_path / "crop.tif", crop, descriptions=["VV", "VH"])
    full = run_inference([str(scene)], tmp_path / "full.tif", tiny_clip_package, InferenceOptions(query=["water"]))
    part = run_inference([str(scene)], tmp_path / "part.tif", tiny_clip_package,
                         InferenceOptions(query=["water"], extent=(32, 6, 64, 64)))
    ref = run_inference([str(cropped)], tmp_path / "ref.tif", tiny_clip_package, InferenceOptions(query=["water"]))
    assert not part.statistics["embeddings"]["cached"]  # not the whole raster's cache file
    assert part.statistics["embeddings"]["file"] != full.statistics["embeddings"]["file"]
    with rasterio.open(part.outputs["similarity"]) as a, rasterio.open(ref.outputs["similarity"]) as b:
        assert a.shape == (2, 2)
        np.testing.assert_allclose(a.read(), b.read(), atol=1e-6)
        assert a.transform.c == pytest.approx(t.c + 6 * t.a) and a.transform.f == pytest.approx(t.f + 32 * t.e)
    classes = run_inference([str(scene)], tmp_path / "cls.tif", tiny_clip_package,
                            InferenceOptions(classes=["water", "land"], extent=(32, 6, 64, 64)))
    assert classes.statistics["embeddings"]["cached"]  # the extent's grid is cached like the whole raster's
    import fiona

    with fiona.open(tmp_path / "cls_grid.gpkg") as grid:
        assert sorted((f["properties"]["row_off"], f["properties"]["col_off"]) for f in grid) == \
            [(32, 6), (32, 38), (64, 6), (64, 38)]
