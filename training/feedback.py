"""What a researcher watches: CSV + TensorBoard scalars, loss-curve PNG, reconstruction grid PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

FIELDS = ["step", "epoch", "lr", "loss", "loss_mae", "loss_sarc", "images_per_s", "skipped_steps"]


class MetricsLog:
    """Appends rows to metrics.csv (kept across resumes) and mirrors them to TensorBoard."""

    def __init__(self, folder: Path, resume: bool):
        self.path = folder / "metrics.csv"
        self.tb = None
        if not resume or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint's step (they will be logged again)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(keep)

    def log(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in FIELDS])
        if self.tb is not None:
            for k in ("lr", "loss", "loss_mae", "loss_sarc", "images_per_s"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"pretrain/{k}", row[k], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(csv_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss", "loss_mae", "loss_sarc"):
        vals = [float(r[key]) if r[key] not in ("", "None") else np.nan for r in rows]
        if not all(np.isnan(vals)):
            ax[0].plot(steps, vals, label=key)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss")
    ax[0].set_yscale("log")
    ax[0].legend()
    ax[1].plot(steps, [float(r["lr"]) for r in rows])
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def reconstruction_grid(noised: torch.Tensor, clean: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor,
                        patch: int, png: Path) -> None:
    """Rows of (noised input, visible patches, reconstruction, clean target); images in [-1, 1]
    normalised space, first channel shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = noised.shape[0]
    gh, gw = noised.shape[-2] // patch, noised.shape[-1] // patch
    m = mask.reshape(n, gh, gw).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n), squeeze=False)
    titles = ["noised input (SARE)", "visible 25 %", "reconstruction", "clean target"]
    for i in range(n):
        vis = noised[i, 0].clone()
        vis[m[i] > 0] = float("nan")
        for j, img in enumerate([noised[i, 0], vis, recon[i, 0], clean[i, 0]]):
            ax = axes[i, j]
            ax.imshow(img.float().cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.axis("off")
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
