"""Task metrics (accuracy, per-class accuracy, confusion matrix, IoU) and their plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts: rows = truth, columns = prediction."""
    return np.bincount(y_true.astype(np.int64) * k + y_pred.astype(np.int64), minlength=k * k).reshape(k, k)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    cm = confusion(y_true, y_pred, len(classes))
    per = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(classes)}
    return {"accuracy": float(np.trace(cm) / max(1, cm.sum())), "per_class_accuracy": per,
            "confusion": cm.tolist(), "n": int(cm.sum())}


def iou_metrics(cm: np.ndarray, classes: list[str]) -> dict:
    """Per-class IoU = TP / (TP + FP + FN) from a pixel confusion matrix; mean over present classes."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1) - tp
    iou = {c: (float(tp[i] / denom[i]) if denom[i] > 0 else None) for i, c in enumerate(classes)}
    vals = [v for v in iou.values() if v is not None]
    return {"iou": iou, "mean_iou": float(np.mean(vals)) if vals else 0.0,
            "pixel_accuracy": float(tp.sum() / max(1.0, cm.sum())), "confusion": cm.astype(np.int64).tolist()}


def confusion_png(cm, classes: list[str], png: Path, title: str = "confusion matrix (validation)") -> None:
    """Row-normalised confusion matrix with counts, sized for a dialog: at least 480 x 400 px at
    100 dpi, 11 pt text, the title inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    with plt.rc_context({"font.size": 11}):
        fig, ax = plt.subplots(figsize=(max(4.8, 2.0 + 0.8 * n), max(4.0, 1.8 + 0.7 * n)))
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), classes, rotation=30 if n > 3 else 0, ha="right" if n > 3 else "center")
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}\n{100 * norm[i, j]:.0f} %", ha="center", va="center",
                            fontsize=10, color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=12)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)


def preview_png(x, true: np.ndarray, pred: np.ndarray, tags: list[str], colours: list[str], png: Path) -> None:
    """Chips side by side with their labels and the model's prediction: one row per chip (image,
    labels, prediction; unlabelled pixels grey), ``tags`` naming each row (validation / training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n = len(tags)
    if n == 0:
        return
    cmap = ListedColormap(list(colours) + ["#bdbdbd"])
    k = len(colours)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.4 * n), squeeze=False)
    for i in range(n):
        img = np.asarray(x[i, 0], dtype=np.float32)
        lo, hi = np.percentile(img, [2, 98])
        lab = np.where(true[i] == 255, k, true[i])
        for j, (a, title) in enumerate(zip((img, lab, pred[i]), ("image", "labels", "prediction"))):
            ax = axes[i, j]
            if j == 0:
                ax.imshow(a, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            else:
                ax.imshow(a, cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{title} ({tags[i]})" if j == 0 else title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
