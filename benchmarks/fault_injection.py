"""Randomised fault injection on real ``sarmae infer`` runs: is a corrupt output ever published?

Each trial starts from an earlier good output (``good.tif``, ``good_confidence.tif``, ``good.gpkg``,
checksummed) and injects one fault into a real ``sarmae infer`` subprocess writing over it:

- ``enospc``: the disk fills up: the folder is a tmpfs (mounted in a user namespace with
  ``unshare -rm``) remounted with less free space than the run needs, at a random amount (the run
  is refused up front or fails at a random write); without ``unshare``, a random write of the run
  raises ENOSPC (``_fault_shim/sitecustomize.py``) while GDAL still runs;
- ``sigkill`` / ``sigterm``: the process is killed at a random time (the run may have finished);
- ``second``: a second run on the same (new) output path starts at a random time, with or without
  ``--overwrite``.

After each trial: the earlier outputs must be byte-identical (unless the run finished, when they
must be its complete outputs), every file under a final name must read back completely (GeoTIFF:
every block; GeoPackage: SQLite quick_check), and no temporary or lock file may be left except
after SIGKILL (those the next run must remove). Prints a table and a summary; exit status 1 if any
trial failed.

    python benchmarks/fault_injection.py -n 100 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SCENE = REPO.parent / "shared" / "data" / "sen1floods11" / "Spain_7370579_S1Hand.tif"
KINDS = ("enospc", "sigkill", "sigterm", "second")
BIG = 256 << 20  # tmpfs size between disk-full trials


def env(shim: Path | None = None, fault_at: int | None = None) -> dict:
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GDAL_CACHEMAX": "64"}
    if shim is not None and fault_at is not None:
        e["PYTHONPATH"] = f"{shim}{os.pathsep}{REPO}"
        e["SARMAE_FAULT_WRITE_AT"] = str(fault_at)
    return e


def sarmae(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def readable(path: Path) -> bool:
    """Every block of a GeoTIFF decodes / a GeoPackage passes quick_check and opens."""
    import sqlite3

    import fiona
    import rasterio

    try:
        if path.suffix == ".gpkg":
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            ok = con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            con.close()
            with fiona.open(path, layer=path.stem) as src:
                len(src)
            return ok
        with rasterio.open(path) as ds:
            for _, w in ds.block_windows(1):
                ds.read(window=w)
        return True
    except Exception:
        return False


def leftovers(folder: Path) -> list[str]:
    from engine.output_locks import LOCK_RE, TEMP_RE

    return sorted(p.name for p in folder.iterdir() if TEMP_RE.match(p.name) or LOCK_RE.match(p.name))


def finals(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix in (".tif", ".gpkg"))


class Bench:
    def __init__(self, work: Path, seed: int, tmpfs: bool):
        self.work, self.rng, self.tmpfs = work, random.Random(seed), tmpfs
        self.disk = work / "disk"
        self.disk.mkdir(parents=True, exist_ok=True)
        self.shim = None if tmpfs else Path(__file__).resolve().parent / "_fault_shim"
        if tmpfs:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={BIG}", "tmpfs", str(self.disk)], check=True)
        self.pkg, self.src = work / "seg.pkg", work / "in.tif"
        self.good = [self.disk / "good.tif", self.disk / "good_confidence.tif", self.disk / "good.gpkg"]
        self.rows: list[dict] = []

    def setup(self) -> None:
        subprocess.run(sarmae("init", "--arch", "vit_tiny_patch16", "--task", "segment", "--classes", "water,land",
                              "--in-chans", "2", "--img-size", "32", "--output", str(self.pkg), "--overwrite"),
                       env=env(), check=True, capture_output=True)
        make_input(self.src)
        self.infer("good.tif", overwrite=True, vector=True, check=True)  # warms the caches
        t0 = time.monotonic()  # the second run's time: what the random kill times span
        self.infer("good.tif", overwrite=True, vector=True, check=True)
        self.duration = time.monotonic() - t0
        self.hashes = {p: sha(p) for p in self.good}
        self.needed = sum(p.stat().st_size for p in self.good)  # a run with --vector
        self.needed_rasters = sum(p.stat().st_size for p in self.good[:2])

    def infer(self, out: str, *, overwrite: bool, vector: bool, check: bool = False, fault_at: int | None = None,
              popen: bool = False):
        # a random overlap: each run's outputs differ from the earlier ones (a replaced file shows)
        overlap = "0.25" if check else f"{self.rng.uniform(0.05, 0.5):.4f}"
        args = sarmae("infer", "-m", str(self.pkg), "-i", str(self.src), "-o", str(self.disk / out), "--quiet",
                      "--overlap", overlap,
                      *(["--overwrite"] if overwrite else []), *(["--vector"] if vector else []))
        kw = dict(env=env(self.shim, fault_at), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if popen:
            return subprocess.Popen(args, **kw)
        proc = subprocess.run(args, **kw)
        if check and proc.returncode:
            raise SystemExit(f"setup run failed: {proc.stderr[-2000:]}")
        return proc

    def remount(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.disk)], check=True)

    def used(self) -> int:
        st = os.statvfs(self.disk)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    # ------------------------------------------------------------------ the trials
    def trial(self, i: int, kind: str) -> dict:
        self.before = set(leftovers(self.disk))  # a killed run's files, for the next run to remove
        row = {"trial": i, "kind": kind, "stale_before": len(self.before)}
        vector = self.rng.random() < 0.5
        if kind == "enospc":
            self.enospc(row, vector)
        elif kind in ("sigkill", "sigterm"):
            self.kill(row, kind, vector)
        else:
            self.second(row, i)
        self.judge(row, kind)
        return row

    def enospc(self, row: dict, vector: bool) -> None:
        if self.tmpfs and self.rng.random() < 0.3:  # too little room from the start: refused up front
            need = self.needed if vector else self.needed_rasters  # less than this run's outputs take
            free = self.rng.randint(4 << 10, int(need * 0.95))
            self.remount(self.used() + free)
            row["fault"] = f"{free >> 10} KiB free"
            proc = self.infer("good.tif", overwrite=True, vector=vector)
            self.remount(BIG)
        elif self.tmpfs:  # another program fills the disk at a random time, leaving a few KiB
            self.remount(self.used() + (8 << 20))
            delay, rest = self.rng.uniform(0.2, self.duration), self.rng.randint(0, 32 << 10)
            row["fault"] = f"full at {delay:.1f} s, {rest >> 10} KiB left"
            p = self.infer("good.tif", overwrite=True, vector=vector, popen=True)
            try:
                p.wait(delay)
            except subprocess.TimeoutExpired:
                fill(self.disk / "filler", rest)
            out, err = p.communicate(timeout=300)
            (self.disk / "filler").unlink(missing_ok=True)
            self.remount(BIG)
            proc = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        else:
            at = self.rng.randint(1, 12)
            row["fault"] = f"ENOSPC at write {at}"
            proc = self.infer("good.tif", overwrite=True, vector=vector, fault_at=at)
        row["rc"], row["message"] = proc.returncode, first_error(proc.stderr)
        row["finished"] = returned(proc.returncode, proc.stdout)

    def kill(self, row: dict, kind: str, vector: bool) -> None:
        delay = self.rng.uniform(0.2, 1.1 * self.duration)
        row["fault"] = f"{kind} at {delay:.1f} s"
        proc = self.infer("good.tif", overwrite=True, vector=vector, popen=True)
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL if kind == "sigkill" else signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        row["rc"], row["message"] = proc.returncode, first_error(err)
        row["finished"] = returned(proc.returncode, out)

    def second(self, row: dict, i: int) -> None:
        out = f"new{i}.tif"
        delay = self.rng.uniform(0.0, self.duration)
        overwrite = self.rng.random() < 0.3
        row["fault"] = f"2nd writer at {delay:.1f} s" + (" --overwrite" if overwrite else "")
        a = self.infer(out, overwrite=False, vector=False, popen=True)
        time.sleep(delay)
        b = self.infer(out, overwrite=overwrite, vector=False)
        _, err_a = a.communicate(timeout=300)
        row["rc"] = f"{a.returncode}/{b.returncode}"
        row["message"] = first_error(b.stderr) or first_error(err_a)
        row["finished"] = False  # the earlier output is not the target
        # at least one run published the new output; a run that published nothing said why
        reasons = ("being written by another run", "already exists", "appeared while this run was writing")
        row["second_ok"] = ((a.returncode == 0 or b.returncode == 0)
                            and all(rc == 0 or any(r in err for r in reasons)
                                    for rc, err in ((a.returncode, err_a), (b.returncode, b.stderr))))

    def judge(self, row: dict, kind: str) -> None:
        corrupt = [p.name for p in finals(self.disk) if not readable(p)]
        now = {p: sha(p) for p in self.good}
        changed = [p.name for p in self.good if now[p] != self.hashes[p]]
        if row["finished"]:  # the run completed before the fault: its outputs are the new earlier ones
            self.hashes = now
            intact = True
        else:
            intact = not changed
        left = leftovers(self.disk)
        new_left = [n for n in left if n not in self.before]  # the earlier ones: a run stopped before its start
        row.update(intact=intact, changed=",".join(changed), corrupt=len(corrupt), left=len(new_left),
                   stale_removed=len(self.before - set(left)))
        ok = intact and not corrupt and None not in now.values()
        if kind == "sigterm" and not row["finished"]:
            # -15: the signal came before Python had started the CLI (no handler yet, no file opened)
            row["before_handler"] = row["rc"] == -signal.SIGTERM
            ok &= row["rc"] in (143, -signal.SIGTERM) and not new_left
        elif kind == "sigkill":
            ok &= all(n.startswith(".good") for n in new_left)  # only this run's; removed by the next run
        else:
            ok &= not new_left
        if kind == "enospc":
            ok &= row["finished"] or (row["rc"] != 0 and ("disk full" in row["message"]
                                                          or "not enough free space" in row["message"]))
        if kind == "second":
            ok &= row.pop("second_ok")
            for p in self.disk.glob(f"new{row['trial']}*"):
                p.unlink()
        row["ok"] = bool(ok)


def fill(path: Path, rest: int) -> None:
    """Write ``path`` until ``rest`` bytes are left free on its filesystem (or it is full)."""
    st = os.statvfs(path.parent)
    todo = max(0, st.f_bavail * st.f_frsize - rest)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while todo > 0:
            todo -= os.write(fd, b"\0" * min(todo, 1 << 20))
    except OSError:
        pass
    finally:
        os.close(fd)


def returned(rc: int, stdout: str) -> bool:
    """The run published its outputs: it exited 0, or was killed after printing its result."""
    return rc == 0 or "class: " in (stdout or "")


def first_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("sarmae ")] or stderr.splitlines()[-1:]
    return lines[-1][:160] if lines else ""


def make_input(dest: Path, size: int = 128) -> None:
    """A 2-band dB scene: a crop of the real sen1floods11 chip when present, else synthetic."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    if SCENE.exists():
        with rasterio.open(SCENE) as src:
            data = src.read(window=Window(0, 0, size, size))
            profile = {**src.profile, "width": size, "height": size,
                       "transform": src.window_transform(Window(0, 0, size, size))}
    else:
        rng = np.random.default_rng(0)
        data = (rng.gamma(1.0, 1.0, (2, size, size)).astype("float32") * 0.05)
        data = 10 * np.log10(data + 1e-6)
        profile = {"driver": "GTiff", "width": size, "height": size, "count": 2, "dtype": "float32"}
    with rasterio.open(dest, "w", **{**profile, "driver": "GTiff"}) as dst:
        dst.write(data)


