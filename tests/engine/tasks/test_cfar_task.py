"""CFAR as the detect task's method ``cfar``: a package with no weights made by ``sarmae init``, shown
by ``sarmae info``, run by ``sarmae infer``, ``run_inference`` and the worker like any detector
(same GeoPackage layer and result record), with water masks (a raster, or a segmentation package
run first) and bad input reported as one clean message, never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.rasters import write_raster

from engine.cli import main
from engine.errors import PackageError, SarmaeError
from engine.inference import InferenceOptions, run_inference
from engine.tasks import get_task, method_names, task_names

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(180)


# ------------------------------------------------------------------------------------ data
def ship_scene(path: Path, h: int = 256, w: int = 320, seed: int = 0, gap: tuple[int, int] | None = None):
    """Dual-pol dB scene: single-look sea at -20 dB (VH 7 dB lower), 12 ships of 3-6 x 5-12 px at
    about 0 dB (4-look speckle), on a 20 m grid; ``gap``: rows (start, end) of nodata. Returns
    (path, ship boxes x0, y0, x1, y1 in px)."""
    rng = np.random.default_rng(seed)
    power = rng.exponential(0.01, (h, w))
    boxes = []
    for k in range(12):
        r, c = 30 + (k // 4) * 70 + int(rng.integers(0, 20)), 30 + (k % 4) * 70 + int(rng.integers(0, 20))
        bh, bw = int(rng.integers(3, 7)), int(rng.integers(5, 13))
        power[r:r + bh, c:c + bw] = rng.gamma(4.0, 0.25, (bh, bw))
        boxes.append((c, r, c + bw, r + bh))
    db = 10 * np.log10(np.stack([power, power * 0.2]))
    if gap:
        db[:, gap[0]:gap[1]] = -9999.0
    return write_raster(path, db.astype(np.float32), descriptions=["VV", "VH"],
                        nodata=-9999.0 if gap else None), np.asarray(boxes, float)


def read_boxes(gpkg: str) -> tuple[np.ndarray, list[dict]]:
    import fiona

    with fiona.open(gpkg, layer="detections") as src:
        props = [dict(f["properties"]) for f in src]
    b = np.asarray([(p["px_col"], p["px_row"], p["px_col"] + p["px_width"], p["px_row"] + p["px_height"])
                    for p in props], float).reshape(-1, 4)
    return b, props


def matched(found: np.ndarray, truth: np.ndarray, iou: float = 0.3) -> tuple[int, int]:
    """(ships found, false alarms) with IoU >= ``iou``."""
    if not len(found):
        return 0, 0
    x0, y0 = np.maximum(found[:, None, 0], truth[None, :, 0]), np.maximum(found[:, None, 1], truth[None, :, 1])
    x1, y1 = np.minimum(found[:, None, 2], truth[None, :, 2]), np.minimum(found[:, None, 3], truth[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    m = inter / (area(found)[:, None] + area(truth)[None, :] - inter) >= iou
    return int(m.any(axis=0).sum()), int((~m.any(axis=1)).sum())


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, command: str, *words: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"sarmae {command}: error: ")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return ship_scene(tmp_path_factory.mktemp("scene") / "ships_db.tif")


@pytest.fixture(scope="module")
def cfar_pkg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfar") / "cfar.pkg"
    assert main(["init", "--task", "detect", "--method", "cfar", "--pfa", "1e-6", "--guard", "7", "--background",
                 "41", "--classes", "ship", "--output", str(path)]) == 0
    return path


# ------------------------------------------------------------------------------------ registry and card
def test_cfar_is_a_method_of_detect_not_a_task():
    cfar = get_task("detect", "cfar")
    assert (cfar.name, cfar.method, cfar.key()) == ("detect", "cfar", "detect.cfar")
    assert not cfar.needs_weights and not cfar.windowed and cfar.vector_output
    assert get_task("detect", "vit_tiny_patch16") is get_task("detect")  # an architecture, not a method
    assert "detect.cfar" not in task_names() and method_names("detect") == ["cfar", "cfar_scored"]


def test_init_writes_model_json_alone_and_info_prints_the_settings(cfar_pkg, capsys):
    from engine.package import load_package, read_card

    assert sorted(p.name for p in cfar_pkg.iterdir()) == ["model.json"]
    card = read_card(cfar_pkg)
    assert (card.task, card.architecture.name, card.architecture.encoder, card.input) == ("detect", "cfar", None, None)
    assert card.weights == {} and card.class_names == ["ship"] and card.architecture["cfar"]["pfa"] == 1e-6
    assert load_package(cfar_pkg).model_loaded is False  # nothing to load, and no error
    rc, out, _ = cli(capsys, "info", cfar_pkg, "--verify")
    assert rc == 0
    assert "method:        cfar (no network, no weights)" in out
    assert "cell averaging (CA), pfa 1e-06" in out and "guard 7 px, background 41 px" in out
    assert "nothing to verify" in out


def test_a_cfar_card_is_checked_and_has_no_weights_to_load(cfar_pkg, tmp_path):
    from engine.package import load_state_dict, read_card

    d = json.loads((cfar_pkg / "model.json").read_text())
    for change, words in (({"pfa": 2.0}, "pfa=2.0 is outside (0, 1)"), ({"guard": 50.0}, "guard window"),
                          ({"colour": 1}, "unknown CFAR settings")):
        bad = tmp_path / f"bad{len(words)}"
        bad.mkdir()
        (bad / "model.json").write_text(json.dumps({**d, "architecture": {"name": "cfar", "cfar": {
            **d["architecture"]["cfar"], **change}}}))
        with pytest.raises(PackageError, match=re.escape(words)) as e:
            read_card(bad)
        assert str(bad / "model.json") in str(e.value)
    two = tmp_path / "two"
    two.mkdir()
    (two / "model.json").write_text(json.dumps({**d, "classes": [{"name": "a"}, {"name": "b"}]}))
    with pytest.raises(PackageError, match="one class"):
        read_card(two)
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "model.json").write_text(json.dumps({**d, "architecture": {"name": "cfar"}}))
    with pytest.raises(PackageError, match="'architecture.cfar'.*missing.*sarmae init --task detect --method cfar"):
        read_card(gone)
    with pytest.raises(PackageError, match="without a network.*no weights to load, fine-tune or export"):
        load_state_dict(cfar_pkg)


# ------------------------------------------------------------------------------------ runs
def test_infer_finds_the_ships_on_a_db_scene(cfar_pkg, scene, tmp_path, capsys):
    raster, truth = scene
    out = tmp_path / "ships.gpkg"
    rc, stdout, err = cli(capsys, "infer", "-m", cfar_pkg, "-i", raster, "-o", out, "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["task"] == "detect" and res["outputs"] == {"detections": str(out)}
    found, props = read_boxes(res["outputs"]["detections"])
    hits, false_alarms = matched(found, truth)
    assert hits >= 11 and false_alarms <= 2, (hits, false_alarms, found)  # recall > 0.9
    assert res["statistics"]["detections"] == len(found) == res["statistics"]["per_class"]["ship"]
    assert res["statistics"]["area_km2"] == pytest.approx(256 * 320 * 400 / 1e6)
    assert {p["class_name"] for p in props} == {"ship"} and all(0 <= p["score"] < 1 for p in props)
    assert all(p["area_m2"] == p["pixels"] * 400 for p in props)
    assert "dB" in res["provenance"]["input_units"] and "CFAR CA" in res["provenance"]["backend"]
    assert res["provenance"]["model_sha256"] is None
    assert any("converted to linear power" in line for line in res["log"])


def test_windows_in_metres_give_the_pixel_windows_boxes(cfar_pkg, scene, tmp_path):
    from engine.cfar import CfarConfig
    from engine.package import save_package
    from engine.tasks.cfar import cfar_card

    raster, _ = scene
    metres = tmp_path / "metres.pkg"  # 20 m pixels: 140 m -> 7 px, 820 m -> 41 px
    save_package(None, cfar_card(CfarConfig(guard=140, background=820, window_units="m", min_area=800), "ship"),
                 metres)
    a = run_inference(str(raster), tmp_path / "px.gpkg", cfar_pkg, InferenceOptions())
    b = run_inference(str(raster), tmp_path / "m.gpkg", metres, InferenceOptions())
    assert np.array_equal(read_boxes(a.outputs["detections"])[0], read_boxes(b.outputs["detections"])[0])


def test_score_threshold_is_the_packages_unless_the_run_gives_one(cfar_pkg, scene, tmp_path):
    raster, _ = scene
    every = run_inference(str(raster), tmp_path / "a.gpkg", cfar_pkg, InferenceOptions())
    strict = run_inference(str(raster), tmp_path / "b.gpkg", cfar_pkg, InferenceOptions(score_threshold=0.99))
    scores = [p["score"] for p in read_boxes(every.outputs["detections"])[1]]
    assert every.statistics["cfar"]["score_threshold"] == 0.0
    assert strict.statistics["detections"] == sum(s >= 0.99 for s in scores) < len(scores)


def test_water_mask_raster_keeps_the_boxes_on_water_and_says_when_there_is_none(cfar_pkg, scene, tmp_path):
    raster, truth = scene
    mask = np.zeros((256, 320), np.uint8)
    mask[:, :160] = 1  # water on the left half
    m = write_raster(tmp_path / "water.tif", mask)
    res = run_inference(str(raster), tmp_path / "w.gpkg", cfar_pkg, InferenceOptions(water_mask=str(m)))
    found, _ = read_boxes(res.outputs["detections"])
    assert len(found) and (found[:, 2] <= 160).all()
    assert matched(found, truth[truth[:, 2] <= 150])[0] == int((truth[:, 2] <= 150).sum())
    land = write_raster(tmp_path / "land.tif", np.zeros((256, 320), np.uint8))
    res = run_inference(str(raster), tmp_path / "l.gpkg", cfar_pkg, InferenceOptions(water_mask=str(land)))
    assert res.statistics["detections"] == 0 and "has no water" in res.statistics["warnings"][0]
    assert any("has no water" in line for line in res.log)
    assert Path(res.outputs["detections"]).is_file()  # an empty layer, as for any detector that found nothing


def test_water_mask_from_a_segmentation_package_run_first(cfar_pkg, scene, tmp_path, tiny_package):
    import rasterio

    raster, _ = scene
    seg = tiny_package("segment", classes=("land", "sea"))
    res = run_inference(str(raster), tmp_path / "s.gpkg", cfar_pkg,
                        InferenceOptions(water_mask=str(seg), threads=1))
    assert any("its class 'sea' is water" in line for line in res.log)
    classes = run_inference(str(raster), tmp_path / "classes.tif", seg, InferenceOptions(threads=1))
    with rasterio.open(classes.outputs["class"]) as src:
        sea = src.read(1) == 1
    found, _ = read_boxes(res.outputs["detections"])
    cy, cx = ((found[:, 1] + found[:, 3]) / 2).astype(int), ((found[:, 0] + found[:, 2]) / 2).astype(int)
    assert sea[cy, cx].all()  # every box lies on what the package calls sea
    assert res.statistics["valid_pixels"] == int(sea.sum())  # the mask IS the package's sea (no box proves nothing)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # its class raster was removed
    other = tiny_package("segment", classes=("dark", "bright"))
    with pytest.raises(SarmaeError, match=r"none of its classes \(dark, bright\).*--water-class NAME"):
        run_inference(str(raster), tmp_path / "x.gpkg", cfar_pkg, InferenceOptions(water_mask=str(other)))
    res = run_inference(str(raster), tmp_path / "y.gpkg", cfar_pkg,
                        InferenceOptions(water_mask=str(other), water_class="dark", threads=1))
    assert any("its class 'dark' is water" in line for line in res.log)


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_clean_cli_message(cfar_pkg, scene, tmp_path, capsys):
    raster, _ = scene
    rc, _, err = cli(capsys, "init", "--task", "detect", "--method", "cfar", "--pfa", "2", "-o", tmp_path / "p")
    assert rc == 2
    one_line_error(err, "init", "pfa=2.0 is outside (0, 1)")
    rc, _, err = cli(capsys, "init", "--task", "segment", "--method", "cfar", "-o", tmp_path / "p")
    one_line_error(err, "init", "task 'segment' has no such method")
    rc, _, err = cli(capsys, "init", "--task", "detect", "--method", "cfar", "--units", "m", "-o", tmp_path / "p")
    one_line_error(err, "init", "--units m needs --guard and --background")
    small = write_raster(tmp_path / "small.tif", np.full((30, 30), -20.0, np.float32))
    rc, _, err = cli(capsys, "infer", "-m", cfar_pkg, "-i", small, "-o", tmp_path / "s.gpkg", "-q")
    assert rc == 2
    one_line_error(err, "infer", "small.tif", "background window (41 x 41 px) is larger than the raster")
    rc, _, err = cli(capsys, "infer", "-m", cfar_pkg, "-i", raster, "-o", tmp_path / "d.gpkg", "-q",
                     "--input-units", "linear_power")
    one_line_error(err, "infer", "ships_db.tif", "look like dB values", "Give input units 'db'")
    rc, _, err = cli(capsys, "infer", "-m", cfar_pkg, "-i", raster, "-o", tmp_path / "e.gpkg", "-q",
                     "--extent", "0", "0", "100", "100")
    one_line_error(err, "infer", "does not take an extent", "gdal_translate -srcwin")
    rc, _, err = cli(capsys, "export", cfar_pkg)
    one_line_error(err, "export", "no weights to load, fine-tune or export")
    assert not list(tmp_path.glob("*.gpkg"))


def test_nodata_inside_the_background_window_is_left_out_of_the_statistics(cfar_pkg, tmp_path):
    raster, truth = ship_scene(tmp_path / "gap.tif", gap=(85, 95))  # within 20 rows of the second row of ships
    res = run_inference(str(raster), tmp_path / "g.gpkg", cfar_pkg, InferenceOptions())
    found, _ = read_boxes(res.outputs["detections"])
    assert res.statistics["valid_pixels"] == (256 - 10) * 320
    hits, false_alarms = matched(found, truth)
    assert hits == len(truth) and false_alarms <= 2  # nodata read as 0 power would lower the background


# ------------------------------------------------------------------------------------ the worker
class Worker:
    """``python -m engine.serve`` as a subprocess: one request at a time, its events until the last."""

    def __init__(self, tmp: Path):
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.log = open(tmp / "worker.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.serve"], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        assert json.loads(self.proc.stdout.readline())["event"] == "hello"

    def send(self, **req) -> None:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def until(self, rid: str, events: tuple[str, ...] = ("result", "error")) -> list[dict]:
        """Events up to the first of ``events`` for ``rid`` (others' events included)."""
        seen = []
        while True:
            line = self.proc.stdout.readline()
            assert line, f"the worker died: {Path(self.log.name).read_text()}"
            seen.append(json.loads(line))
            if seen[-1].get("id") == rid and seen[-1]["event"] in events:
                return seen

    def request(self, **req) -> list[dict]:
        self.send(**req)
        return self.until(req["id"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)
        self.log.close()


def test_worker_runs_cfar_like_any_detector_and_reports_bad_input(cfar_pkg, scene, tmp_path):
    raster, truth = scene
    w = Worker(tmp_path)
    try:
        info = w.request(id="i", type="model_info", package=str(cfar_pkg))[-1]
        assert info["event"] == "result" and "pfa 1e-06" in info["result"]["summary"]
        verified = w.request(id="v", type="model_info", package=str(cfar_pkg), verify=True)[-1]
        assert verified["event"] == "result" and verified["result"]["files"] == {}  # nothing to verify, as the CLI
        run = {"type": "run", "task": "infer", "model": str(cfar_pkg)}
        events = w.request(id="r", inputs=[str(raster)], output=str(tmp_path / "w.gpkg"), options={}, **run)
        last = events[-1]
        assert last["event"] == "result", last
        assert last["cache"] == {"package": "miss", "backend": "none"}
        assert matched(read_boxes(last["result"]["outputs"]["detections"])[0], truth)[0] >= 11
        assert [e["fraction"] for e in events if e["event"] == "progress"][-1] == 1.0
        small = write_raster(tmp_path / "small.tif", np.full((30, 30), -20.0, np.float32))
        for rid, inp, opts, words in (
                ("small", small, {}, "larger than the raster"),
                ("db", raster, {"input_units": "linear_power"}, "look like dB values"),
                ("pfa", raster, {"nms_iou": 0.0}, "--nms-iou 0.0: must be above 0")):
            err = w.request(id=rid, inputs=[str(inp)], output=str(tmp_path / f"{rid}.gpkg"), options=opts, **run)[-1]
            assert err["event"] == "error" and err["error"]["code"] == "failed", err
            assert words in err["error"]["message"] and "traceback" not in err["error"]
        again = w.request(id="r2", inputs=[str(raster)], output=str(tmp_path / "w2.gpkg"), options={}, **run)[-1]
        assert again["event"] == "result" and again["cache"]["package"] == "hit"
        big = write_raster(tmp_path / "big.tif", 10 * np.log10(np.random.default_rng(3).exponential(
            0.01, (4096, 1024))).astype(np.float32))
        w.send(id="big", inputs=[str(big)], output=str(tmp_path / "big.gpkg"), options={"threads": 1}, **run)
        w.until("big", ("progress",))
        w.send(id="stop", type="cancel", target="big")
        last = w.until("big")[-1]
        assert last["event"] == "error" and last["error"]["cancelled"] is True, last
        assert not [p.name for p in tmp_path.iterdir() if "big." in p.name and p.suffix != ".tif"]
    finally:
        w.close()
