"""Detection fine-tuning speed (ratios measured in one run; not a timed test).

  head:  seconds per Faster R-CNN training step (forward + backward + AdamW) with torchvision's box
         head sizes (FPN 256, box MLP 1024, 512 RoIs per image: ``DetHeadConfig.LEGACY``) / the
         same with the default CPU-sized head (FPN 128, MLP 256, 128 RoIs)
  share: with ``--profile``, the operators taking most of a default-head step

Usage: python benchmarks/bench_detect.py [--img 128] [--batch 8] [--steps 3] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import ROOT  # noqa: F401  (puts the repo on sys.path)

from engine.models import create_model
from engine.models.heads import DetHeadConfig, ViTDetector


def batch(n: int, size: int, seed: int = 0):
    """n single-band images with 1-4 small boxes each (SAR ships / vehicles: 4-40 px)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        k = int(torch.randint(1, 5, (), generator=g))
        xy = torch.rand(k, 2, generator=g) * (size - 48)
        wh = 4 + torch.rand(k, 2, generator=g) * 36
        images.append(torch.randn(1, size, size, generator=g))
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.ones(k, dtype=torch.int64)})
    return images, targets


def seconds_per_step(head: DetHeadConfig, img: int, n: int, steps: int, profile: bool = False) -> float:
    torch.manual_seed(0)
    model = ViTDetector(create_model("vit_tiny_patch16", in_chans=1, img_size=img), 1, head).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, targets = batch(n, img)

    def step():
        loss = sum(model(images, targets).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    s = (time.perf_counter() - t0) / steps
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    legacy = DetHeadConfig.from_dict({})
    default = DetHeadConfig()
    # alternate the two so a load change on a noisy machine hits both
    runs = {"legacy": [], "default": []}
    for _ in range(2):
        runs["legacy"].append(seconds_per_step(legacy, a.img, a.batch, a.steps))
        runs["default"].append(seconds_per_step(default, a.img, a.batch, a.steps, profile=a.profile and not runs["default"]))
    lg, df = min(runs["legacy"]), min(runs["default"])
    print(f"ViT-Tiny Faster R-CNN, batch {a.batch} x {a.img} px, {torch.get_num_threads()} thread(s)")
    print(f"  torchvision-sized head (FPN {legacy.fpn_channels}, MLP {legacy.representation_size}, "
          f"{legacy.box_batch_size_per_image} RoIs/img): {lg:.2f} s/step")
    print(f"  default CPU head       (FPN {default.fpn_channels}, MLP {default.representation_size}, "
          f"{default.box_batch_size_per_image} RoIs/img): {df:.2f} s/step")
    print(f"  speed-up: {lg / df:.2f}x")


if __name__ == "__main__":
    main()
