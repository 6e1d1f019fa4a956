"""What in a geometric acquisition shift moves a classifier: the geometry, or the resampling that
smooths the speckle? Scores a classify package on a sample of chips as they are, after a half-pixel
bilinear shift (smoothing only, no change of geometry), an integer 6 px shift (geometry only, no
interpolation), an exact 90-degree rotation, and a 10-degree rotation sampled by nearest neighbour.

Usage: OMP_NUM_THREADS=1 .venv/bin/python training/recipes/probe_resampling.py PACKAGE CHIP_FOLDER [--n 300]
(e.g. runs/eval_mstar_vit/mae_head_40_s0_median.pkg runs/eval_mstar_shifts/split/test)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import torch
    import torch.nn.functional as F

    from engine.package import load_package
    from training.acquisition import _finish, _scaled, _warp
    from training.finetune.classify import class_folders, load_tensors
    from training.finetune.common import model_input

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("chips", help="a folder with one sub-folder of chips per class")
    ap.add_argument("--n", type=int, default=300, help="chips drawn (seed 0)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    pk = load_package(a.package)
    c = pk.card.input.to_dict()
    chips = class_folders(a.chips)
    idx = np.random.default_rng(0).permutation(len(chips.files))[:a.n]
    x, _ = load_tensors([chips.files[i] for i in idx], pk.card.input_size[0], pk.card.in_chans, c["mean"], c["std"])
    y = chips.labels[idx]

    def acc(xs):
        with torch.no_grad():
            p = torch.cat([pk.model(model_input(xs[i:i + 100], c)).argmax(1) for i in range(0, len(xs), 100)])
        return 100 * float((p.numpy() == y).mean())

    v, m, s = _scaled(x, c)
    n, t = len(v), math.radians(10)
    rot = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]]).expand(n, 2, 3)
    nearest = F.grid_sample(v, F.affine_grid(rot, list(v.shape), align_corners=False), mode="nearest",
                            padding_mode="reflection", align_corners=False)
    rows = {"as they are": x,
            "bilinear half-pixel shift (smoothing only)": _finish(_warp(v, torch.ones(n), torch.zeros(n),
                                                                        torch.full((n, 2), 0.5)), m, s, c),
            "integer 6 px shift (no interpolation)": _finish(torch.roll(v, (6, 0), (2, 3)), m, s, c),
            "exact 90-degree rotation": _finish(torch.rot90(v, 1, (2, 3)), m, s, c),
            "10-degree rotation, nearest neighbour": _finish(nearest, m, s, c)}
    for name, xs in rows.items():
        print(f"{name:<45} {acc(xs):5.1f} %")


if __name__ == "__main__":
    main()
