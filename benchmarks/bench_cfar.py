"""CFAR speed and memory over generated scenes (printed numbers; not a timed test).

  speed:  Mpx/s of ``run_cfar`` (read + radiometry + CA-CFAR + components + NMS + GeoPackage) over
          a generated ``--size``^2 single-look linear-power scene with ships (target >= 20 Mpx/s
          on 2 cores); ``--methods ca os`` also times order-statistic CFAR
  memory: peak resident memory of a process running CFAR over a 4096^2 scene and over 16384 rows
          x 2048 columns (and 16384 x 4096): the strips keep it flat in the raster's height

Each measurement runs in a fresh process (peak RSS from ``resource``). Scenes are written once
to ``benchmarks/_work/`` (block by block; an 8192^2 float32 scene takes 256 MB of disk).

Usage: python benchmarks/bench_cfar.py [--size 8192] [--threads 2] [--methods ca] [--no-memory]
"""

from __future__ import annotations

import argparse
import json
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
cfg = CfarConfig(method={method!r}, pfa=1e-6, guard=11, background=41, threads={threads})
t, c = time.perf_counter(), time.process_time()
res = run_cfar({path!r}, {out!r}, cfg, overwrite=True)
dt, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({{"seconds": dt, "cpu_seconds": cpu, "mpx": res.valid_pixels / 1e6, "objects": len(res.objects),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(path: Path, method: str, threads: int) -> dict:
    code = CHILD.format(root=str(ROOT), method=method, threads=threads, path=str(path),
                        out=str(WORK / f"{path.stem}_{method}.gpkg"))
    # GDAL's block cache (256 MB by default) fills with what was read: bounded, but it would hide
    # whether the detector's own memory stays flat, so the benchmark keeps it small
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "GDAL_CACHEMAX": "32"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["ca"], choices=["ca", "os"])
    ap.add_argument("--no-memory", action="store_true")
    a = ap.parse_args()
    big = make_scene(WORK / f"cfar_{a.size}x{a.size}.tif", a.size, a.size)
    for method in a.methods:
        m = measure(big, method, a.threads)
        print(f"speed  {method.upper()}-CFAR {a.size}^2: {m['seconds']:.2f} s, {m['mpx'] / m['seconds']:.1f} Mpx/s "
              f"({m['objects']} objects; {a.threads} threads; target >= 20 Mpx/s); {m['mpx'] / m['cpu_seconds']:.1f} Mpx "
              f"per CPU-second (what a loaded machine hides); peak {m['peak_mb']:.0f} MB",
              flush=True)
    if a.no_memory:
        return
    peaks = {}
    for h, w in ((4096, 4096), (16384, 2048), (16384, 4096)):
        m = measure(make_scene(WORK / f"cfar_{h}x{w}.tif", h, w), "ca", a.threads)
        peaks[(h, w)] = m["peak_mb"]
        print(f"memory {h} rows x {w} cols: peak {m['peak_mb']:.0f} MB ({m['mpx'] / m['seconds']:.1f} Mpx/s)", flush=True)
    print(f"memory ratio 16384x2048 / 4096^2: {peaks[(16384, 2048)] / peaks[(4096, 4096)]:.2f}; "
          f"16384x4096 / 4096^2 (same width, 4x the rows): {peaks[(16384, 4096)] / peaks[(4096, 4096)]:.2f}")


if __name__ == "__main__":
    main()
