"""engine.publish / engine.output_locks: verified writes, output locks, SIGTERM, stale temporaries.

The disk-full cases run on a real, small tmpfs mounted in a user namespace (``unshare -rm``) where
the machine allows it: libtiff's ENOSPC is then only *signalled* by GDAL (the close "succeeds"),
which is what used to publish corrupt rasters; elsewhere they skip, and the simulated ENOSPC tests
of tests/engine/test_inference.py still run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rasterio
from helpers.rasters import speckle, write_raster

from engine.errors import OutputError
from engine.inference import InferenceOptions, run_inference
from engine.output_locks import OutputLock, clean_stale_temporaries
from engine.publish import verify_raster

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def can_mount() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_tmpfs = pytest.mark.skipif(sys.platform != "linux" or not can_mount(),
                                 reason="no user namespace to mount a small tmpfs in (unshare -rm)")


def db_raster(path: Path, height: int, width: int) -> Path:
    import numpy as np

    return write_raster(path, 10 * np.log10(speckle((2, height, width), seed=0)), descriptions=["VV", "VH"])


def run(src, out, pkg, **options):
    options.setdefault("threads", 1)
    return run_inference(str(src), out, pkg, InferenceOptions(**options))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp" in p.name
                                                                                  or p.name.endswith(".lock")))


# ---------------------------------------------------------------------------- item 1: disk full
FILL_DISK_DURING_A_RUN = """
import hashlib, json, os, subprocess, sys, time
disk, src, seg = sys.argv[1:4]
py = sys.executable
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", disk], check=True)
infer = [py, "-m", "engine.cli", "infer", "-m", seg, "-i", src, "-o", disk + "/a.tif", "--quiet", "--batch-size", "1"]
subprocess.run(infer, check=True, stdout=subprocess.DEVNULL)
digest = lambda: {n: hashlib.sha256(open(os.path.join(disk, n), "rb").read()).hexdigest()
                  for n in ("a.tif", "a_confidence.tif")}
before = digest()

def fill_when_writing():
    # another program fills the disk once the run has started writing its temporary files
    while not any(".tmp" in n for n in os.listdir(disk)):
        time.sleep(0.02)
    fd = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        os.close(fd)

