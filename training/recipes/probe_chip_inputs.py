"""Probe: what the chip classifier's input preparation does to the quick mode on a frozen encoder,
on VALIDATION chips only (MSTAR SOC-10, eval_mstar.py's split and shots), clean and under the nine
simulated acquisition shifts (``training.acquisition.DEFAULT_SHIFTS``).

Each variant is ``STANDARDISE:SMOOTH:WARP``: the per-chip standardisation (median | iqr, see
``finetune --standardise``), the Gaussian low-pass in px after it (``--smooth``; 0: off), and the
training views' augmentation (none: the quick mode's 8 flips / rotations with a +-2 dB gain; a
number: also ``acquisition_jitter`` with that share of chips resampled, ``--acquisition-jitter``).
The quick mode's logistic regression is fitted on the frozen block-pooled embeddings of the training
chips' 8 views; its strength is chosen on the clean validation chips (as ``fit_classify_head``).
This is a screen for ``eval_mstar.py``, which trains and scores the packages themselves; the test
part is never read.

Usage: OMP_NUM_THREADS=1 .venv/bin/python training/recipes/probe_chip_inputs.py ENCODER.pkg
       [--seeds 0 1] [--variants median:0:none median:1:none iqr:2:0.5] [--out runs/probe_chip_inputs]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("encoder")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--shots", type=int, default=40)
    ap.add_argument("--variants", nargs="+", default=["median:0:none", "median:1:none", "iqr:2:0.5"])
    ap.add_argument("--out", default=str(ROOT / "runs" / "probe_chip_inputs"))
    a = ap.parse_args()
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from engine.models.heads import ViTClassifier
    from training.acquisition import DEFAULT_SHIFTS, shifted_sets
    from training.finetune.classify import (
        class_folders,
        contract_for,
        load_tensors,
        split,
        with_standardise,
    )
    from training.finetune.common import load_encoder
    from training.finetune.config import FinetuneConfig
    from training.finetune.quick import pooled_features
    from training.recipes.eval_mstar import make_split

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(a.out)
    pool_dir, _ = make_split(ROOT / ".." / "shared" / "data" / "mstar_soc10" / "train_17deg", out / "split")
    pool = class_folders(pool_dir)
    enc = load_encoder(FinetuneConfig(encoder=a.encoder, img_size=128, in_chans=1))
    model = ViTClassifier(enc.model, len(pool.classes), pool="blocks", blocks=4).eval()
    x, kind = load_tensors(pool.files, 128, 1, enc.input["mean"], enc.input["std"])
    base = contract_for(kind, enc.input, 1, (-35.0, 10.0))  # as finetune's contract for these chips

    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else []
    for seed in a.seeds:
        tr, va = split(pool, 0.2, a.shots, seed)
        val_sets = shifted_sets(x[va], base, DEFAULT_SHIFTS, seed=0)
        y = pool.labels
        for v in a.variants:
            std, smooth, warp = v.split(":")
            cfg = FinetuneConfig(standardise=std, smooth=float(smooth))
            contract, _ = with_standardise(base, cfg)
            t0 = time.time()
            torch.manual_seed(seed)
            views = FinetuneConfig(gain_db=2.0, acquisition=warp != "none",
                                   acquisition_warp=0.5 if warp == "none" else float(warp))
            f_tr = pooled_features(model, x[tr], "cpu", True, contract, views)  # the quick mode's own views
            y_tr = np.tile(y[tr], 8)
            f_va = {k: pooled_features(model, s, "cpu", False, contract) for k, s in val_sets.items()}
            sc = StandardScaler().fit(f_tr)
            best = None
            for c in (0.03, 0.1, 0.3, 1.0, 3.0):
                lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
                lr.fit(sc.transform(f_tr), y_tr)
                acc = {k: float((lr.predict(sc.transform(f)) == y[va]).mean()) for k, f in f_va.items()}
                if best is None or acc["clean"] > best[1]["clean"]:
                    best = (c, acc)
            c, acc = best
            shift_mean = float(np.mean([s for k, s in acc.items() if k != "clean"]))
            rec = {"encoder": a.encoder, "seed": seed, "variant": v, "C": c, "val": {**acc, "shift mean": shift_mean},
                   "seconds": round(time.time() - t0, 1)}
            results = [r for r in results if (r["encoder"], r["seed"], r["variant"]) != (a.encoder, seed, v)] + [rec]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
            print(f"seed {seed} {v:16s} C={c:<5g} validation clean {100 * acc['clean']:.1f} %, shifts' mean "
                  f"{100 * shift_mean:.1f} %, criterion {50 * (acc['clean'] + shift_mean):.1f}  ("
                  + ", ".join(f"{k} {100 * s:.0f}" for k, s in acc.items() if k != "clean") + ")", flush=True)


if __name__ == "__main__":
    main()
