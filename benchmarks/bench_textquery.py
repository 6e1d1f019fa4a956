"""Text query on a cached scene: the time of a NEW phrase once the scene's image embeddings are cached
(target: under 2 s on 2 cores for an 8192^2 raster), and of the first run that embeds the scene.

  first:  ``run_inference(--query)`` on a fresh cache: the image tower over every cell, then the text tower
  cached: new phrases (never seen before) on the same raster, in the same process with the package
          already loaded (as the engine worker keeps it): cache read + text tower + writing the raster
  cli:    a fresh ``sarmae infer --query`` process for another new phrase (imports torch and open_clip,
          reads and checks the weights: what a one-off command costs on top)

The package is an open_clip ``--arch`` (default ViT-B-32, random weights: speed does not depend on
them); the scene a 2-band dB GeoTIFF (``common.big_scene``) under ``benchmarks/_work/``; the cache
under ``benchmarks/_work/clip_cache`` (removed first, so the first run embeds).

``--image-tower tiny`` keeps the architecture's text tower and embedding width but replaces its image
tower by one ViT block of width 64 (224 px, patch 32): the image tower does not run for a new phrase on
a cached scene, so the cached times are those of the full model (same text tower, same (R, C, D)
cache), while the first run no longer takes a ViT-B's hour on a shared 2-core machine. The
``new_phrase_cli_process_s`` of that package reads a smaller weights file than the full model's.

Usage: OMP_NUM_THREADS=2 python benchmarks/bench_textquery.py [--size 8192] [--arch ViT-B-32] [--threads 2]
       [--image-tower full|tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from common import ROOT, big_scene

WORK = ROOT / "benchmarks" / "_work"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-tower", choices=["full", "tiny"], default="full")
    a = p.parse_args()
    os.environ["SARMAE_CACHE_DIR"] = str(WORK / "clip_cache")
    shutil.rmtree(WORK / "clip_cache", ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    scene = big_scene(WORK / f"scene_{a.size}.tif", a.size)
    pkg = WORK / f"clip_{a.arch}_{a.image_tower}"
    import torch

    from engine.clip import build_clip, clip_card, model_config, save_clip_package
    from engine.inference import InferenceOptions, run_inference
    from engine.package import load_package

    torch.set_num_threads(a.threads)
    if not pkg.exists():
        torch.manual_seed(0)
        cfg = model_config(a.arch)
        if a.image_tower == "tiny":
            cfg["vision_cfg"] = {"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32}
        card = clip_card(f"bench-{a.arch}-{a.image_tower}", a.arch, cfg,
                         provenance={"training": "none: random (benchmark)"})
        save_clip_package(build_clip(card), card, pkg)
    loaded = load_package(pkg, lazy=True)
    opts = dict(threads=a.threads, batch_size=a.batch_size, backend="torch", overwrite=True)
    t0 = time.perf_counter()
    r = run_inference([str(scene)], WORK / "tq_first.tif", loaded, InferenceOptions(query=["ships at sea"], **opts))
    first = time.perf_counter() - t0
    cached = []
    for i, phrase in enumerate(["a flooded field", "an airport runway", "small boats in a harbour"]):
        t0 = time.perf_counter()
        rc = run_inference([str(scene)], WORK / f"tq_{i}.tif", loaded, InferenceOptions(query=[phrase], **opts))
        cached.append(time.perf_counter() - t0)
        assert rc.statistics["embeddings"]["cached"], "the second run did not use the cache"
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine.cli", "infer", "-m", str(pkg), "-i", str(scene), "-o",
                    str(WORK / "tq_cli.tif"), "--query", "oil slick on the sea", "--overwrite", "-q",
                    "--threads", str(a.threads)], check=True, env=env, stdout=subprocess.DEVNULL)
    cli = time.perf_counter() - t0
    print(json.dumps({"size": a.size, "arch": a.arch, "image_tower": a.image_tower, "threads": a.threads, "cells": r.statistics["cells"],
                      "cell_px": r.statistics["cell_px"], "first_run_s": round(first, 2),
                      "new_phrase_cached_s": [round(t, 3) for t in cached],
                      "new_phrase_cli_process_s": round(cli, 2)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
