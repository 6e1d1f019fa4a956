"""Inference benchmarks (ratios measured in one run; not timed tests).

  efficiency: end-to-end px/s / model-only px/s on the same windows (ViT-Tiny segmentation,
              SIZE^2 x 2 float32 raster, CPU); target >= 0.95
  memory:     peak RSS at 16384^2 / peak RSS at 4096^2 (each in a fresh process); target <= 1.15,
              and < 500 MB at 16384^2 (a light segmentation model: depth --depth, head width 32)
  scaling:    seconds per megapixel at 4096^2, 8192^2, 16384^2 (within +-10 %)
  backends:   torch vs onnxruntime px/s on the same windows

Usage: python benchmarks/bench_inference.py [efficiency|memory|scaling|backends|all] [--size N]
       [--depth D] (memory/scaling default to a 2-block ViT-Tiny: the pipeline's memory and overhead
       do not depend on the encoder depth, and 16384^2 with 12 blocks takes ~30 CPU-minutes)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, big_scene, peak_rss_mb, small_package

WORK = ROOT / "benchmarks" / "_work"


def one_run(size: int, depth: int, backend: str = "torch", measure_model: bool = False, batch: int = 8) -> dict:
    """Run the pipeline once in this process; optionally time the model alone on the same windows."""
    import numpy as np

    from engine.backends import choose_backend
    from engine.inference import InferenceOptions, RunContext, _read_padded, run_inference
    from engine.package import load_package
    from engine.radiometry import Radiometry
    from engine.reader import SarRaster
    from engine.tiling import Window, plan_tiles

    WORK.mkdir(parents=True, exist_ok=True)
    scene = big_scene(WORK / f"scene_{size}.tif", size)
    light = depth < 12  # memory/scaling runs: a light model, the pipeline is what is measured
    pkg_path = small_package(WORK / f"seg_d{depth}{'_h32' if light else ''}", "segment", depth,
                             head_channels=32 if light else None)
    pkg = load_package(pkg_path)
    if backend == "onnxruntime" and not pkg.has_onnx:
        from engine.cli import main as sarmae

        sarmae(["export", str(pkg_path)])
        pkg = load_package(pkg_path)
    opts = InferenceOptions(batch_size=batch, backend=backend, overwrite=True, device="cpu")
    t0 = time.perf_counter()
    res = run_inference([str(scene)], WORK / f"out_{size}_d{depth}.tif", pkg, opts)
    t_e2e = time.perf_counter() - t0
    out = {"size": size, "depth": depth, "backend": backend, "e2e_s": t_e2e, "model_s_in_pipeline": res.timings["model_s"],
           "px": size * size, "peak_rss_mb": peak_rss_mb()}
    if measure_model:  # the model alone on the same windows: read first (untimed), then time run()
        be = choose_backend(backend, pkg, "cpu", (batch, 2, 224, 224))
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


def in_subprocess(size: int, depth: int, backend: str = "torch") -> dict:
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import json, bench_inference as b; "
            f"print(json.dumps(b.one_run({size}, {depth}, {backend!r})))")
    import os

    env = {**os.environ, "GDAL_CACHEMAX": "64"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="all", choices=["efficiency", "memory", "scaling", "backends", "all"])
    ap.add_argument("--size", type=int, default=8192, help="raster side for efficiency/backends")
    ap.add_argument("--depth", type=int, default=2, help="encoder blocks for memory/scaling runs")
    ap.add_argument("--repeats", type=int, default=3, help="alternating efficiency passes (median reported)")
    a = ap.parse_args()
    if a.what in ("efficiency", "all"):
        # alternate end-to-end and model-only passes so that a change of machine load hits both
        ratios = []
        for i in range(a.repeats):
            r = one_run(a.size, 12, measure_model=True)
            ratios.append(r["efficiency"])
            print(f"  pass {i + 1}: end-to-end {r['px'] / r['e2e_s'] / 1e3:.1f} kpx/s, model-only "
                  f"{r['px'] / r['model_only_s'] / 1e3:.1f} kpx/s -> {r['efficiency']:.3f}; model share of the "
                  f"pipeline's own time {r['model_s_in_pipeline'] / r['e2e_s']:.3f}", flush=True)
        print(f"efficiency (ViT-Tiny seg, {a.size}^2 x 2, CPU): median ratio {sorted(ratios)[len(ratios) // 2]:.3f} "
              f"over {len(ratios)} alternating passes (target >= 0.95)")
    if a.what in ("memory", "scaling", "all"):
        runs = {s: in_subprocess(s, a.depth) for s in (4096, 8192, 16384)}
        for s_, r in runs.items():
            print(f"  {s_}^2: {r['e2e_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        # the same runs give both figures
        m4, m16 = runs[4096]["peak_rss_mb"], runs[16384]["peak_rss_mb"]
        print(f"memory (depth {a.depth}): peak RSS 4096^2 {m4:.0f} MB, 8192^2 {runs[8192]['peak_rss_mb']:.0f} MB, "
              f"16384^2 {m16:.0f} MB -> ratio {m16 / m4:.3f} (target <= 1.15, and < 500 MB)")
        spm = {s: r["e2e_s"] / (r["px"] / 1e6) for s, r in runs.items()}
        mean = sum(spm.values()) / 3
        print("scaling: s/Mpx " + ", ".join(f"{s}^2 {v:.3f}" for s, v in spm.items())
              + f" -> max deviation {max(abs(v / mean - 1) for v in spm.values()) * 100:.1f} % (target within 10 %)")
    if a.what in ("backends", "all"):
        size = min(a.size, 4096)
        t = one_run(size, 12, "torch")
        o = one_run(size, 12, "onnxruntime")
        print(f"backends (ViT-Tiny seg, {size}^2): torch {t['px'] / t['e2e_s'] / 1e3:.1f} kpx/s, onnxruntime "
              f"{o['px'] / o['e2e_s'] / 1e3:.1f} kpx/s -> onnxruntime/torch {t['e2e_s'] / o['e2e_s']:.2f}")


if __name__ == "__main__":
    main()