def print_table(rows: list[dict]) -> None:
    cols = ["trial", "kind", "fault", "rc", "intact", "corrupt", "stale_before", "stale_removed", "left", "ok",
            "message"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))


def summary(rows: list[dict]) -> dict:
    s = {"trials": len(rows), "failed": sum(not r["ok"] for r in rows),
         "corrupt_published": sum(r["corrupt"] for r in rows),
         "earlier_intact": sum(r["intact"] for r in rows),
         "finished_before_fault": sum(bool(r.get("finished")) for r in rows),
         "sigterm_before_handler": sum(bool(r.get("before_handler")) for r in rows),
         "stale_left_by_sigkill": sum(r["left"] for r in rows if r["kind"] == "sigkill"),
         "stale_removed_by_a_later_run": sum(r["stale_removed"] for r in rows),
         "per_kind": {k: {"trials": sum(r["kind"] == k for r in rows),
                          "failed": sum(r["kind"] == k and not r["ok"] for r in rows)} for k in KINDS}}
    return s


def can_mount() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=100, help="trials (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="work folder (default: a new temporary one, removed)")
    p.add_argument("--json", type=Path, help="also write the rows and the summary here")
    p.add_argument("--simulated", action="store_true", help="simulate ENOSPC in Python even if a tmpfs can be mounted")
    p.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not a.in_namespace and not a.simulated and can_mount():  # run again inside a user + mount namespace
        cmd = ["unshare", "-rm", sys.executable, __file__, "--in-namespace", *(argv or sys.argv[1:])]
        return subprocess.run(cmd).returncode
    work = a.work or Path(tempfile.mkdtemp(prefix="sarmae_faults_"))
    bench = Bench(work, a.seed, tmpfs=a.in_namespace)
    try:
        bench.setup()
        print(f"setup: a run takes {bench.duration:.1f} s, its outputs {bench.needed >> 10} KiB; ENOSPC "
              + ("by a tmpfs of random size (real GDAL / SQLite errors)" if bench.tmpfs else "simulated at a random write"),
              flush=True)
        rows = []
        for i in range(a.n):
            kind = KINDS[i % len(KINDS)] if i < len(KINDS) else bench.rng.choice(KINDS)
            rows.append(bench.trial(i, kind))
            r = rows[-1]
            print(f"{i:3d} {kind:8s} {r['fault']:28s} rc {r['rc']!s:6s} ok {r['ok']}"
                  + ("" if r["ok"] else f" (changed {r['changed'] or '-'}, corrupt {r['corrupt']}, left {r['left']}: "
                                        f"{r['message']})"), flush=True)
        bench.infer("good.tif", overwrite=True, vector=True, check=True)  # a last run cleans up after the faults
        print_table(rows)
        s = summary(rows)
        s["left_after_a_final_run"] = leftovers(bench.disk)
        s["failed"] += bool(s["left_after_a_final_run"])
        print(json.dumps(s, indent=1))
        if a.json:
            a.json.write_text(json.dumps({"rows": rows, "summary": s}, indent=1))
        return 0 if s["failed"] == 0 else 1
    finally:
        if bench.tmpfs:
            subprocess.run(["umount", str(bench.disk)], check=False)
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
