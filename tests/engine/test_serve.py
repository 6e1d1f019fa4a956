"""The engine worker (``python -m engine.serve``) driven as a real subprocess over JSON lines.

Covers the protocol helpers in-process (fast), then the worker: hello, info, model_info, a full run
with progress and a cached model, busy + cancel on a large raster (nothing left on disk), bad input
that never kills the worker, shutdown / EOF / SIGTERM exits, and SIGKILL mid-run (no output under
its final name).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.rasters import write_raster

from engine import protocol as P

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


# --- protocol helpers (in-process) ---------------------------------------------------------------

def test_parse_request_normalises_a_run():
    req = P.parse_request('{"id": "r1", "type": "run", "task": "infer", "inputs": "a.tif", "output": "o.tif",'
                          ' "model": "pkg"}')
    assert (req.id, req.type) == ("r1", "run")
    assert req.get("inputs") == ["a.tif"] and req.get("options") == {}


@pytest.mark.parametrize("line, rid, words", [
    ("not json", None, "malformed JSON"),
    ("[1, 2]", None, "JSON object"),
    ('{"type": "info"}', None, "'id'"),
    ('{"id": "x", "type": "fly"}', "x", "unknown request type 'fly'"),
    ('{"id": "x", "type": "model_info"}', "x", "missing the field 'package'"),
    ('{"id": "x", "type": "cancel", "target": 3}', "x", "'target' must be a string"),
    ('{"id": "x", "type": "run", "task": "infer", "inputs": [], "output": "o", "model": "m"}', "x", "non-empty"),
])
def test_parse_request_errors_say_what_is_wrong(line, rid, words):
    with pytest.raises(P.ProtocolError, match=words) as info:
        P.parse_request(line)
    assert info.value.request_id == rid


def test_encode_is_one_strict_ascii_json_line():
    line = P.encode(P.result("r", {"nan": float("nan"), "n": np.int64(3), "a": np.arange(2), "p": Path("x"),
                                   "t": (1, 2), "s": "é"}))
    assert "\n" not in line and line.isascii()
    assert json.loads(line)["result"] == {"nan": None, "n": 3, "a": [0, 1], "p": "x", "t": [1, 2], "s": "é"}


# --- the worker as a subprocess ------------------------------------------------------------------

class Worker:
    """A ``python -m engine.serve`` subprocess; a thread queues every stdout line as a parsed event."""

    def __init__(self, tmp: Path):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.stderr = open(tmp / f"worker-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--log-level", "INFO"], cwd=REPO,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, encoding="utf-8")
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.hello = self.next(timeout=30)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(P.decode(line))  # anything that is not a protocol line fails here, loudly
        self.events.put(None)

    def send(self, **request: Any) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def send_raw(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float = 30) -> dict:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout} s; worker stderr:\n{self.log()}") from None
        assert event is not None, f"the worker closed stdout; stderr:\n{self.log()}"
        return event

    def until(self, rid: str | None, timeout: float = 30) -> list[dict]:
        """Events of ``rid`` up to and including its result/error (events of other ids are kept too)."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            event = self.next(max(0.1, deadline - time.monotonic()))
            seen.append(event)
            if event.get("id") == rid and event["event"] in ("result", "error"):
                return seen

    def request(self, timeout: float = 30, **request: Any) -> dict:
        self.send(**request)
        return self.until(request.get("id"), timeout)[-1]

    def log(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.stderr.close()


@pytest.fixture
def worker(tmp_path):
    w = Worker(tmp_path)
    yield w
    w.close()


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pkg") / "water64"
    subprocess.run([sys.executable, "-m", "engine.cli", "init", "--task", "segment", "--classes", "water,land",
                    "--in-chans", "2", "--img-size", "64", "--output", str(path)], cwd=REPO, check=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    return path


def db_raster(path: Path, height: int, width: int) -> Path:
    power = np.random.default_rng(1).exponential(0.05, (2, height, width)).astype(np.float32)
    return write_raster(path, 10 * np.log10(power + 1e-6), descriptions=["VV", "VH"], blocksize=256)


@pytest.fixture(scope="module")
def small_raster(tmp_path_factory) -> Path:
    return db_raster(tmp_path_factory.mktemp("small") / "s1_small.tif", 150, 200)


@pytest.fixture(scope="module")
def big_raster(tmp_path_factory) -> Path:
    return db_raster(tmp_path_factory.mktemp("big") / "s1_big.tif", 2000, 2000)


def run_request(rid: str, raster: Path, out: Path, package: Path, **options: Any) -> dict:
    return {"id": rid, "type": "run", "task": "infer", "inputs": [str(raster)], "output": str(out),
            "model": str(package), "options": options}


def start_big_run(worker: Worker, rid: str, raster: Path, out: Path, package: Path) -> None:
    """Start a long run (batch 1) and wait until it reports its first progress."""
    worker.send(**run_request(rid, raster, out, package, batch_size=1, threads=1))
    while True:
        event = worker.next(60)
        assert event["event"] in ("log", "progress"), event
        if event["event"] == "progress":
            return


def test_hello_and_info(worker):
    assert worker.hello["event"] == "hello" and worker.hello["protocol"] == P.PROTOCOL_VERSION
    assert worker.hello["pid"] == worker.proc.pid and worker.hello["engine_version"]
    event = worker.request(id="i1", type="info")
    assert event["event"] == "result" and event["id"] == "i1"
    info = event["result"]
    assert {"torch", "onnxruntime", "rasterio", "gdal", "numpy"} <= set(info["versions"])
    assert all(info["versions"][k] for k in ("torch", "onnxruntime", "rasterio", "gdal"))
    assert info["devices"][0]["name"] == "cpu" and info["devices"][0]["available"] is True
    assert {d["name"].split(":")[0] for d in info["devices"]} >= {"cpu", "cuda", "mps"}
    assert isinstance(info["gpu_usable"], bool) and info["loaded_models"] == [] and info["active_run"] is None


def test_model_info(worker, package, tmp_path):
    event = worker.request(id="m1", type="model_info", package=str(package))
    card = event["result"]["card"]
    assert card["task"] == "segment" and [c["name"] for c in card["classes"]] == ["water", "land"]
    assert card["architecture"]["encoder"]["in_chans"] == 2 and event["result"]["has_onnx"] is False
    event = worker.request(id="m3", type="model_info", package=str(package), verify=True)
    assert event["result"]["files"] == {"weights.safetensors": True}  # every file checked, as `sarmae info --verify`
    event = worker.request(id="m2", type="model_info", package=str(tmp_path / "nope"))
    assert event["event"] == "error" and event["error"]["type"] == "PackageError"
    assert "nope" in event["error"]["message"] and "traceback" not in event["error"]


@pytest.mark.slow
def test_run_reports_progress_and_keeps_the_model_loaded(worker, package, small_raster, tmp_path):
    out = tmp_path / "out" / "water.tif"
    worker.send(**run_request("r1", small_raster, out, package))
    events = worker.until("r1", 60)
    assert events[-1]["event"] == "result", events[-1]
    progress = [e for e in events if e["event"] == "progress"]
    logs = [e for e in events if e["event"] == "log"]
    assert progress and logs and all(e["id"] == "r1" for e in events)
    assert all(e["level"] == "info" and e["message"] for e in logs)
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert events.index(progress[-1]) < len(events) - 1  # every progress before the result
    result = events[-1]["result"]
    assert events[-1]["cache"] == {"package": "miss", "backend": "miss"}
    assert result["task"] == "segment" and result["outputs"]["class"] == str(out) and out.is_file()
    assert Path(result["outputs"]["confidence"]).is_file() and result["statistics"]["pixels"] == 150 * 200
    assert [c["name"] for c in result["classes"]] == ["water", "land"]

    worker.send(**run_request("r2", small_raster, tmp_path / "out" / "water2.tif", package))
    events = worker.until("r2", 60)
    again = events[-1]
    assert again["event"] == "result" and again["cache"] == {"package": "hit", "backend": "hit"}
    assert any(e["event"] == "log" and "cache hit" in e["message"] for e in events)
    assert Path(again["result"]["outputs"]["class"]).is_file()
    info = worker.request(id="i", type="info")["result"]
    assert [m["name"] for m in info["loaded_models"]] == ["vit_tiny_patch16-segment-random"]
    assert info["loaded_models"][0]["path"] == str(package.resolve())


@pytest.mark.slow
def test_busy_then_cancel_leaves_nothing_on_disk(worker, package, big_raster, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    start_big_run(worker, "big", big_raster, out_dir / "flood.tif", package)
    busy = worker.request(**run_request("other", big_raster, out_dir / "other.tif", package))
    assert busy["event"] == "error" and busy["error"]["code"] == "busy" and "'big'" in busy["error"]["message"]
    worker.send(id="c1", type="cancel", target="big")
    events = worker.until("big", 30)
    ack = next(e for e in events if e["id"] == "c1")
    assert ack["event"] == "result" and ack["result"] == {"target": "big", "cancelled": True}
    err = events[-1]
    assert err["event"] == "error" and err["error"]["cancelled"] is True and err["error"]["code"] == "cancelled"
    assert sorted(os.listdir(out_dir)) == []  # no outputs, no hidden temporary files
    late = worker.request(id="c2", type="cancel", target="big")  # a cancel that arrives too late is harmless
    assert late["result"]["cancelled"] is False
    assert worker.request(id="i", type="info")["result"]["active_run"] is None


def test_bad_input_never_kills_the_worker(worker, tmp_path):
    for line in ("{not json", "[]", '{"type": "info"}', ""):
        worker.send_raw(line)
    for _ in range(3):
        event = worker.next()
        assert event["event"] == "error" and event["id"] is None and event["error"]["code"] == "protocol"
    assert worker.request(id="u1", type="teleport")["error"]["type"] == "ProtocolError"
    assert "'output'" in worker.request(id="u2", type="run", task="infer", inputs=["a.tif"], model="m")["error"]["message"]
    bad = worker.request(id="u3", type="run", task="infer", inputs=["a.tif"], output="o.tif", model="m",
                         options={"no_such_option": 1})
    assert bad["event"] == "error" and "no_such_option" in bad["error"]["message"]
    missing = worker.request(id="u4", type="run", task="infer", inputs=[str(tmp_path / "none.tif")],
                             output=str(tmp_path / "o.tif"), model=str(tmp_path / "no_pkg"))
    assert missing["event"] == "error" and missing["error"]["type"] == "PackageError"
    unknown = worker.request(id="u5", type="run", task="paint")
    assert unknown["event"] == "error" and "unknown run task 'paint'" in unknown["error"]["message"]
    assert "similarity" in unknown["error"]["message"]
    assert worker.request(id="ok", type="info")["event"] == "result"
    assert worker.proc.poll() is None


NOISY_WORKER = """
import os, sys
import engine.serve as serve
calls = []
real_info = serve.engine_info
def noisy_info(*args):
    calls.append(1)
    print("a stray print")  # must land on stderr, not in the protocol stream
    os.write(1, b"a stray C-level write\\n")
    if len(calls) == 2:
        raise ZeroDivisionError("boom")
    return real_info(*args)
serve.engine_info = noisy_info
sys.exit(serve.main([]))
"""


def test_stray_output_goes_to_stderr_and_unexpected_errors_carry_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NOISY_WORKER], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          input='{"id": "1", "type": "info"}\n{"id": "2", "type": "info"}\n{"id": "3", "type": "info"}\n',
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    events = [P.decode(line) for line in proc.stdout.splitlines()]  # every stdout line is a protocol line
    assert [e["event"] for e in events] == ["hello", "result", "error", "result"]
    err = events[2]["error"]
    assert err["type"] == "ZeroDivisionError" and err["code"] == "internal" and err["message"] == "boom"
    assert "ZeroDivisionError: boom" in err["traceback"] and "noisy_info" in err["traceback"]
    assert proc.stderr.count("a stray print") == 3 and proc.stderr.count("a stray C-level write") == 3


def test_shutdown_exits_zero(worker):
    event = worker.request(id="bye", type="shutdown")
    assert event["event"] == "result" and event["result"] == {"shutdown": True}
    assert worker.proc.wait(30) == 0


def test_eof_exits_zero(worker):
    worker.proc.stdin.close()
    assert worker.proc.wait(30) == 0


@pytest.mark.slow
def test_shutdown_mid_run_cancels_it_first(worker, package, big_raster, tmp_path):
    start_big_run(worker, "big", big_raster, tmp_path / "out.tif", package)
    worker.send(id="bye", type="shutdown")
    events = worker.until("bye", 60)
    run_end = [e for e in events if e["id"] == "big" and e["event"] == "error"]
    assert run_end and run_end[0]["error"]["cancelled"] is True
    assert events.index(run_end[0]) < len(events) - 1  # the run's error comes before the shutdown result
    assert worker.proc.wait(30) == 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("out", ".out"))]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_mid_run_cleans_up(worker, package, big_raster, tmp_path):
    start_big_run(worker, "big", big_raster, tmp_path / "out.tif", package)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("out", ".out"))]


