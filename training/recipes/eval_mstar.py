"""MSTAR SOC-10 chip classification under simulated changes of acquisition: every row (the ViT quick
mode or fine-tune on an encoder package, the small CNN, the small CNN trained with random acquisition
shifts, averaged-probability ensembles of finished rows, test-time augmentation) is scored on the
same held-out chips as they are and under each shift of ``training.acquisition`` (gain +-3 dB, 8-bit
stretch gamma 0.7 / 1.4, fresh speckle of 4 and 1 looks, resolution 0.8x / 1.25x, 10 degrees + 6 px),
and on the validation chips likewise (what recipes are chosen on; the test part chooses nothing).

The 17-degree split is divided once (seeded, stratified) into a fine-tuning pool (70 %) and a test
part (30 %) the models never see; each run holds out 20 % of the pool per class for validation
(seeded) and draws its N shots from the rest. Prints a table (test accuracy per shift, the shifts'
mean, validation clean and shifted, training CPU minutes; mean +- std over seeds) and writes
results.json and each row's class probabilities (probs/, for the ensembles).

Usage: OMP_NUM_THREADS=1 .venv/bin/python training/recipes/eval_mstar.py --cnn --cnn-acq
       --encoders mae=runs/enc_pre_v2.pkg [--modes head] [--shots 40] [--seeds 0 1 2] [--epochs 15]
       [--ensemble "mae head+cnn"] [--tta] [--out runs/eval_mstar_shifts]
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


def shift_sets(files: list[str], contract: dict, size: int, shifts, cache: dict) -> dict:
    """The chips of ``files`` as they are and under each acquisition shift (``training.acquisition``),
    normalised by ``contract``'s mean / std (cached per mean / std: every row sees the same chips)."""
    from training.acquisition import shifted_sets
    from training.finetune.classify import load_tensors

    key = (tuple(files[:3]), len(files), tuple(contract["mean"]), tuple(contract["std"]))
    if key not in cache:
        x, _ = load_tensors(files, size, 1, contract["mean"], contract["std"])
        cache[key] = shifted_sets(x, contract, shifts, seed=0)
    return cache[key]


def probabilities(model, contract: dict, tta: bool = False):
    """normalised chips -> (N, K) class probabilities of ``model`` through the contract's standardisation;
    with ``tta`` the mean over the 8 flips / 90-degree rotations of each chip."""
    import torch

    from training.finetune.common import model_input

    def run(xs):
        out = []
        with torch.no_grad():
            for i in range(0, len(xs), 128):
                xb = xs[i:i + 128].float()
                views = [torch.rot90(xb.flip(-1) if k >= 4 else xb, k % 4, (-2, -1)) for k in range(8 if tta else 1)]
                out.append(torch.stack([model(model_input(v, contract)).softmax(1) for v in views]).mean(0))
        return torch.cat(out).numpy()
    return run


def score_row(prob, contract: dict, a, data: dict, probs_file: Path) -> dict:
    """Accuracy of ``prob`` on the test chips (clean and shifted) and on the validation chips (clean
    and shifted, what recipes are chosen on); the probabilities are kept for ensembles."""
    from training.acquisition import accuracy_table

    out, saved = {}, {}
    for part in ("val", "test"):
        sets = shift_sets(data[part + "_files"], contract, a.img_size, a.shift_list, data["cache"])
        p = {k: prob(v) for k, v in sets.items()}
        out[part] = accuracy_table(p, data[part + "_labels"])
        saved.update({f"{part}/{k}": v.astype(np.float32) for k, v in p.items()})
    probs_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(probs_file, **saved)
    return out


def cnn_row(pool: Path, shots: str, seed: int, a, acq: bool, tag: str = "cnn"):
    """The small CNN on the same fine-tuning chips (split, shots, seed), flips / rotations, input
    standardisation (``--standardise``) and budget; with ``acq`` its training chips also get random
    acquisition shifts (``training.acquisition.acquisition_jitter``) instead of a gain alone."""
    import torch

    from training.acquisition import acquisition_jitter
    from training.baselines import train_small_cnn
    from training.finetune.classify import STANDARDISE, augment, class_folders, load_tensors, split
    from training.finetune.common import gain_jitter, model_input

    chips = class_folders(pool)
    tr, va = split(chips, 0.2, None if shots == "all" else int(shots), seed)
    contract = {"mean": [0.5], "std": [0.5], "units": "uint8", "clip": [0, 255]}
    if STANDARDISE[a.standardise]:
        contract["standardise"] = STANDARDISE[a.standardise]
    x, _ = load_tensors(chips.files, a.img_size, 1, contract["mean"], contract["std"])
    gen = torch.Generator().manual_seed(seed)
    jitter = ((lambda b: acquisition_jitter(augment(b), contract, a.gain_db, warp=a.acq_warp, generator=gen)) if acq
              else (lambda b: gain_jitter(augment(b), contract, a.gain_db)))
    model, info = train_small_cnn(x, chips.labels, tr, va, epochs=a.epochs, max_minutes=a.max_minutes, seed=seed,
                                  augment=jitter, prepare=lambda b: model_input(b, contract))
    torch.save(model.state_dict(), Path(a.out) / f"{tag}_{shots}_s{seed}_{a.standardise}.pt")
    return model, contract, {"epochs_run": info["epochs_run"]}


