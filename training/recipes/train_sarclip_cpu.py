"""Train a small SARCLIP on a CPU from the labelled data in ../shared/data, and score it beside its baselines.

1. ``sarmae captions`` with ``training/recipes/sarclip_captions.yaml``: MSTAR SOC-10 classes,
   OpenSARShip types, HRSID ships / open sea, OMBRIA and ETCI flood / water / land; 20 % of each
   class held out (whole groups: ETCI by 4 x 4 blocks of its tile grid, HRSID windows by scene).
2. ``sarmae finetune --task clip`` on the training rows: the small open_clip model (ResNet image
   tower 64 px, 3-layer text transformer), random start, ``--epochs`` / ``--max-minutes``.
3. ``sarmae evaluate --pairs --baselines`` on the held-out rows: zero-shot top-1 / top-5 / mean
   per-class accuracy per source (prompt ensemble over the source's class names), retrieval
   recall@1/5/10; chance and a logistic regression on the same image tower's frozen embedding.
4. The small CNN of ``training/baselines.py`` on the same MSTAR training chips (the same 64 px
   images; its best epoch chosen on 10 % of the TRAINING rows), scored on the same held-out rows.

Writes ``OUT/results.json`` (default runs/sarclip_cpu). Usage (OMP_NUM_THREADS=1 on a shared machine):
    .venv/bin/python training/recipes/train_sarclip_cpu.py [--minutes 40] [--epochs 30] [--out runs/sarclip_cpu]
The map model (eval_sarclip_maps.py):
    .venv/bin/python training/recipes/train_sarclip_cpu.py --spec training/recipes/sarclip_maps.yaml \
        --loss captions --out runs/sarclip_maps --minutes 40 --cnn-minutes 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cnn_row(table_path: Path, package: Path, minutes: float, seed: int) -> dict:
    """The small CNN on MSTAR: trained on the table's MSTAR training rows, scored on its val rows."""
    import numpy as np
    import torch

    from engine.clip import load_clip
    from training.baselines import train_small_cnn
    from training.clip.captions import read_table
    from training.clip.images import augment, read_for_clip

    table = read_table(table_path)
    rows = [i for i, s in enumerate(table.sources) if s == "mstar"]
    card = load_clip(package).card
    im = read_for_clip([table.images[i] for i in rows], card)
    classes = sorted({table.classes[i] for i in rows})
    y = np.array([classes.index(table.classes[rows[k]]) for k in im.keep])
    split = np.array([table.splits[rows[k]] for k in im.keep])
    train_idx = np.nonzero(split == "train")[0]
    rng = np.random.default_rng(seed)
    rng.shuffle(train_idx)
    n_sel = max(1, len(train_idx) // 10)
    sel, tr, test = train_idx[:n_sel], train_idx[n_sel:], np.nonzero(split == "val")[0]
    rng = np.random.default_rng(seed + 1)
    model, info = train_small_cnn(im.x, y, tr, sel, epochs=60, max_minutes=minutes, seed=seed,
                                  augment=lambda b: augment(b, [rng] * len(b)))
    with torch.no_grad():
        pred = torch.cat([model(im.x[test[i:i + 256]].float()).argmax(1) for i in range(0, len(test), 256)])
    acc = float((pred.numpy() == y[test]).mean())
    per = [float((pred.numpy()[y[test] == k] == k).mean()) for k in range(len(classes))]
    return {"top1": acc, "mean_per_class": float(np.mean(per)), "n": int(len(test)), **info,
            "note": "best epoch chosen on 10 % of the training rows; the same 64 px images as the CLIP"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/sarclip_cpu")
    ap.add_argument("--minutes", type=float, default=40.0, help="CLIP training budget (wall clock)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cnn-minutes", type=float, default=10.0, help="the small CNN's budget (0: no CNN row)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue the CLIP run in OUT/sarclip.pkg.run")
    ap.add_argument("--spec", default="training/recipes/sarclip_captions.yaml",
                    help="caption spec (sarclip_maps.yaml: water / flood / land and ships at 10 m, for the maps)")
    ap.add_argument("--loss", default="pairs", choices=["pairs", "captions"], help="contrastive loss (train.py)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.chdir(ROOT)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from training.clip.caption_sources import load_spec, make_captions
    from training.clip.config import ClipTrainConfig
    from training.clip.evaluate import evaluate_zeroshot
    from training.clip.train import train_clip

    table, package = out / "captions.csv", out / "sarclip.pkg"
    t0 = time.time()
    caps = make_captions(load_spec(ROOT / a.spec), table, seed=a.seed,
                         overwrite=True) if not (a.resume and table.exists()) else {"table": str(table)}
    cfg = ClipTrainConfig(pairs=str(table), epochs=a.epochs, batch_size=a.batch_size, max_minutes=a.minutes,
                          seed=a.seed, loss=a.loss)
    trained = train_clip(cfg, package, resume=a.resume, overwrite=not a.resume)
    t1 = time.time()
    ev = evaluate_zeroshot(str(package), out / "zeroshot_confusion.png", pairs=str(table), split="val",
                           baselines=True)
    results = {"recipe": "training/recipes/train_sarclip_cpu.py", "threads": os.environ.get("OMP_NUM_THREADS"),
               "captions": caps, "training": {k: v for k, v in trained.items() if k != "validation"},
               "training_minutes_wall": round((t1 - t0) / 60, 2), "evaluation": ev}
    if a.cnn_minutes > 0:
        results["small_cnn_mstar"] = cnn_row(table, package, a.cnn_minutes, a.seed)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    z = ev["pairs"]["zeroshot"]
    print(json.dumps({"mstar_zeroshot_top1": z.get("mstar", {}).get("top1"),
                      "retrieval_mean_r5": ev["pairs"]["retrieval"]["mean_r5"],
                      "results": str(out / "results.json")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
