"""Speed of the learned CPU detector ``detect.cfar_scored`` beside the Faster R-CNN head (not a timed test).

  train:  seconds per training step of the chip scorer (batch of 128 chips of 32 px: forward +
          backward + AdamW) and of the default CPU-sized ViT-Tiny Faster R-CNN (batch 8 x 128 px), in
          one run, alternated; steps/s ratio. One scorer epoch over HRSID's training strip is ~15
          steps, one Faster R-CNN epoch over 400 chips ~50.
  infer:  megapixels per second of a whole cfar_scored run (CFAR proposals + chips + scorer through
          onnxruntime, written to a GeoPackage) on a synthetic dB scene with 200 bright objects, and of
          CFAR alone with the same settings (what the scorer costs).

Usage: python benchmarks/bench_cfar_scored.py [--threads 2] [--size 2048] [--steps 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT  # noqa: F401  (puts the repo on sys.path)

from engine.models.chip_scorer import ChipScorer, ChipScorerConfig, export_chip_scorer


def scorer_step_seconds(steps: int, batch: int = 128) -> float:
    torch.manual_seed(0)
    model = ChipScorer(ChipScorerConfig()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    chips, geom, y = torch.randn(batch, 1, 32, 32), torch.randn(batch, 3), (torch.rand(batch) > 0.5).float()

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(chips, geom)[:, 0], y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def scene_mpx_per_s(size: int, threads: int) -> tuple[float, float, int]:
    """A cfar_scored package (seeded scorer; speed does not depend on training) and CFAR alone with the
    same settings over a size^2 scene, alternated, best of 2: (cfar_scored Mpx/s, CFAR Mpx/s, proposals)."""
    import rasterio
    from rasterio.transform import from_origin

    from engine.cfar import CfarConfig
    from engine.inference import InferenceOptions, run_inference
    from engine.package import save_package
    from engine.tasks.cfar import cfar_card
    from engine.tasks.cfar_scored import cfar_scored_card

    rng, n = np.random.default_rng(0), 0
    power = rng.exponential(0.01, (size, size)).astype(np.float32)
    for _ in range(200):
        y, x = rng.integers(0, size - 20, 2)
        power[y:y + 4, x:x + 14] = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        tif = Path(tmp) / "scene.tif"
        with rasterio.open(tif, "w", driver="GTiff", width=size, height=size, count=1, dtype="float32",
                           crs="EPSG:32631", transform=from_origin(500000, 4500000, 10, 10), tiled=True) as dst:
            dst.write(10 * np.log10(power), 1)
        torch.manual_seed(0)
        model = ChipScorer().eval()
        card = cfar_scored_card({"guard": 9, "background": 41, "pfa": 1e-4, "min_area": 4, "threads": threads},
                                model.cfg.to_dict(), "ship", 0.5, "bench")
        pkg = save_package(model.state_dict(), card, Path(tmp) / "p.pkg", onnx_bytes=export_chip_scorer(model))
        cfar = save_package(None, cfar_card(CfarConfig(**{k: v for k, v in card.architecture.extra["cfar"].items()
                                                          if k != "class_name"})), Path(tmp) / "c.pkg")
        rates = {}
        for name, p in (("cfar", cfar), ("cfar_scored", pkg), ("cfar again", cfar), ("cfar_scored again", pkg)):
            t0 = time.perf_counter()
            res = run_inference([str(tif)], Path(tmp) / f"{name}.gpkg", str(p),
                                InferenceOptions(input_units="db", threads=threads, score_threshold=0.0))
            rates.setdefault(name.split()[0], []).append(size * size / 1e6 / (time.perf_counter() - t0))
            n = res.statistics.get("scorer", {}).get("proposals", n if name != "cfar" else 0)
    return max(rates["cfar_scored"]), max(rates["cfar"]), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from bench_detect import seconds_per_step

    from engine.models.heads import DetHeadConfig

    runs: dict[str, list[float]] = {"scorer": [], "frcnn": []}
    for _ in range(2):  # alternated, so a load change on a shared machine hits both
        runs["scorer"].append(scorer_step_seconds(a.steps))
        runs["frcnn"].append(seconds_per_step(DetHeadConfig(), 128, 8, max(1, a.steps // 2)))
    sc, fr = min(runs["scorer"]), min(runs["frcnn"])
    print(f"{torch.get_num_threads()} thread(s)")
    print(f"  chip scorer step (128 chips x 32 px):            {sc:.3f} s/step ({1 / sc:.1f} steps/s)")
    print(f"  ViT-Tiny Faster R-CNN step (8 x 128 px, CPU head): {fr:.2f} s/step ({1 / fr:.2f} steps/s)")
    print(f"  steps/s ratio: {fr / sc:.1f}x")
    mpx, cfar, n = scene_mpx_per_s(a.size, a.threads)
    print(f"  over a {a.size}^2 scene: cfar_scored (onnxruntime) {mpx:.2f} Mpx/s ({n} proposals scored), "
          f"CFAR alone {cfar:.2f} Mpx/s")


if __name__ == "__main__":
    main()
