"""MSTAR SOC-10 evaluation (issue: fine-tuning): random init vs pretrained encoders, N-shot and
all-data, several seeds; accuracy on a held-out part of the 17-degree training split.

The 17-degree split is divided once (seeded, stratified) into a fine-tuning pool (70 %) and a test
part (30 %) the models never see; each fine-tuning run holds out its own validation share of the
pool for early stopping. Prints a table (mean +- std over seeds) and writes results.json.

Usage: .venv/bin/python training/recipes/eval_mstar.py --encoders random=none sare=runs/.../encoder.pkg
       [--shots 40 all] [--seeds 0 1 2] [--epochs 40] [--max-minutes 6] [--out runs/eval_mstar]
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


def make_split(src: Path, out: Path, test_fraction: float = 0.3, seed: int = 1234) -> tuple[Path, Path]:
    """Symlink folders pool/<class>/ and test/<class>/ (stratified, seeded)."""
    rng = np.random.default_rng(seed)
    pool, test = out / "pool", out / "test"
    if pool.exists() and test.exists():
        return pool, test
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif"))
        idx = rng.permutation(len(files))
        n_test = int(round(test_fraction * len(files)))
        for k, i in enumerate(idx):
            dst = (test if k < n_test else pool) / cls.name / files[i].name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(files[i].resolve(), dst)
    return pool, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "mstar_soc10" / "train_17deg"))
    ap.add_argument("--encoders", nargs="+", required=True, help="name=package (or name=none for random init)")
    ap.add_argument("--shots", nargs="+", default=["40", "all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--max-minutes", type=float, default=6.0)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "runs" / "eval_mstar"))
    a = ap.parse_args()
    import torch

    from training.evaluate import evaluate_chips
    from training.finetune.classify import finetune_classifier
    from training.finetune.config import FinetuneConfig

    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(a.out)
    pool, test = make_split(Path(a.data), out / "split")
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    done = {(r["encoder"], r["shots"], r["seed"]) for r in results}
    for spec in a.encoders:
        name, pkg = spec.split("=", 1)
        for shots in a.shots:
            for seed in a.seeds:
                if (name, shots, seed) in done:
                    continue
                t0 = time.time()
                cfg = FinetuneConfig(encoder="" if pkg == "none" else pkg, img_size=a.img_size, in_chans=1,
                                     shots=None if shots == "all" else int(shots), seed=seed, epochs=a.epochs,
                                     max_minutes=a.max_minutes, warmup_epochs=min(5.0, a.epochs / 8),
                                     batch_size=32, patience=12)
                dest = out / f"{name}_{shots}_s{seed}.pkg"
                r = finetune_classifier(pool, dest, cfg, overwrite=True)
                ev = evaluate_chips(str(dest), str(test), out / f"{name}_{shots}_s{seed}_confusion.png")
                rec = {"encoder": name, "shots": shots, "seed": seed, "test_accuracy": ev["accuracy"],
                       "val_accuracy": r["val_accuracy"], "epochs_run": r["epochs_run"], "minutes": (time.time() - t0) / 60}
                results.append(rec)
                (out / "results.json").write_text(json.dumps(results, indent=1))
                print(json.dumps(rec), flush=True)
    print(f"\n{'encoder':<12}{'shots':<8}{'test accuracy (mean +- std over seeds)':<40}")
    for spec in a.encoders:
        name = spec.split("=", 1)[0]
        for shots in a.shots:
            accs = [r["test_accuracy"] for r in results if r["encoder"] == name and r["shots"] == shots]
            if accs:
                print(f"{name:<12}{shots:<8}{100 * np.mean(accs):6.2f} +- {100 * np.std(accs):5.2f}  (n={len(accs)})")


if __name__ == "__main__":
    main()
