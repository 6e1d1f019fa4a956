"""Segmentation heads on a CPU (ratios measured in one run; not a timed test).

  infer:  windows/s of the model alone (torch, no grad) with the light per-pixel head / with the
          simple pyramid + UPerNet head, the same ViT-Tiny/16 encoder, window 224, batch 8
  train:  seconds per full fine-tuning step (forward + backward + AdamW), UPerNet / light, 128 px
  quick:  seconds per quick-mode head step on cached encoder maps / per full light step

The runs alternate (light, UPerNet, light, ...) and each figure is the median of ``--repeats``.

Usage: python benchmarks/bench_seg_heads.py [--img 224] [--batch 8] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT  # noqa: F401  (puts the repo on sys.path)

from engine.models import create_model
from engine.models.registry import build_segmenter


def model(kind: str, img: int):
    torch.manual_seed(0)
    enc = create_model("vit_tiny_patch16", in_chans=2, img_size=img)
    return build_segmenter(enc, 2, {"kind": kind} if kind == "light" else {"channels": 128})


def infer_s(m, x) -> float:
    m.eval()
    with torch.no_grad():
        t = time.perf_counter()
        m(x)
        return time.perf_counter() - t


def train_s(m, x, y, quick: bool = False) -> float:
    m.train()
    params = [p for n, p in m.named_parameters() if not (quick and n.startswith("encoder."))]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if quick:
        with torch.no_grad():
            maps = m.features(x)
    t = time.perf_counter()
    out = m.decode(maps, x) if quick else m(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--train-img", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    x = torch.randn(a.batch, 2, a.img, a.img)
    xt = torch.randn(a.batch, 2, a.train_img, a.train_img)
    yt = torch.randint(0, 2, (a.batch, a.train_img, a.train_img))
    models = {k: model(k, a.img) for k in ("light", "upernet")}
    trains = {k: model(k, a.train_img) for k in ("light", "upernet")}
    for m in models.values():  # warm-up
        infer_s(m, x)
    times: dict[str, list[float]] = {k: [] for k in ("light", "upernet", "train_light", "train_upernet", "quick")}
    for _ in range(a.repeats):
        for k in ("light", "upernet"):
            times[k].append(infer_s(models[k], x))
            times[f"train_{k}"].append(train_s(trains[k], xt, yt))
        times["quick"].append(train_s(trains["light"], xt, yt, quick=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    print(f"threads {torch.get_num_threads()}, window {a.img}, batch {a.batch}, {a.repeats} alternating repeats (median)")
    for k in ("light", "upernet"):
        print(f"  infer {k:<8} {a.batch / med[k]:7.1f} windows/s  (min..max {a.batch / spread[k][1]:.1f}.."
              f"{a.batch / spread[k][0]:.1f})")
    print(f"  train step {a.train_img} px: light {med['train_light']:.3f} s, UPerNet {med['train_upernet']:.3f} s, "
          f"quick-mode head {med['quick']:.3f} s")
    print(f"ratio infer light / UPerNet windows/s: {med['upernet'] / med['light']:.2f}")
    print(f"ratio train step UPerNet / light: {med['train_upernet'] / med['train_light']:.2f}")
    print(f"ratio full light step / quick-mode head step: {med['train_light'] / med['quick']:.2f}")


if __name__ == "__main__":
    main()