def ensemble_scores(out: Path, keys: list[str], data: dict, seed: int) -> dict:
    """Accuracy of the averaged class probabilities of rows ``keys`` (their saved probabilities)."""
    from training.acquisition import accuracy_table

    files = [np.load(out / "probs" / f"{k}.npz") for k in keys]
    res = {}
    for part in ("val", "test"):
        names = [n.split("/", 1)[1] for n in files[0].files if n.startswith(part + "/")]
        probs = {n: np.mean([f[f"{part}/{n}"] for f in files], 0) for n in names}
        res[part] = accuracy_table(probs, data[f"{part}_labels"] if part == "test" else data["val_by_seed"][seed])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "mstar_soc10" / "train_17deg"))
    ap.add_argument("--encoders", nargs="+", default=[], help="name=package (or name=none for random init)")
    ap.add_argument("--modes", nargs="+", default=["head"], choices=["head", "full", "auto"],
                    help="fine-tuning modes run per encoder (head: logistic regression on the frozen embedding)")
    ap.add_argument("--cnn", action="store_true", help="the small-CNN baseline row (same chips and budget)")
    ap.add_argument("--cnn-acq", action="store_true", help="the small CNN trained with random acquisition shifts")
    ap.add_argument("--acq", action="store_true",
                    help="encoder rows: the quick / fine-tune training chips also get random acquisition shifts "
                         "(finetune --acquisition-jitter); rows named '<encoder> <mode> acq'")
    ap.add_argument("--acq-warp", type=float, default=0.5,
                    help="with --acq / --cnn-acq: the share of training chips also resampled (zoom, rotation, "
                         "translation; rows named '... acq-w<percent>' unless 1)")
    ap.add_argument("--tta", action="store_true", help="also each CNN row with test-time augmentation (8 views)")
    ap.add_argument("--ensemble", nargs="*", default=[], metavar="ROW+ROW",
                    help="rows averaging the class probabilities of finished rows, e.g. 'mae head+cnn'")
    ap.add_argument("--shots", nargs="+", default=["40"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--gain-db", type=float, default=2.0, help="training gain augmentation (+-dB; 0: off)")
    ap.add_argument("--shifts", nargs="*", default=None,
                    help="acquisition shifts of the test (and validation) chips, e.g. gain:-3 gamma:0.7 speckle:1 "
                         "zoom:0.8 pose:10:6 (default: training.acquisition.DEFAULT_SHIFTS)")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--pool", default=None, choices=["mean", "blocks"], help="classify embedding (default: finetune's)")
    ap.add_argument("--standardise", default="median", choices=["median", "iqr", "none"],  # MSTAR chips: auto = median
                    help="per-chip input standardisation in dB (every row, the small CNN's too; see finetune --standardise)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "eval_mstar_shifts"))
    a = ap.parse_args()
    import torch

    from engine.package import load_package
    from training.acquisition import DEFAULT_SHIFTS, parse_shift
    from training.finetune.classify import class_folders, finetune_classifier, split
    from training.finetune.config import FinetuneConfig

    a.shift_list = DEFAULT_SHIFTS if a.shifts is None else [parse_shift(t) for t in a.shifts]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    out = Path(a.out)
    pool, test = make_split(Path(a.data), out / "split")
    pool_chips, test_chips = class_folders(pool), class_folders(test)
    data = {"test_files": test_chips.files, "test_labels": test_chips.labels, "cache": {}, "val_by_seed": {}}
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    std = a.standardise
    done = {(r["row"], r["shots"], r["seed"], r["standardise"]) for r in results}
    runs = [("cnn", None, "cnn")] if a.cnn else []
    runs += [("cnn-acq", None, "cnn")] if a.cnn_acq else []
    runs += [(spec.split("=", 1)[0], spec.split("=", 1)[1], m) for spec in a.encoders for m in a.modes]
    rows = []
    for name, pkg, mode in runs:
        for shots in a.shots:
            for seed in a.seeds:
                _, va = split(pool_chips, 0.2, None if shots == "all" else int(shots), seed)
                data.update(val_files=[pool_chips.files[i] for i in va], val_labels=pool_chips.labels[va])
                data["val_by_seed"][seed] = pool_chips.labels[va]
                tag = "" if a.acq_warp == 1 else f"-w{round(100 * a.acq_warp)}"
                row = (name + (tag if name == "cnn-acq" else "") if mode == "cnn"
                       else f"{name} {mode}" + (" acq" + tag if a.acq else ""))
                todo = [(row, False)] + ([(row + " +TTA", True)] if a.tta and mode == "cnn" else [])
                rows += [r for r, _ in todo if r not in rows]
                if all((r, shots, seed, std) in done for r, _ in todo):
                    continue
                t0, c0 = time.time(), time.process_time()
                if mode == "cnn":
                    model, contract, info = cnn_row(pool, shots, seed, a, acq=name == "cnn-acq", tag=row)
                else:
                    cfg = FinetuneConfig(encoder="" if pkg == "none" else pkg, img_size=a.img_size, in_chans=1,
                                         shots=None if shots == "all" else int(shots), seed=seed, epochs=a.epochs,
                                         max_minutes=a.max_minutes, warmup_epochs=min(5.0, a.epochs / 8),
                                         batch_size=32, patience=12, mode=mode, gain_db=a.gain_db, standardise=std,
                                         acquisition=a.acq, acquisition_warp=a.acq_warp,
                                         **({"pool": a.pool} if a.pool else {}))
                    dest = out / f"{row.replace(' ', '_')}_{shots}_s{seed}_{std}.pkg"
                    r = finetune_classifier(pool, dest, cfg, overwrite=True)
                    pk = load_package(dest)
                    model, contract = pk.model, pk.card.input.to_dict()
                    info = {"epochs_run": r["epochs_run"], "kept": r["mode"]}
                train_min, train_cpu = (time.time() - t0) / 60, (time.process_time() - c0) / 60
                for rname, tta in todo:
                    key = f"{rname.replace(' ', '_')}_{shots}_s{seed}_{std}"
                    sc = score_row(probabilities(model, contract, tta), contract, a, data, out / "probs" / f"{key}.npz")
                    rec = {"row": rname, "key": key, "shots": shots, "seed": seed, "standardise": std, **sc, **info,
                           "train_minutes": round(train_min, 2), "train_cpu_minutes": round(train_cpu, 2),
                           "minutes": round((time.time() - t0) / 60, 2)}
                    results.append(rec)
                    (out / "results.json").write_text(json.dumps(results, indent=1))
                    print(json.dumps(rec), flush=True)
    if not runs:  # a table of what results.json holds (e.g. after merging runs), and any ensembles
        rows = list(dict.fromkeys(r["row"] for r in results if r["standardise"] == std and "+" not in r["row"]))
    for spec in a.ensemble:
        parts = spec.split("+")
        for shots in a.shots:
            for seed in a.seeds:
                have = {r["row"]: r for r in results if r["shots"] == shots and r["seed"] == seed and r["standardise"] == std}
                if any(p not in have for p in parts):
                    continue
                if seed not in data["val_by_seed"]:
                    _, va = split(pool_chips, 0.2, None if shots == "all" else int(shots), seed)
                    data["val_by_seed"][seed] = pool_chips.labels[va]
                sc = ensemble_scores(out, [have[p]["key"] for p in parts], data, seed)
                results = [r for r in results if not (r["row"] == spec and r["shots"] == shots and r["seed"] == seed
                                                      and r["standardise"] == std)]
                results.append({"row": spec, "shots": shots, "seed": seed, "standardise": std, **sc,
                                "train_cpu_minutes": round(sum(have[p].get("train_cpu_minutes", 0) for p in parts), 2)})
                (out / "results.json").write_text(json.dumps(results, indent=1))
        rows += [spec] if spec not in rows else []
    print_table(results, rows, a.shots, std)


def print_table(results: list[dict], rows: list[str], shots_list: list[str], std: str) -> None:
    """Test accuracy (%) per row: clean, each shift, the shifts' mean; validation clean and shifted;
    mean +- std over seeds; training CPU minutes."""
    for shots in shots_list:
        rs = [r for r in results if r["shots"] == shots and r["standardise"] == std and r["row"] in rows]
        if not rs:
            continue
        cols = list(rs[0]["test"])
        print(f"\nMSTAR SOC-10, {shots} shots, standardise {std}: test accuracy %, mean +- std over seeds")
        print("| row | seeds | " + " | ".join(cols) + " | val clean | val shift mean | train CPU min |")
        print("|---" * (len(cols) + 5) + "|")
        for row in rows:
            got = [r for r in rs if r["row"] == row]
            if not got:
                continue

            def cell(vals: list[float]) -> str:
                return f"{100 * np.mean(vals):.1f} +- {100 * np.std(vals):.1f}" if len(vals) > 1 else f"{100 * vals[0]:.1f}"
            cells = [cell([r["test"][c] for r in got]) for c in cols]
            cells += [cell([r["val"]["clean"] for r in got]), cell([r["val"]["shift mean"] for r in got])]
            cpu = [r.get("train_cpu_minutes", 0) for r in got]
            print(f"| {row} | {len(got)} | " + " | ".join(cells) + f" | {np.mean(cpu):.1f} |")


if __name__ == "__main__":
    main()
