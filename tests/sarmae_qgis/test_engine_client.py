"""The plugin's engine client against a real engine worker: info, runs with progress, cancel,
a worker killed mid-run (readable error, next request restarts it), protocol mismatch."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from sarmae_qgis.engine_client import EngineClient, EngineError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from engine.cli import main as sarmae

    d = tmp_path_factory.mktemp("client")
    assert sarmae(["init", "--task", "segment", "--classes", "water,land", "--in-chans", "2", "--img-size", "32",
                   "--output", str(d / "seg.pkg")]) == 0
    rng = np.random.default_rng(0)

    def scene(name, size):
        path = d / name
        with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=2, dtype="float32",
                           crs="EPSG:32631", transform=from_origin(500000, 4500000, 10, 10)) as dst:
            dst.write(rng.normal(-15, 3, (2, size, size)).astype(np.float32))
            dst.set_band_description(1, "VV")
            dst.set_band_description(2, "VH")
        return path

    return {"pkg": d / "seg.pkg", "small": scene("small.tif", 96), "big": scene("big.tif", 1200), "dir": d}


@pytest.fixture()
def client():
    c = EngineClient(python=sys.executable, env={"OMP_NUM_THREADS": "1"})
    yield c
    c.shutdown()


def test_info_and_model_info(client, assets):
    info = client.info()
    assert info["protocol"] == 1 and "torch" in info["versions"]
    card = client.model_info(str(assets["pkg"]))
    assert card["card"]["task"] == "segment" and "water" in card["summary"]


def test_run_with_progress(client, assets, tmp_path):
    seen = []
    res = client.run_inference([str(assets["small"])], str(tmp_path / "out.tif"), str(assets["pkg"]),
                               {"batch_size": 4}, on_progress=lambda f, m: seen.append((f, m)))
    assert Path(res["outputs"]["class"]).exists()
    assert any(f >= 0 for f, _ in seen) and any(f < 0 for f, _ in seen)  # progress and log lines


def test_cancel_leaves_nothing(client, assets, tmp_path):
    started = time.monotonic()
    with pytest.raises(EngineError) as e:
        client.run_inference([str(assets["big"])], str(tmp_path / "big.tif"), str(assets["pkg"]), {"batch_size": 1},
                             is_cancelled=lambda: time.monotonic() - started > 2.0)
    assert e.value.cancelled
    assert not list(tmp_path.iterdir())
    assert client.info()["protocol"] == 1  # the worker is still there


def test_worker_killed_mid_run_then_restarted(client, assets, tmp_path):
    """A worker killed while writing: a readable error, a new worker for the next request, and the
    hidden temporaries the dead one left removed by the new one (issue 15, item 4)."""
    client.start()
    pid = client.proc.pid
    out_dir, other = tmp_path / "out", tmp_path / "other"
    out_dir.mkdir()
    other.mkdir()

    def kill_when_writing():
        deadline = time.monotonic() + 120
        while not any(".tmp" in n for n in os.listdir(out_dir)) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_writing, daemon=True)
    killer.start()
    with pytest.raises(EngineError, match="stopped unexpectedly") as e:
        client.run_inference([str(assets["big"])], str(out_dir / "big.tif"), str(assets["pkg"]), {"batch_size": 1})
    killer.join()
    assert e.value.kind == "died"
    assert not (out_dir / "big.tif").exists()
    assert any(".tmp" in n for n in os.listdir(out_dir))  # the dead worker's partial files
    said = []
    res = client.run_inference([str(assets["small"])], str(other / "again.tif"), str(assets["pkg"]),
                               on_progress=lambda f, m: said.append(m))
    assert Path(res["outputs"]["class"]).exists() and client.restarts == 1 and client.proc.pid != pid
    assert os.listdir(out_dir) == []
    assert any("left in" in m and "by the engine that stopped" in m for m in said), said


def test_engine_errors_are_readable(client, tmp_path):
    with pytest.raises(EngineError, match="not found"):
        client.run_inference([str(tmp_path / "missing.tif")], str(tmp_path / "o.tif"), str(tmp_path / "nope.pkg"))


def test_bad_interpreter():
    with pytest.raises(EngineError, match="cannot start the engine"):
        EngineClient(python="/nonexistent/python").info()


def test_a_throwaway_worker_leaves_no_unclosed_file():
    """Settings > Test engine starts a worker, asks info, shuts it down: no ResourceWarning
    (issue 16, item 8: five 'unclosed file' warnings were logged)."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        c = EngineClient(python=sys.executable, env={"OMP_NUM_THREADS": "1"})
        assert c.info()["protocol"] == 1
        c.shutdown(timeout=20)
        deadline = time.monotonic() + 5
        while any(not f.closed for f in (c.proc.stdout, c.proc.stderr)) and time.monotonic() < deadline:
            time.sleep(0.05)  # the reader threads close stdout/stderr at the end of the stream
        del c
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