p = subprocess.Popen(infer + ["--overwrite"], stderr=subprocess.PIPE, text=True)
fill_when_writing()
_, err = p.communicate()
cli = {"rc": p.returncode, "stderr": err, "intact": digest() == before, "files": sorted(os.listdir(disk))}
os.unlink(os.path.join(disk, "filler"))
w = subprocess.Popen([py, "-m", "engine.cli", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
req = {"id": "r1", "type": "run", "task": "infer", "inputs": [src], "output": disk + "/a.tif", "model": seg,
       "options": {"overwrite": True, "threads": 1, "batch_size": 1}}
w.stdin.write(json.dumps(req) + "\\n")
w.stdin.flush()
fill_when_writing()
for line in w.stdout:
    e = json.loads(line)
    if e.get("id") == "r1" and e["event"] in ("result", "error"):
        break
w.stdin.close()
w.wait(60)
os.unlink(os.path.join(disk, "filler"))
print(json.dumps({"cli": cli, "event": e, "worker_intact": digest() == before, "worker_files": sorted(os.listdir(disk))}))
"""


@needs_tmpfs
@pytest.mark.slow
def test_disk_full_on_a_real_tmpfs_cli_and_worker(tmp_path, tiny_package):
    """Another program fills a real tmpfs while `sarmae infer --overwrite` writes (libtiff's ENOSPC is
    only signalled by GDAL; the close "succeeds"): exit 2 with "disk full while writing ...", the
    earlier outputs byte-identical, nothing left behind; the worker answers an `error` event, not
    `result`, for the same run."""
    seg = tiny_package("segment")
    src = db_raster(tmp_path / "in.tif", 512, 512)
    disk = tmp_path / "disk"
    disk.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(FILL_DISK_DURING_A_RUN)
    proc = subprocess.run(["unshare", "-rm", sys.executable, str(driver), str(disk), str(src), str(seg)], env=ENV,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    cli = r["cli"]
    assert cli["rc"] == 2, cli["stderr"][-2000:]
    assert "disk full while writing" in cli["stderr"] and "B free)" in cli["stderr"], cli["stderr"][-2000:]
    assert "(needed about " in cli["stderr"], "the writer thread lost the run's Publication: " + cli["stderr"][-500:]
    assert cli["intact"] and cli["files"] == ["a.tif", "a_confidence.tif", "filler"]
    assert r["event"]["event"] == "error" and "disk full while writing" in r["event"]["error"]["message"], r["event"]
    assert r["worker_intact"] and r["worker_files"] == ["a.tif", "a_confidence.tif"]


@needs_tmpfs
def test_too_little_space_is_refused_before_writing(tmp_path, tiny_package):
    seg = tiny_package("segment")
    src = db_raster(tmp_path / "in.tif", 256, 256)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=64k tmpfs {disk} && {sys.executable} -m engine.cli infer -m {seg} -i {src} "
              f"-o {disk}/a.tif --quiet; echo $? > {tmp_path}/rc.txt; ls -A {disk} > {tmp_path}/files.txt")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "rc.txt").read_text().strip() == "2"
    assert "not enough free space for" in proc.stderr and "MB free in" in proc.stderr, proc.stderr
    assert (tmp_path / "files.txt").read_text() == ""


def test_a_file_that_does_not_read_back_is_not_published(tmp_path, tiny_package, monkeypatch):
    """A write GDAL did not report (the file is cut short at close): the read-back refuses it and
    the earlier output is kept."""
    src = db_raster(tmp_path / "in.tif", 64, 64)
    out = tmp_path / "out.tif"
    out.write_text("yesterday's result")
    real_close = rasterio.io.DatasetWriter.close

    def close(self):
        name = self.name
        real_close(self)
        if "_confidence" in name:
            os.truncate(name, os.path.getsize(name) // 2)

    monkeypatch.setattr(rasterio.io.DatasetWriter, "close", close)
    with pytest.raises(OutputError, match=r"out_confidence\.tif.*does not read back"):
        run(src, out, tiny_package("segment"), overwrite=True)
    assert out.read_text() == "yesterday's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "out.tif"]


def test_verify_raster_checks_the_header(tmp_path):
    import numpy as np

    p = write_raster(tmp_path / "x.tif", np.zeros((1, 8, 8), np.float32))
    verify_raster(p, p, width=8, height=8, count=1, dtype="float32")
    with pytest.raises(OutputError, match="reads back as"):
        verify_raster(p, p, width=8, height=9, count=1, dtype="float32")


# ---------------------------------------------------------------------------- item 3: locks
def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding ``path``'s output lock (until it is killed)."""
    code = (f"import sys, time; from engine.output_locks import OutputLock; l = OutputLock({str(path)!r}); "
            "assert l.acquire() is None; print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_a_locked_output_is_refused(tmp_path, tiny_package):
    seg = tiny_package("segment")
    src = db_raster(tmp_path / "in.tif", 40, 40)
    out = tmp_path / "out.tif"
    holder = hold_lock(out)
    try:
        with pytest.raises(OutputError, match=rf"out\.tif is being written by another run \(process {holder.pid}\)"):
            run(src, out, seg)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tif.lock", "in.tif"]
        theirs = tmp_path / ".out.0123abcd.tmp.tif"  # the other run's temporary file
        theirs.write_text("being written")
        os.utime(theirs, (time.time() - 60, time.time() - 60))
        logs = []
        run_inference(str(src), out, seg, InferenceOptions(threads=1, overwrite=True),
                      progress=lambda f, m: logs.append(m) if f < 0 else None)  # --overwrite: runs, says so
        assert any("another run" in m and "--overwrite" in m for m in logs)
        assert theirs.exists()  # not taken for a stale one: its run is alive
    finally:
        holder.kill()
        holder.wait()
    assert out.exists()


def test_a_dead_processs_lock_is_taken_over(tmp_path, tiny_package):
    src = db_raster(tmp_path / "in.tif", 40, 40)
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".out.tif.lock").write_text(p.stdout)  # a process that no longer runs
    res = run(src, tmp_path / "out.tif", tiny_package("segment"))
    assert any(f"took over the lock left by process {p.stdout.strip()}" in m for m in res.log)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.tif", "out.tif", "out_confidence.tif"]


def test_a_file_that_appeared_during_the_run_is_not_replaced(tmp_path, tiny_package):
    src = db_raster(tmp_path / "in.tif", 64, 64)
    out = tmp_path / "out.tif"

    def progress(fraction: float, message: str) -> None:
        if fraction > 0.5 and not out.exists():
            out.write_text("another program's result")

    with pytest.raises(OutputError, match=r"out\.tif appeared while this run was writing it"):
        run_inference(str(src), out, tiny_package("segment"), InferenceOptions(threads=1, batch_size=1), progress)
    assert out.read_text() == "another program's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "out.tif"]


# ---------------------------------------------------------------------------- item 4: SIGTERM, stale files
@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_cleans_up_and_exits_143(tmp_path, tiny_package):
    src = db_raster(tmp_path / "in.tif", 512, 512)
    out = tmp_path / "out.tif"
    p = subprocess.Popen([sys.executable, "-m", "engine.cli", "infer", "-m", str(tiny_package("segment")), "-i",
                          str(src), "-o", str(out), "--batch-size", "1", "--threads", "1", "--quiet"],
                         env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(".tmp" in n for n in os.listdir(tmp_path)):  # the run is writing its outputs
        assert p.poll() is None and time.monotonic() < deadline, "the run ended before writing"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "terminated" in err
    assert sorted(os.listdir(tmp_path)) == ["in.tif"]


def test_stale_temporaries_are_removed_by_the_next_run(tmp_path, tiny_package):
    src = db_raster(tmp_path / "in.tif", 40, 40)
    old = time.time() - 3600
    stale = [".out.0123abcd.tmp.tif", ".out_confidence.89abcdef.tmp.tif", ".x.deadbeef.tmp.gpkg-journal",
             ".x.gpkg.lock"]
    kept = [".busy.fedcba98.tmp.tif", "notes.tmp.tif"]  # a live run's temporary; not our naming
    for n in stale + kept:
        (tmp_path / n).write_text("partial")
        os.utime(tmp_path / n, (old, old))
    holder = hold_lock(tmp_path / "busy.tif")
    try:
        res = run(src, tmp_path / "out.tif", tiny_package("segment"))
    finally:
        holder.kill()
        holder.wait()
    assert any(m.startswith("removed 4 stale temporary file(s) of interrupted runs in") for m in res.log), res.log
    assert sorted(os.listdir(tmp_path)) == sorted(["in.tif", "out.tif", "out_confidence.tif", ".busy.tif.lock", *kept])


def test_clean_keeps_files_newer_than_the_run(tmp_path):
    (tmp_path / ".a.0123abcd.tmp.tif").write_text("x")
    assert clean_stale_temporaries(tmp_path, time.time() - 60) == []
    lock = OutputLock(tmp_path / "a.tif")
    assert lock.acquire() is None
    lock.release()
    assert not (tmp_path / ".a.tif.lock").exists()


# ---------------------------------------------------------------------------- packages, sidecars
def test_a_package_is_read_back_and_disk_full_keeps_the_old_one(tmp_path, tiny_package, monkeypatch):
    import errno
    import shutil

    from engine.package import load_package, save_package

    pkg = load_package(tiny_package("segment"))
    dest = tmp_path / "model"
    shutil.copytree(tiny_package("segment"), dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name == "weights.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(OutputError, match=r"disk full while writing \S*model \((needed about [\d.]+ [KM]B, )?[\d.]+ [KM]B free\)"):
        save_package(pkg.model.state_dict(), pkg.card, dest, overwrite=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_json_sidecar_is_written_atomically(tmp_path):
    from engine.publish import write_bytes_atomic

    p = tmp_path / "result.json"
    p.write_text("old")
    write_bytes_atomic(p, b'{"ok": true}')
    assert p.read_text() == '{"ok": true}' and sorted(os.listdir(tmp_path)) == ["result.json"]


def test_gdal_io_failures_raise_and_clamping_does_not(tmp_path):
    """rasterio logs GDAL's CE_Failure errors (libtiff's write errors among them) instead of raising:
    gdal_errors raises for I/O ones, not for a value GDAL clamped (float16) while writing fine."""
    import logging

    from engine.publish import gdal_errors

    log = logging.getLogger("rasterio._env")
    with pytest.raises(OutputError, match=r"x\.tif: writing failed .*Write error at scanline 0"):
        with gdal_errors(tmp_path / "x.tif"):
            log.info("GDAL signalled an error: err_no=%r, msg=%r", 1, "TIFFAppendToStrip:Write error at scanline 0")
    with gdal_errors(tmp_path / "x.tif"):
        log.info("GDAL signalled an error: err_no=%r, msg=%r", 1, "Value 9.5e+21 is beyond range of float16.")


def test_a_lock_file_on_a_full_disk_is_a_sentence(tmp_path, tiny_package, monkeypatch):
    import errno

    src = db_raster(tmp_path / "in.tif", 40, 40)

    def pwrite(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OutputError, match=r"disk full while writing \S*out\.tif \((needed about [\d.]+ [KM]B, )?[\d.]+ [KM]B free\)"):
        run(src, tmp_path / "out.tif", tiny_package("segment"))
    assert sorted(os.listdir(tmp_path)) == ["in.tif"]


def test_a_disk_filled_by_another_program_quotes_only_what_is_known(tmp_path):
    """Nothing reserved for the file (another program filled the disk): no 'needed about 0.00 MB'."""
    import errno

    from engine.publish import disk_error

    msg = str(disk_error(tmp_path / "never_reserved.tif", OSError(errno.ENOSPC, "No space left on device")))
    assert msg.startswith(f"disk full while writing {tmp_path / 'never_reserved.tif'} (") and " free)" in msg
    assert "needed about" not in msg and "earlier output was kept" in msg
