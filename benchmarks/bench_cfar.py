"""CFAR speed and memory over generated scenes (printed numbers; not a timed test).

  speed:  Mpx/s of ``run_cfar`` (read + radiometry + CA-CFAR + components + NMS + GeoPackage) over
          a generated ``--size``^2 single-look linear-power scene with ships (target >= 20 Mpx/s
          on 2 cores); ``--methods ca os`` also times order-statistic CFAR
  memory: peak resident memory of a process running CFAR over 4096 and 16384 rows of the same width
          (8192 columns; ``--memory-width``): the strips keep it flat in the raster's height

The machine may be shared: every speed line also gives the process's CPU-seconds per Mpx (which
load does not change much), and the load average is printed before and after; ``--threads`` is
compared with one thread in the same run (the ratio of the two).

  --against REV: the same speed runs with the engine of git revision REV (extracted with
          ``git archive`` to ``benchmarks/_work/engine_REV``), and the ratio of the speeds

Each measurement runs in a fresh process (peak RSS from ``resource``); the modules CFAR uses are
imported before the clock starts (their one-off import is not detection time). Scenes are written
once to ``benchmarks/_work/`` (block by block; an 8192^2 float32 scene takes 256 MB of disk).

Usage: python benchmarks/bench_cfar.py [--size 8192] [--threads 2] [--methods ca os] [--no-memory]
       [--memory-width 8192] [--against 64016b6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import ROOT

WORK = ROOT / "benchmarks" / "_work"


def make_scene(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """Single-look clutter (exponential, mean 1) with a 3 x 8 px ship of power 60 every 256^2 px,
    float32 linear power, tiled 512 px, written 512 rows at a time."""
    if path.exists():
        return path
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    prof = dict(driver="GTiff", width=width, height=height, count=1, dtype="float32", crs="EPSG:32631",
                transform=from_origin(500000, 4650000, 10, 10), tiled=True, blockxsize=512, blockysize=512,
                BIGTIFF="IF_SAFER")
    tmp = path.with_suffix(".part.tif")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(tmp, "w", **prof) as dst:
        for r in range(0, height, 512):
            h = min(512, height - r)
            a = rng.exponential(size=(h, width)).astype(np.float32)
            for dr in range(3):  # a 3 x 8 px ship of power 60 in every 256 x 256 px cell
                for dc in range(8):
                    a[20 + dr::256, 30 + dc::256] = 60.0
            dst.write(a, 1, window=rasterio.windows.Window(0, r, width, h))
        dst.set_band_description(1, "VV")
        dst.update_tags(UNITS="linear power")
    tmp.rename(path)
    return path


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from engine.cfar import CfarConfig
from engine.cfar.scene import run_cfar
import engine.reader, engine.radiometry, engine.writers, engine.tasks.base, fiona, shapely.geometry  # noqa
import scipy.integrate, scipy.optimize, scipy.sparse.csgraph, scipy.stats  # noqa
cfg = CfarConfig(method={method!r}, pfa=1e-6, guard=11, background=41, threads={threads})
t, c = time.perf_counter(), time.process_time()
res = run_cfar({path!r}, {out!r}, cfg, overwrite=True)
dt, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({{"seconds": dt, "cpu_seconds": cpu, "mpx": res.valid_pixels / 1e6, "objects": len(res.objects),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(path: Path, method: str, threads: int, root: Path = ROOT) -> dict:
    code = CHILD.format(root=str(root), method=method, threads=threads, path=str(path),
                        out=str(WORK / f"{path.stem}_{method}_{root.name}.gpkg"))
    # GDAL's block cache (256 MB by default) fills with what was read: bounded, but it would hide
    # whether the detector's own memory stays flat, so the benchmark keeps it small
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "GDAL_CACHEMAX": "32"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def old_engine(rev: str) -> Path:
    """The repository's ``engine`` package at git revision ``rev``, extracted once under _work."""
    import io
    import tarfile

    dest = WORK / f"engine_{rev}"
    if not (dest / "engine").exists():
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "engine"], capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
            t.extractall(dest)  # our own repository's files
    return dest


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["ca"], choices=["ca", "os"])
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--against", metavar="REV", help="also time the engine of this git revision")
    ap.add_argument("--memory-width", type=int, default=8192, help="columns of the memory scenes")
    a = ap.parse_args()
    print(f"load average (1, 5, 15 min): {load()} on {os.cpu_count()} CPUs", flush=True)
    big = make_scene(WORK / f"cfar_{a.size}x{a.size}.tif", a.size, a.size)
    for method in a.methods:
        m = measure(big, method, a.threads)
        print(f"speed  {method.upper()}-CFAR {a.size}^2: {m['seconds']:.2f} s, {m['mpx'] / m['seconds']:.1f} Mpx/s "
              f"({m['objects']} objects; {a.threads} threads; target >= 20 Mpx/s); {m['mpx'] / m['cpu_seconds']:.1f} Mpx "
              f"per CPU-second, {1000 * m['cpu_seconds'] / m['mpx']:.1f} CPU-ms per Mpx (what a loaded machine "
              f"hides); peak {m['peak_mb']:.0f} MB", flush=True)
        if a.threads > 1:
            one = measure(big, method, 1)
            print(f"       1 thread: {one['seconds']:.2f} s, {one['mpx'] / one['seconds']:.1f} Mpx/s, "
                  f"{one['mpx'] / one['cpu_seconds']:.1f} Mpx per CPU-second; {a.threads} threads are "
                  f"{one['seconds'] / m['seconds']:.2f}x as fast (wall)", flush=True)
        if a.against:
            o = measure(big, method, a.threads, old_engine(a.against))
            print(f"       {a.against}: {o['seconds']:.2f} s, {o['mpx'] / o['seconds']:.1f} Mpx/s, "
                  f"{o['mpx'] / o['cpu_seconds']:.1f} Mpx per CPU-second ({o['objects']} objects); this code is "
                  f"{o['seconds'] / m['seconds']:.2f}x as fast (wall), {o['cpu_seconds'] / m['cpu_seconds']:.2f}x "
                  "(CPU)", flush=True)
    if a.no_memory:
        return
    peaks, w = {}, a.memory_width
    for h in (4096, 16384):
        m = measure(make_scene(WORK / f"cfar_{h}x{w}.tif", h, w), "ca", a.threads)
        peaks[h] = m["peak_mb"]
        print(f"memory {h} rows x {w} cols: peak {m['peak_mb']:.0f} MB ({m['mpx'] / m['seconds']:.1f} Mpx/s, "
              f"{m['mpx'] / m['cpu_seconds']:.1f} Mpx per CPU-second)", flush=True)
    print(f"memory ratio 16384 / 4096 rows x {w} cols (4x the rows): {peaks[16384] / peaks[4096]:.2f}")
    print(f"load average after (1, 5, 15 min): {load()}")


if __name__ == "__main__":
    main()
