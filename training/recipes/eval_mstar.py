"""MSTAR SOC-10 evaluation: random init vs pretrained encoders, quick mode (logistic regression on
the frozen embedding) vs full fine-tune, beside a small CNN trained from scratch on the same chips
with the same budget; N-shot and all-data, several seeds; accuracy on a held-out part of the
17-degree training split, as it is and with every test chip's gain shifted by +-3 dB (a stand-in for
another acquisition's calibration).

The 17-degree split is divided once (seeded, stratified) into a fine-tuning pool (70 %) and a test
part (30 %) the models never see; each fine-tuning run holds out its own validation share of the
pool for early stopping. Prints a table (mean +- std over seeds) and writes results.json.

Usage: .venv/bin/python training/recipes/eval_mstar.py --cnn --encoders random=none sare=runs/.../encoder.pkg
       [--modes head full] [--shots 40 all] [--seeds 0 1 2] [--epochs 40] [--max-minutes 6] [--out runs/eval_mstar]
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


def test_rows(model, test_dir: Path, contract: dict, shifts: list[float], size: int) -> dict:
    """Accuracy of ``model`` (normalised chips -> logits) on the test chips, as they are and with every
    chip's gain shifted by each of ``shifts`` dB (``apply_gain``: another acquisition's brightness)."""
    import torch

    from training.finetune.classify import class_folders, load_tensors
    from training.finetune.common import apply_gain, model_input

    chips = class_folders(test_dir)
    x, _ = load_tensors(chips.files, size, 1, contract["mean"], contract["std"])
    out = {}
    with torch.no_grad():
        for db in [0.0, *shifts]:
            xs = model_input(apply_gain(x, contract, db) if db else x, contract)  # the gain, then the contract
            pred = torch.cat([model(xs[i:i + 256]).argmax(1) for i in range(0, len(xs), 256)]).numpy()
            out["test_accuracy" if not db else f"test_accuracy_{db:+g}dB"] = float((pred == chips.labels).mean())
    return out


def cnn_row(pool: Path, test: Path, shots: str, seed: int, a) -> dict:
    """The small-CNN baseline on the same fine-tuning chips (split, shots, seed), augmentations, input
    standardisation (``--standardise``) and budget."""
    from training.baselines import train_small_cnn
    from training.finetune.classify import STANDARDISE, augment, class_folders, load_tensors, split
    from training.finetune.common import gain_jitter, model_input

    chips = class_folders(pool)
    tr, va = split(chips, 0.2, None if shots == "all" else int(shots), seed)
    contract = {"mean": [0.5], "std": [0.5], "units": "uint8", "clip": [0, 255]}
    if STANDARDISE[a.standardise]:
        contract["standardise"] = STANDARDISE[a.standardise]
    x, _ = load_tensors(chips.files, a.img_size, 1, contract["mean"], contract["std"])
    model, info = train_small_cnn(x, chips.labels, tr, va, epochs=a.epochs, max_minutes=a.max_minutes, seed=seed,
                                  augment=lambda b: gain_jitter(augment(b), contract, a.gain_db),
                                  prepare=lambda b: model_input(b, contract))
    return {**test_rows(model, test, contract, a.gain_shifts, a.img_size), "val_accuracy": info["val_accuracy"],
            "epochs_run": info["epochs_run"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "mstar_soc10" / "train_17deg"))
    ap.add_argument("--encoders", nargs="+", default=[], help="name=package (or name=none for random init)")
    ap.add_argument("--modes", nargs="+", default=["head", "full"], choices=["head", "full", "auto"],
                    help="fine-tuning modes run per encoder (head: logistic regression on the frozen embedding)")
    ap.add_argument("--cnn", action="store_true", help="also the small-CNN baseline row (same chips and budget)")
    ap.add_argument("--shots", nargs="+", default=["40", "all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--max-minutes", type=float, default=6.0)
    ap.add_argument("--gain-db", type=float, default=2.0, help="training gain augmentation (+-dB; 0: off)")
    ap.add_argument("--gain-shifts", nargs="*", type=float, default=[-3.0, 3.0],
                    help="also test on chips with this gain (dB): another acquisition's brightness")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--pool", default=None, choices=["mean", "blocks"], help="classify embedding (default: finetune's)")
    ap.add_argument("--standardise", default="median", choices=["median", "iqr", "none"],  # MSTAR chips: auto = median
                    help="per-chip input standardisation in dB (every row, the small CNN's too; see finetune --standardise)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "eval_mstar"))
    a = ap.parse_args()
    import torch

    from engine.package import load_package
    from training.finetune.classify import finetune_classifier
    from training.finetune.config import FinetuneConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    out = Path(a.out)
    pool, test = make_split(Path(a.data), out / "split")
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    std = a.standardise
    done = {(r["encoder"], r.get("mode", "full"), r["shots"], r["seed"], r.get("standardise", "none")) for r in results}
    runs = [("cnn", None, "cnn")] if a.cnn else []
    runs += [(spec.split("=", 1)[0], spec.split("=", 1)[1], m) for spec in a.encoders for m in a.modes]
    for name, pkg, mode in runs:
        for shots in a.shots:
            for seed in a.seeds:
                if (name, mode, shots, seed, std) in done:
                    continue
                t0 = time.time()
                if mode == "cnn":
                    rec = cnn_row(pool, test, shots, seed, a)
                else:
                    cfg = FinetuneConfig(encoder="" if pkg == "none" else pkg, img_size=a.img_size, in_chans=1,
                                         shots=None if shots == "all" else int(shots), seed=seed, epochs=a.epochs,
                                         max_minutes=a.max_minutes, warmup_epochs=min(5.0, a.epochs / 8),
                                         batch_size=32, patience=12, mode=mode, gain_db=a.gain_db, standardise=std,
                                         **({"pool": a.pool} if a.pool else {}))
                    dest = out / f"{name}_{mode}_{shots}_s{seed}_{std}.pkg"
                    r = finetune_classifier(pool, dest, cfg, overwrite=True)
                    pk = load_package(dest)
                    rec = {**test_rows(pk.model, test, pk.card.input, a.gain_shifts, a.img_size), "val_accuracy": r["val_accuracy"],
                           "epochs_run": r["epochs_run"], "kept": r["mode"], "pool": cfg.pool}
                rec = {"encoder": name, "mode": mode, "shots": shots, "seed": seed, "standardise": std, **rec,
                       "minutes": round((time.time() - t0) / 60, 2)}
                results.append(rec)
                (out / "results.json").write_text(json.dumps(results, indent=1))
                print(json.dumps(rec), flush=True)
    keys = ["test_accuracy"] + [f"test_accuracy_{d:+g}dB" for d in a.gain_shifts]
    print(f"\n{'row (standardise ' + std + ')':<22}{'shots':<7}" + "".join(f"{k.replace('test_accuracy', 'test'):>18}" for k in keys)
          + "   (mean +- std over seeds, %)")
    for name, _, mode in runs:
        for shots in a.shots:
            rs = [r for r in results if r["encoder"] == name and r.get("mode", "full") == mode and r["shots"] == shots
                  and r.get("standardise", "none") == std]
            if rs:
                cells = "".join(f"{100 * np.mean([r[k] for r in rs if k in r] or [np.nan]):>11.1f} +- "
                                f"{100 * np.std([r[k] for r in rs if k in r] or [np.nan]):4.1f}" for k in keys)
                print(f"{name + ' ' + mode:<22}{shots:<7}{cells}  (n={len(rs)})")


if __name__ == "__main__":
    main()
