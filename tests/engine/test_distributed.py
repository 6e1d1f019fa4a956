"""Scale-out with torchrun (engine.distributed): the split arithmetic, and real 2-rank gloo runs whose
merged outputs are compared with single-process ``run_inference`` runs.

The rank processes run with ``OMP_NUM_THREADS=1``; the reference runs use one torch thread as well,
since the thread count changes the last bits of some CPU kernels. All torchrun jobs of this module
run in ONE launch (a module fixture) to pay the start-up of torch in three processes only once.

Batch sizes are chosen so that, without ``BatchAlignedBackend``, some rank would compute a window in a
batch of another size than the single run does (e.g. alone in its last batch): on this CPU, outputs of
a window computed alone differ in the last bits from those computed in a batch of 2 or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.distributed import (
    BatchAlignedBackend,
    dist_info,
    run_batch,
    split_rows,
)
from engine.stitching import RollingStitcher
from engine.tasks import get_task
from engine.tasks.merging import stitch_strips
from engine.tiling import plan_tiles

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- pure arithmetic
@settings(deadline=None, max_examples=200)
@given(height=st.integers(1, 2000), window=st.sampled_from([4, 16, 64, 224]),
       overlap=st.sampled_from([0.0, 0.25, 0.5, 0.75]), parts=st.integers(1, 9), blended=st.booleans())
def test_split_rows_tiles_rows_and_reproduces_the_global_band_starts(height, window, overlap, parts, blended):
    plan = plan_tiles(height, 8, window, overlap)
    starts = plan.row_starts
    shares = split_rows(starts, plan.window, height, parts, blended)
    assert len(shares) == min(parts, len(starts))
    assert shares[0].rows[0] == 0 and shares[-1].rows[1] == height
    assert shares[0].own_bands[0] == 0 and shares[-1].own_bands[1] == len(starts)
    for a, b in zip(shares, shares[1:]):
        assert a.rows[1] == b.rows[0] and a.own_bands[1] == b.own_bands[0]
    for s in shares:
        r0, r1 = s.rows
        assert r0 < r1
        a, b = s.run_bands
        touching = [j for j, st_ in enumerate(starts) if st_ < r1 and st_ + window > r0]
        if blended:
            assert touching == list(range(a, b))  # exactly the bands that touch the owned rows
        else:
            assert (a, b) == s.own_bands
        e0, e1 = s.extent
        assert e0 == starts[a] and e1 == min(starts[b - 1] + window, height)
        # the key fact: a plan over the extent has the same bands, shifted by the extent's start
        part = plan_tiles(e1 - e0, 8, window, overlap)
        assert part.row_starts == tuple(x - e0 for x in starts[a:b])
        assert part.stride == plan.stride and part.overlap_px == plan.overlap_px


def _stitch(plan, logits, valid):
    """Run the RollingStitcher; return the assembled (C, H, W) array and its strips."""
    out = np.full((logits[0].shape[0], plan.raster_height, plan.raster_width), -1.0, np.float32)
    strips = []
    st_ = RollingStitcher(plan, logits[0].shape[0])
    for w, x, v in zip(plan.windows, logits, valid):
        st_.add(w, x, v)
        for r, s in st_.pop_ready():
            strips.append((r, s.shape[1]))
            out[:, r:r + s.shape[1]] = s
    for r, s in st_.flush():
        strips.append((r, s.shape[1]))
        out[:, r:r + s.shape[1]] = s
    return out, strips


@settings(deadline=None, max_examples=60)
@given(height=st.integers(1, 150), width=st.integers(1, 30), window=st.sampled_from([4, 8, 16]),
       overlap=st.sampled_from([0.0, 0.25, 0.5, 0.75]), parts=st.integers(2, 5), seed=st.integers(0, 9))
def test_owned_rows_are_bitwise_equal_to_the_single_stitch(height, width, window, overlap, parts, seed):
    """Each rank stitches its extent's windows (the global windows of its run bands); its owned rows
    are bitwise the rows of one stitch over the whole raster, NaN where every window was invalid."""
    plan = plan_tiles(height, width, window, overlap)
    rng = np.random.default_rng(seed)
    logits = [rng.standard_normal((2, window, window)).astype(np.float32) * 10 for _ in plan.windows]
    valid = [rng.random((window, window)) > 0.2 for _ in plan.windows]
    full, strips = _stitch(plan, logits, valid)
    assert strips == stitch_strips(plan)
    ncols = len(plan.col_starts)
    for s in split_rows(plan.row_starts, plan.window, height, parts, blended=True):
        e0, e1 = s.extent
        part_plan = plan_tiles(e1 - e0, width, window, overlap)
        g0, g1 = s.run_bands[0] * ncols, s.run_bands[1] * ncols
        assert len(part_plan.windows) == g1 - g0
        part, _ = _stitch(part_plan, logits[g0:g1], valid[g0:g1])
        r0, r1 = s.rows
        np.testing.assert_array_equal(part[:, r0 - e0:r1 - e0], full[:, r0:r1])


def task_plan(task: str, height: int, width: int, window: int, patch: int, overlap: float | None):
    from types import SimpleNamespace

    return get_task(task).plan(SimpleNamespace(patch_size=patch), height, width, window, overlap)


def test_task_plans_follow_the_sinks():
    emb, unit = task_plan("embed", 300, 230, 64, 16, None)
    assert unit == 16 and (emb.raster_height, emb.raster_width, emb.window) == (19, 15, 4)
    assert emb.stride == 3  # overlap 0.25 on the token grid
    cls, unit = task_plan("classify", 300, 230, 64, 16, None)
    assert unit == 1 and cls.stride == 64 and cls.row_starts == (0, 64, 128, 192, 236)  # shifted last band
    seg, _ = task_plan("segment", 300, 230, 64, 16, None)
    assert seg.stride == 48 and seg.row_starts == (0, 48, 96, 144, 192, 236)


class _Recorder:
    """A fake backend: output of window i = (batch size, slot, the window's id)."""

    def __init__(self, dicts: bool = False):
        self.dicts = dicts

    def run(self, x):
        rows = [np.array([len(x), i, x[i, 0, 0, 0]], np.float64) for i in range(len(x))]
        return [{"v": r} for r in rows] if self.dicts else np.stack(rows)

    def describe(self):
        return "recorder"


@settings(deadline=None, max_examples=100)
@given(total=st.integers(1, 40), batch=st.integers(1, 6), data=st.data(), dicts=st.booleans())
def test_batch_aligned_backend_reproduces_size_and_slot(total, batch, data, dicts):
    g0 = data.draw(st.integers(0, total - 1))
    g1 = data.draw(st.integers(g0 + 1, total))
    ids = np.arange(total, dtype=np.float32).reshape(total, 1, 1, 1)
    rec = _Recorder(dicts)
    single = []
    for i in range(0, total, batch):  # the single-process run
        y = rec.run(ids[i:i + batch])
        single.extend(y)
    aligned = BatchAlignedBackend(rec, g0, total, batch)
    got = []
    for i in range(g0, g1, batch):  # the rank's run_inference, batches counted from its first window
        y = aligned.run(ids[i:min(i + batch, g1)])
        assert len(y) == min(i + batch, g1) - i
        got.extend(y)
    assert aligned.consumed == g1 - g0
    handed = len(range(g0, g1, batch))
    assert aligned.inner_runs <= handed + 1  # one model run per batch, one more for the last partial batch
    for g, y in zip(range(g0, g1), got):
        want = single[g]
        np.testing.assert_array_equal(y["v"] if dicts else y, want["v"] if dicts else want)


def test_dist_info_is_a_no_op_without_torchrun(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist_info() == (0, 1, False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist_info() == (0, 1, False)


def test_batch_refuses_two_inputs_writing_one_output(tmp_path, tiny_package):
    from engine.errors import SarmaeError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(SarmaeError, match="would both write"):
        run_batch([str(tmp_path / "a" / "s.tif"), str(tmp_path / "b" / "s.tif")], tmp_path / "out",
                  tiny_package("segment"))


# ---------------------------------------------------------------------------- torchrun, 2 ranks
DRIVER = textwrap.dedent("""
    import json, sys
    from engine.distributed import dist_info, dist_shutdown, run_batch, run_distributed_inference
    from engine.inference import InferenceOptions

    rank, world, _ = dist_info()
    for job in json.load(open(sys.argv[1])):
        try:
            opts = InferenceOptions(**job["options"])
            if job.get("batch"):
                res = run_batch(job["inputs"], job["output_dir"], job["model"], opts, job["suffix"])
            else:
                r = run_distributed_inference(job["inputs"], job["output"], job["model"], opts)
                res = None if r is None else r.to_dict()
            record = {"result": res, "world": world}
        except Exception as e:
            record = {"error": type(e).__name__ + ": " + str(e), "world": world}
        if rank == 0:
            json.dump(record, open(job["record"], "w"), default=str)
        else:
            json.dump(record, open(job["record"] + ".rank%d" % rank, "w"), default=str)
    dist_shutdown()
""")

H, W = 300, 230  # neither a multiple of the stride (48) nor of the patch (16): shifted last bands


def _db_raster(path: Path, height: int, width: int, seed: int, nodata_rows: int = 0, georef: str = "transform") -> str:
    from helpers.rasters import speckle, write_raster

    data = 10 * np.log10(speckle((2, height, width), seed=seed))
    data[:, :nodata_rows] = -9999.0
    write_raster(path, data.astype(np.float32), descriptions=["VV", "VH"], nodata=-9999.0, georef=georef)
    return str(path)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_package):
    """Build the inputs, run every job in one ``torchrun --nproc_per_node 2`` launch."""
    d = tmp_path_factory.mktemp("dist")
    raster = _db_raster(d / "scene.tif", H, W, seed=1)
    holey = _db_raster(d / "holey.tif", H, W, seed=2, nodata_rows=170)  # rank 0's part: all nodata
    radar = _db_raster(d / "radar.tif", 150, 120, seed=4, georef="gcps")  # GCPs in lon/lat: areas per row
    mid = _db_raster(d / "mid.tif", 200, 150, seed=3)  # detect: 4 x 3 windows, fewer than the scene's 6 x 5
    small = [_db_raster(d / f"small{i}.tif", 70 + 9 * i, 90, seed=10 + i) for i in range(3)]
    pkgs = {t: str(tiny_package(t, img_size=64)) for t in ("segment", "embed", "detect", "classify", "reconstruct")}
    (d / "exists.tif").write_bytes(b"not a real output")
    from engine.cfar import CfarConfig
    from engine.package import save_package
    from engine.tasks.cfar import cfar_card

    cfar = str(save_package(None, cfar_card(CfarConfig(guard=3, background=21)), d / "cfar.pkg"))
    jobs = {
        "segment": dict(inputs=[raster], output=str(d / "seg.tif"), model=pkgs["segment"],
                        options={"vector": True, "probabilities": True, "batch_size": 2}),
        "gcps": dict(inputs=[radar], output=str(d / "radar_seg.tif"), model=pkgs["segment"],
                     options={"batch_size": 3}),
        "holey": dict(inputs=[holey], output=str(d / "holey_seg.tif"), model=pkgs["segment"], options={}),
        "embed": dict(inputs=[raster], output=str(d / "emb.tif"), model=pkgs["embed"], options={"batch_size": 2}),
        "reconstruct": dict(inputs=[raster], output=str(d / "rec.tif"), model=pkgs["reconstruct"],
                            options={"batch_size": 2, "extent": (10, 7, 280, 200)}),
        "detect": dict(inputs=[mid], output=str(d / "det.gpkg"), model=pkgs["detect"],
                       options={"score_threshold": 0.05, "batch_size": 5}),
        "classify": dict(inputs=[raster], output=str(d / "cls.gpkg"), model=pkgs["classify"],
                         options={"batch_size": 7, "extent": (5, 3, 290, 220)}),
        "batch": dict(batch=True, inputs=small, output_dir=str(d / "batch"), suffix="_seg", model=pkgs["segment"],
                      options={}),
        "exists": dict(inputs=[raster], output=str(d / "exists.tif"), model=pkgs["segment"], options={}),
        "cfar": dict(inputs=[raster], output=str(d / "cfar.gpkg"), model=cfar, options={}),
        "cfar_batch": dict(batch=True, inputs=small, output_dir=str(d / "cfar_batch"), suffix="_cfar", model=cfar,
                           options={}),
    }
    for name, job in jobs.items():
        job["record"] = str(d / f"{name}.json")
    (d / "jobs.json").write_text(json.dumps(list(jobs.values())))
    (d / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(d / "driver.py"), str(d / "jobs.json")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        # seen once in three full suites on a loaded 2-core machine: rank 0 aborted at interpreter exit
        # ("terminate called without an active exception", SIGABRT) after every job's record was written;
        # that is reported as a warning and the outputs are still compared below; any other failure fails
        every_record = all(Path(job["record"]).is_file() and Path(job["record"] + ".rank1").is_file()
                           for job in jobs.values())
        assert every_record and "terminate called without an active exception" in proc.stderr, proc.stderr[-4000:]
        warnings.warn("torchrun: a rank aborted at exit after writing every record (SIGABRT in teardown): "
                      + proc.stderr.strip().splitlines()[0][:200], RuntimeWarning, stacklevel=1)
    records = {name: json.loads(Path(job["record"]).read_text()) for name, job in jobs.items()}
    ranks1 = {name: json.loads(Path(job["record"] + ".rank1").read_text()) for name, job in jobs.items()}
    return d, jobs, records, ranks1, pkgs


def _single(job: dict, output: Path):
    """The reference: the job's run_inference in this process, on one torch thread like each rank."""
    import torch

    from engine.inference import InferenceOptions, run_inference

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_inference(job["inputs"], output, job["model"], InferenceOptions(**job["options"]))
    finally:
        torch.set_num_threads(threads)


def _read(path):
    with rasterio.open(path) as src:
        gcps, gcp_crs = src.gcps
        return src.read(), src.profile, src.tags(), (src.descriptions, [(g.row, g.col, g.x, g.y) for g in gcps], gcp_crs)


def _assert_same_raster(a, b):
    xa, pa, ta, da = _read(a)
    xb, pb, tb, db = _read(b)
    np.testing.assert_array_equal(xa, xb)  # bitwise; NaN == NaN here
    assert xa.dtype == xb.dtype
    for k in set(pa) | set(pb):
        if k != "nodata":
            assert pa.get(k) == pb.get(k), k
    assert (pa["nodata"] == pb["nodata"]) or (np.isnan(pa["nodata"]) and np.isnan(pb["nodata"]))
    assert ta == tb and da == db


def _features(path):
    import fiona

    with fiona.open(path) as src:
        return [(dict(f["properties"]), f["geometry"]["coordinates"]) for f in src], src.crs, src.schema, src.name


def _no_part_files(d: Path):
    assert not [p.name for p in d.rglob(".*")], "part or temporary files were left behind"


@pytest.mark.slow
def test_segment_equals_single_process(launched, tmp_path):
    d, jobs, records, ranks1, pkgs = launched
    rec = records["segment"]
    assert rec["world"] == 2 and "error" not in rec, rec
    assert ranks1["segment"]["result"] is None  # only rank 0 returns the merged result
    res = rec["result"]
    ref = _single(jobs["segment"], tmp_path / "seg.tif")
    for role in ("class", "confidence", "probabilities"):
        _assert_same_raster(res["outputs"][role], ref.outputs[role])
    with rasterio.open(res["outputs"]["class"]) as a, rasterio.open(ref.outputs["class"]) as b:
        assert a.colormap(1) == b.colormap(1)
    ref_stats = dict(ref.statistics)
    got_stats = dict(res["statistics"])
    ref_vec, got_vec = ref_stats.pop("vectors"), got_stats.pop("vectors")
    assert got_stats == ref_stats  # pixel counts, areas and mean confidences: exactly equal
    ref_vec.pop("layer"), got_vec.pop("layer")
    assert got_vec == ref_vec
    fa, crs_a, schema_a, _ = _features(res["outputs"]["vectors"])
    fb, crs_b, schema_b, _ = _features(ref.outputs["vectors"])
    assert fa == fb and crs_a == crs_b and schema_a == schema_b
    assert res["provenance"]["distributed"]["world_size"] == 2
    _no_part_files(d)


@pytest.mark.slow
def test_segment_of_a_raster_georeferenced_by_gcps(launched, tmp_path):
    _, jobs, records, _, _ = launched
    rec = records["gcps"]
    assert "error" not in rec, rec
    ref = _single(jobs["gcps"], tmp_path / "radar.tif")
    for role in ("class", "confidence"):
        _assert_same_raster(rec["result"]["outputs"][role], ref.outputs[role])
    assert rec["result"]["statistics"] == ref.statistics  # areas summed per row (cos latitude), same order


@pytest.mark.slow
def test_a_rank_whose_part_is_all_nodata(launched, tmp_path):
    d, jobs, records, _, pkgs = launched
    rec = records["holey"]
    assert "error" not in rec, rec
    ranks = rec["result"]["provenance"]["distributed"]["ranks"]
    assert ranks[0]["rows_px"][1] <= 170  # rank 0's rows (and extent) are all nodata
    ref = _single(jobs["holey"], tmp_path / "holey.tif")
    for role in ("class", "confidence"):
        _assert_same_raster(rec["result"]["outputs"][role], ref.outputs[role])
    assert rec["result"]["statistics"] == ref.statistics


@pytest.mark.slow
def test_embed_equals_single_process(launched, tmp_path):
    _, jobs, records, _, pkgs = launched
    rec = records["embed"]
    assert "error" not in rec, rec
    ref = _single(jobs["embed"], tmp_path / "emb.tif")
    _assert_same_raster(rec["result"]["outputs"]["embedding"], ref.outputs["embedding"])
    assert rec["result"]["statistics"] == ref.statistics
    # the PCA preview is fitted to the float16 values read back: colours within one level
    a, *_ = _read(rec["result"]["outputs"]["pca"])
    b, *_ = _read(ref.outputs["pca"])
    diff = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == b.shape and diff.max() <= 1 and (diff == 0).mean() > 0.9
    assert ((a == 0) == (b == 0)).all()  # the same nodata cells


@pytest.mark.slow
def test_reconstruct_equals_single_process(launched, tmp_path):
    """Reconstruct draws random masks per batch: equal because each window keeps its batch size and slot.
    The run is restricted to an extent (offsets of the parts' extents and of the georeferencing)."""
    _, jobs, records, _, pkgs = launched
    rec = records["reconstruct"]
    assert "error" not in rec, rec
    ref = _single(jobs["reconstruct"], tmp_path / "rec.tif")
    _assert_same_raster(rec["result"]["outputs"]["reconstruction"], ref.outputs["reconstruction"])


@pytest.mark.slow
def test_detect_equals_single_process(launched, tmp_path):
    _, jobs, records, _, pkgs = launched
    rec = records["detect"]
    assert "error" not in rec, rec
    ref = _single(jobs["detect"], tmp_path / "det.gpkg")
    fa, crs_a, schema_a, name_a = _features(rec["result"]["outputs"]["detections"])
    fb, crs_b, schema_b, name_b = _features(ref.outputs["detections"])
    assert len(fb) > 100  # NMS across windows had work to do
    assert (crs_a, schema_a, name_a) == (crs_b, schema_b, name_b)
    assert rec["result"]["statistics"] == ref.statistics
    # the same boxes, coordinates bitwise, in the same order (parts skip NMS: nms_iou >= 1)
    assert fa == fb


@pytest.mark.slow
def test_classify_equals_single_process(launched, tmp_path):
    _, jobs, records, _, pkgs = launched
    rec = records["classify"]
    assert "error" not in rec, rec
    ref = _single(jobs["classify"], tmp_path / "cls.gpkg")
    assert _features(rec["result"]["outputs"]["grid"]) == _features(ref.outputs["grid"])
    assert rec["result"]["statistics"] == ref.statistics


@pytest.mark.slow
def test_batch_of_three_rasters_on_two_ranks(launched, tmp_path):
    d, jobs, records, ranks1, pkgs = launched
    rec = records["batch"]
    assert "error" not in rec, rec
    assert ranks1["batch"]["result"] is None
    items = rec["result"]
    assert [r["index"] for r in items] == [0, 1, 2] and [r["rank"] for r in items] == [0, 1, 0]
    for item, src in zip(items, jobs["batch"]["inputs"]):
        assert item["error"] is None
        assert item["output"] == str(d / "batch" / f"{Path(src).stem}_seg.tif")
        ref = _single({**jobs["batch"], "inputs": [src]}, tmp_path / f"{Path(src).stem}.tif")
        _assert_same_raster(item["result"]["outputs"]["class"], ref.outputs["class"])
        _assert_same_raster(item["result"]["outputs"]["confidence"], ref.outputs["confidence"])
    _no_part_files(d)


@pytest.mark.slow
def test_a_refused_output_fails_on_every_rank(launched):
    d, _, records, ranks1, _ = launched
    assert records["exists"]["error"].startswith("OutputError") and "already exists" in records["exists"]["error"]
    assert ranks1["exists"]["error"].startswith("OutputError") and "rank 0" in ranks1["exists"]["error"]
    assert (d / "exists.tif").read_bytes() == b"not a real output"


@pytest.mark.slow
def test_cfar_is_refused_by_torchrun_but_runs_in_a_batch(launched, tmp_path):
    """CFAR reads whole rasters by strips: a torchrun split is refused with a sentence on every rank,
    while run_batch gives each rank whole rasters (the same boxes as one process)."""
    d, jobs, records, ranks1, _ = launched
    for rec in (records["cfar"], ranks1["cfar"]):
        assert rec["error"].startswith("SarmaeError") and "not split over torchrun ranks" in rec["error"], rec
    assert not (d / "cfar.gpkg").exists()
    items = records["cfar_batch"]["result"]
    assert [r["rank"] for r in items] == [0, 1, 0] and all(r["error"] is None for r in items)
    for item, src in zip(items, jobs["cfar_batch"]["inputs"]):
        ref = _single({**jobs["cfar_batch"], "inputs": [src]}, tmp_path / f"{Path(src).stem}.gpkg")
        assert _features(item["result"]["outputs"]["detections"]) == _features(ref.outputs["detections"])
