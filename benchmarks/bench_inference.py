"""Inference benchmarks (ratios measured in one run; not timed tests).

  efficiency: end-to-end px/s / model-only px/s on the same windows (ViT-Tiny segmentation,
              SIZE^2 x 2 float32 raster, CPU); target >= 0.95
  memory:     peak RSS at 16384^2 / peak RSS at 4096^2 (each in a fresh process); target <= 1.15,
              and < 500 MB at 16384^2 (a light segmentation model: depth --depth, head width 32)
  scaling:    seconds per megapixel at 4096^2, 8192^2, 16384^2 (within +-10 %)
  backends:   torch vs onnxruntime px/s on the same windows
  precision:  fp32 vs int8 (model.int8.onnx) end to end, ViT-Tiny segmentation with the light and the
              UPerNet head and a briefly trained light head: ratios and label agreement
              (benchmarks/bench_precision.py; --size defaults to 4096 there)

Usage: python benchmarks/bench_inference.py [efficiency|memory|scaling|backends|precision|all] [--size N]
       [--depth D] [--backend torch|onnxruntime] [--batch B] [--sizes 4096,8192,16384]
       (memory/scaling default to a 2-block ViT-Tiny: the pipeline's memory and overhead do not
       depend on the encoder depth, and 16384^2 with 12 blocks takes ~30 CPU-minutes)

memory/scaling run each size in a fresh process with GDAL_CACHEMAX=64 (MB). The raster, the package
and (for --backend onnxruntime) its model.onnx are made by this parent process first, so the
measured process with --backend onnxruntime imports no torch (it reports whether it did), and it
prints its memory at each stage: after Python + numpy, after the pipeline's imports, after the
package and backend are loaded, after the first batch, and at the end (VmHWM = peak so far).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, big_scene, peak_rss_mb, rss_mb, small_package

WORK = ROOT / "benchmarks" / "_work"
STAGES = ("start", "imports", "backend", "first_batch", "end")


def prepare(size: int, depth: int, backend: str = "torch") -> tuple[Path, Path]:
    """The scene and the package of a run (made once; an onnxruntime run gets a model.onnx too).
    Imports torch when something has to be made: call it in the parent, not in a measured process."""
    WORK.mkdir(parents=True, exist_ok=True)
    scene = big_scene(WORK / f"scene_{size}.tif", size)
    light = depth < 12  # memory/scaling runs: a light model, the pipeline is what is measured
    pkg_path = small_package(WORK / f"seg_d{depth}{'_h32' if light else ''}", "segment", depth,
                             head_channels=32 if light else None)
    if backend == "onnxruntime" and not (pkg_path / "model.onnx").is_file():
        from engine.cli import main as sarmae

        sarmae(["export", str(pkg_path)])
    return scene, pkg_path


def one_run(size: int, depth: int, backend: str = "torch", measure_model: bool = False, batch: int = 8) -> dict:
    """Run the pipeline once in this process; optionally time the model alone on the same windows."""
    stages = {"start": rss_mb()}
    import numpy as np
    import rasterio  # noqa: F401  (the reader's and writers' import, counted in "imports")

    from engine.backends import choose_backend
    from engine.inference import InferenceOptions, RunContext, _read_padded, run_inference
    from engine.package import load_package
    from engine.radiometry import Radiometry
    from engine.reader import SarRaster
    from engine.tiling import Window, plan_tiles

    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401
    else:
        import engine.torch_backend  # noqa: F401  (torch)
    stages["imports"] = rss_mb()
    scene, pkg_path = prepare(size, depth, backend)
    pkg = load_package(pkg_path, lazy=True)
    opts = InferenceOptions(batch_size=batch, backend=backend, overwrite=True, device="cpu")
    t0 = time.perf_counter()
    be = choose_backend(backend, pkg, "cpu", (batch, pkg.card.in_chans, *pkg.card.input_size))
    stages["backend"] = rss_mb()

    def progress(fraction: float, message: str) -> None:
        if fraction >= 0 and "first_batch" not in stages:
            stages["first_batch"] = rss_mb()

    res = run_inference([str(scene)], WORK / f"out_{size}_d{depth}.tif", pkg, opts, progress=progress, backend=be)
    t_e2e = time.perf_counter() - t0
    stages["end"] = rss_mb()
    out = {"size": size, "depth": depth, "backend": backend, "batch": batch, "e2e_s": t_e2e,
           "model_s_in_pipeline": res.timings["model_s"], "px": size * size, "peak_rss_mb": peak_rss_mb(),
           "stages": stages, "torch_imported": sys.modules.get("torch") is not None}
    if measure_model:  # the model alone on the same windows: read first (untimed), then time run()
        with SarRaster.open([str(scene)]) as r:
            rad = Radiometry.for_raster(pkg.card.input, r)
            plan = plan_tiles(size, size, 224, 0.25)
            ctx = RunContext(r, pkg.card, rad, Path("."), opts, 224, {}, Window(0, 0, size, size), print)
            t_model = 0.0
            wins = list(plan.windows)
            for i in range(0, len(wins), batch):
                x = np.stack([rad.apply(*_read_padded(r, w, 224, ctx.region)) for w in wins[i:i + batch]])
                t1 = time.perf_counter()
                be.run(x)
                t_model += time.perf_counter() - t1
        out["model_only_s"] = t_model
        out["efficiency"] = t_model / t_e2e
    return out


def in_subprocess(size: int, depth: int, backend: str = "torch", batch: int = 8) -> dict:
    """``one_run`` in a fresh process (its peak RSS is the run's alone); assets are made here first."""
    import os

    prepare(size, depth, backend)
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import json, bench_inference as b; "
            f"print(json.dumps(b.one_run({size}, {depth}, {backend!r}, batch={batch})))")
    env = {**os.environ, "GDAL_CACHEMAX": "64"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def stage_line(r: dict) -> str:
    st = r["stages"]
    return ("    stages (RSS now / peak so far, MB): "
            + ", ".join(f"{k} {st[k]['rss']:.0f}/{st[k]['hwm']:.0f}" for k in STAGES if k in st)
            + f"; torch imported: {r['torch_imported']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="all", choices=["efficiency", "memory", "scaling", "backends", "precision", "all"])
    ap.add_argument("--size", type=int, default=8192, help="raster side for efficiency/backends")
    ap.add_argument("--depth", type=int, default=2, help="encoder blocks for memory/scaling runs")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                    help="backend of the memory/scaling runs (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8, help="windows per batch in memory/scaling runs")
    ap.add_argument("--sizes", default="4096,8192,16384", help="raster sides of the memory/scaling runs")
    ap.add_argument("--repeats", type=int, default=3, help="alternating efficiency passes (median reported)")
    ap.add_argument("--reader-nice", type=int, default=None,
                    help="niceness the reader thread adds (default: the engine's READER_NICENESS; 0: none)")
    a = ap.parse_args()
    if a.reader_nice is not None:
        import engine.inference

        engine.inference.READER_NICENESS = a.reader_nice
    if a.what in ("efficiency", "all"):
        prepare(a.size, 12)
        # alternate end-to-end and model-only passes so that a change of machine load hits both
        ratios = []
        for i in range(a.repeats):
            r = one_run(a.size, 12, measure_model=True)
            ratios.append(r["efficiency"])
            print(f"  pass {i + 1}: end-to-end {r['px'] / r['e2e_s'] / 1e3:.1f} kpx/s, model-only "
                  f"{r['px'] / r['model_only_s'] / 1e3:.1f} kpx/s -> {r['efficiency']:.3f}; model share of the "
                  f"pipeline's own time {r['model_s_in_pipeline'] / r['e2e_s']:.3f}", flush=True)
        import engine.inference

        print(f"efficiency (ViT-Tiny seg, {a.size}^2 x 2, CPU, reader niceness +{engine.inference.READER_NICENESS}): "
              f"median ratio {sorted(ratios)[len(ratios) // 2]:.3f} "
              f"over {len(ratios)} alternating passes (target >= 0.95)")
    if a.what in ("memory", "scaling", "all"):
        sizes = [int(s) for s in a.sizes.split(",")]
        runs = {}
        for s in sizes:
            runs[s] = r = in_subprocess(s, a.depth, a.backend, a.batch)
            print(f"  {s}^2: {r['e2e_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            print(stage_line(r), flush=True)
            if a.backend == "onnxruntime" and r["torch_imported"]:
                print("  WARNING: the onnxruntime run imported torch", flush=True)
        lo, hi = runs[min(sizes)]["peak_rss_mb"], runs[max(sizes)]["peak_rss_mb"]
        print(f"memory ({a.backend}, depth {a.depth}, batch {a.batch}): peak RSS "
              + ", ".join(f"{s}^2 {r['peak_rss_mb']:.0f} MB" for s, r in runs.items())
              + f" -> ratio {max(sizes)}/{min(sizes)} {hi / lo:.3f} (target <= 1.15, and < 500 MB at 16384^2)")
        spm = {s: r["e2e_s"] / (r["px"] / 1e6) for s, r in runs.items()}
        mean = sum(spm.values()) / len(spm)
        print("scaling: s/Mpx " + ", ".join(f"{s}^2 {v:.3f}" for s, v in spm.items())
              + f" -> max deviation {max(abs(v / mean - 1) for v in spm.values()) * 100:.1f} % (target within 10 %)")
    if a.what == "precision":
        import bench_precision

        bench_precision.run(a.size, a.repeats)
    if a.what in ("backends", "all"):
        size = min(a.size, 4096)
        prepare(size, 12, "onnxruntime")
        t = one_run(size, 12, "torch")
        o = one_run(size, 12, "onnxruntime")
        print(f"backends (ViT-Tiny seg, {size}^2): torch {t['px'] / t['e2e_s'] / 1e3:.1f} kpx/s, onnxruntime "
              f"{o['px'] / o['e2e_s'] / 1e3:.1f} kpx/s -> onnxruntime/torch {t['e2e_s'] / o['e2e_s']:.2f}")


if __name__ == "__main__":
    main()