@pytest.mark.slow
def test_killed_mid_run_leaves_no_final_outputs(worker, package, big_raster, tmp_path):
    start_big_run(worker, "big", big_raster, tmp_path / "out.tif", package)
    worker.proc.kill()
    worker.proc.wait(30)
    assert not (tmp_path / "out.tif").exists() and not (tmp_path / "out_confidence.tif").exists()
    # only hidden temporary files (".out.<random>.tmp.tif") may remain after a SIGKILL
    left = [p for p in os.listdir(tmp_path) if "out" in p]
    assert all(p.startswith(".out") for p in left), left


def test_clean_removes_a_dead_runs_temporaries(worker, tmp_path):
    """``clean``: what a killed worker left (hidden temporaries, a lock of a dead process) goes; other
    files, and temporaries newer than the request, stay (issue 15, item 4)."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    old = time.time() - 60
    for name in (".out.0123abcd.tmp.tif", ".out.tif.lock", "keep.tif", "notes.tmp.tif"):
        (folder / name).write_text("x")
        os.utime(folder / name, (old, old))
    event = worker.request(id="c1", type="clean", folder=str(folder))
    assert event["event"] == "result", event
    assert sorted(Path(p).name for p in event["result"]["removed"]) == [".out.0123abcd.tmp.tif", ".out.tif.lock"]
    assert sorted(os.listdir(folder)) == ["keep.tif", "notes.tmp.tif"]
    event = worker.request(id="c2", type="clean")
    assert event["event"] == "error" and "folder" in event["error"]["message"]
