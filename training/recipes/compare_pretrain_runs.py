"""Loss curves of several pretraining runs in one PNG (left: by optimizer step; right: by wall minutes),
from each run's metrics.csv, e.g. the encoder variants of ``pretrain_real_chips_cpu.sh``.

Usage: .venv/bin/python training/recipes/compare_pretrain_runs.py conv16=runs/pre_conv16 patch16=runs/pre_patch16
       [--out docs/pretrain_stem_loss.png]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="name=run folder (holding metrics.csv)")
    ap.add_argument("--out", default="runs/pretrain_compare.png")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for spec in a.runs:
        name, _, folder = spec.partition("=")
        path = Path(folder) / "metrics.csv"
        if not path.is_file():
            raise SystemExit(f"{path}: no metrics.csv; give name=run folder of a pretraining run")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        steps = [int(r["step"]) for r in rows]
        loss = [float(r["loss"]) for r in rows]
        # wall time from the logged throughput: each logging window's images / its images per second
        import yaml

        batch = int(yaml.safe_load((Path(folder) / "config.yaml").read_text())["optim"]["batch_size"])
        seconds, t = [], 0.0
        for i, r in enumerate(rows):
            t += (steps[i] - (steps[i - 1] if i else 0)) * batch / max(float(r["images_per_s"]), 1e-9)
            seconds.append(t)
        ax[0].plot(steps, loss, label=name)
        ax[1].plot([s / 60 for s in seconds], loss, label=name)
    for axis, xlabel in zip(ax, ("optimizer step", "training minutes (from the logged throughput)"), strict=True):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("MAE loss (masked patches)")
        axis.set_yscale("log")
        axis.legend()
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
