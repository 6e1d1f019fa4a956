"""Chip classification under simulated changes of acquisition, on MSTAR SOC-10 (``--dataset mstar``,
the default) or OpenSARShip ship types (``--dataset opensarship``): every row (the ViT quick mode or
fine-tune on an encoder package, a plain logistic regression on its frozen pooled embedding, the
small CNN, the small CNN trained with random acquisition shifts, ``--mode auto``, averaged-probability
ensembles of finished rows, test-time augmentation) is scored on the same held-out chips as they are
and under each shift of ``training.acquisition`` (gain +-3 dB, 8-bit stretch gamma 0.7 / 1.4, fresh
speckle of 4 and 1 looks, resolution 0.8x / 1.25x, 10 degrees + 6 px), and on the validation chips
likewise (what recipes are chosen on; the test part chooses nothing).

mstar        the 17-degree split is divided once (seeded, stratified) into a fine-tuning pool (70 %)
             and a test part (30 %) the models never see.
opensarship  Sentinel-1 ship chips (calibrated float, the co-pol band; ``training.data.chips`` puts
             VV first in dual-pol chips) labelled by their AIS type: cargo, tanker, other (every
             other type); split BY SCENE (product): the chips of the products named by
             ``--test-scenes`` are the test part, the other products' chips the pool (``split.json``
             records it).
Each run holds out 20 % of the pool per class for validation (seeded) and draws its N shots (or
all) from the rest. Prints a table (test accuracy per shift, the shifts' mean, the clean test's
balanced accuracy, validation clean and shifted, training CPU minutes; mean +- std over seeds) and
the majority-class reference, and writes results.json and each row's class probabilities (probs/,
for the ensembles).

Rows: ``--cnn`` (small CNN), ``--cnn-acq`` (small CNN + acquisition jitter), per encoder (``--encoders
name=package``, ``name=none``: random init) and ``--modes``: head (quick ViT: logistic regression on
the frozen encoder's block-pooled embedding of 8 views per chip), lr (plain logistic regression on
its mean-pooled embedding, one view, no augmentation: the classical probe), full, auto (finetune's
``--mode auto``: the ViT route and the small CNN, the better on validation kept); ``--acq``: the
encoder rows with ``--acquisition-jitter``.

Usage: OMP_NUM_THREADS=1 .venv/bin/python training/recipes/eval_mstar.py --cnn --cnn-acq
       --encoders mae=runs/enc_pre_v2.pkg [--modes head lr auto] [--shots 40] [--seeds 0 1 2]
       [--epochs 15] [--ensemble "mae head+cnn"] [--tta] [--out runs/eval_mstar_shifts]
       [--dataset opensarship --shots all --img-size 64 --epochs 30 [--test-scenes 20160131T204259]]
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


OPENSARSHIP_TYPES = ("Cargo", "Tanker")  # AIS types kept as classes (lower case); every other type is "other"
OPENSARSHIP_TEST = ["20160131T204259"]  # the largest product (124 chips, 41 %, all three classes), chosen before any run


def scene_split(src: Path, out: Path, test_scenes: list[str]) -> tuple[Path, Path]:
    """OpenSARShip: symlink folders pool/<class>/ and test/<class>/ by product (scene): a product
    whose folder name contains one of ``test_scenes`` goes to test; class = the file name's AIS type
    (``Cargo_x1446_y3299.tif``): cargo, tanker or other."""
    pool, test = out / "pool", out / "test"
    record = out / "split.json"
    if record.exists():
        if json.loads(record.read_text())["test_scenes"] != list(test_scenes):
            raise SystemExit(f"{out} holds a split with other test scenes ({record}); use another --out")
        return pool, test
    products = sorted(p for p in src.iterdir() if (p / "Patch_Cal").is_dir())
    if not products:
        raise SystemExit(f"{src}: no OpenSARShip product folder (<product>/Patch_Cal/*.tif) found; give --data")
    unknown = [t for t in test_scenes if not any(t in p.name for p in products)]
    if unknown:
        raise SystemExit(f"--test-scenes {unknown} match no product in {src} ({', '.join(p.name for p in products)})")
    counts: dict[str, dict[str, int]] = {}
    for prod in products:
        part = "test" if any(t in prod.name for t in test_scenes) else "pool"
        tag = prod.name.split("_")[4]  # the acquisition start, e.g. 20160131T204259
        for f in sorted((prod / "Patch_Cal").glob("*.tif")):
            kind = f.stem.rsplit("_x", 1)[0]
            cls = kind.lower() if kind in OPENSARSHIP_TYPES else "other"
            dst = out / part / cls / f"{tag}_{f.name.replace(' ', '_')}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(f.resolve(), dst)
            counts.setdefault(part, {}).setdefault(cls, 0)
            counts[part][cls] += 1
    record.write_text(json.dumps({"test_scenes": list(test_scenes), "chips": counts}, indent=1))
    print(f"OpenSARShip split by scene: {counts}", flush=True)
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

    from engine.models.heads import dihedral
    from training.finetune.common import model_input

    def run(xs):
        out = []
        with torch.no_grad():
            for i in range(0, len(xs), 128):
                xb = xs[i:i + 128].float()
                views = [dihedral(xb, k) for k in range(8 if tta else 1)]
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
        out[part] = {**accuracy_table(p, data[part + "_labels"]),
                     "balanced clean": balanced_accuracy(p["clean"], data[part + "_labels"])}
        saved.update({f"{part}/{k}": v.astype(np.float32) for k, v in p.items()})
    probs_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(probs_file, **saved)
    return out


def cnn_row(pool: Path, shots: str, seed: int, a, acq: bool, tag: str = "cnn"):
    """The small CNN on the same fine-tuning chips (split, shots, seed), flips / rotations, input
    standardisation (``--standardise``) and budget; with ``acq`` its training chips also get random
    acquisition shifts (``training.acquisition.acquisition_jitter``) instead of a gain alone."""
    import torch

    from engine.card import default_input
    from training.acquisition import acquisition_jitter
    from training.baselines import train_small_cnn
    from training.finetune.classify import (
        augment,
        class_folders,
        contract_for,
        load_tensors,
        split,
        with_standardise,
    )
    from training.finetune.common import gain_jitter, model_input
    from training.finetune.config import FinetuneConfig

    chips = class_folders(pool)
    tr, va = split(chips, 0.2, None if shots == "all" else int(shots), seed)
    x, kind = load_tensors(chips.files, a.img_size, 1, [0.5], [0.5])
    contract = contract_for(kind, default_input(1), 1, (-35.0, 10.0))  # as finetune's contract for these chips
    contract, _ = with_standardise(contract, FinetuneConfig(standardise=a.standardise, smooth=a.smooth))  # as finetune
    gen = torch.Generator().manual_seed(seed)
    jitter = ((lambda b: acquisition_jitter(augment(b), contract, a.gain_db, warp=a.acq_warp, generator=gen)) if acq
              else (lambda b: gain_jitter(augment(b), contract, a.gain_db)))
    model, info = train_small_cnn(x, chips.labels, tr, va, epochs=a.epochs, max_minutes=a.max_minutes, seed=seed,
                                  augment=jitter, prepare=lambda b: model_input(b, contract))
    torch.save(model.state_dict(), Path(a.out) / f"{tag}_{shots}_s{seed}_{a.std_label}.pt")
    return model, contract, {"epochs_run": info["epochs_run"]}


def balanced_accuracy(prob: np.ndarray, labels: np.ndarray) -> float:
    """The mean over the classes present of each one's recall (chance: 1 / classes, whatever their shares)."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, np.asarray(prob).argmax(1)))


def ensemble_scores(out: Path, keys: list[str], data: dict, seed: int) -> dict:
    """Accuracy of the averaged class probabilities of rows ``keys`` (their saved probabilities)."""
    from training.acquisition import accuracy_table

    files = [np.load(out / "probs" / f"{k}.npz") for k in keys]
    res = {}
    for part in ("val", "test"):
        names = [n.split("/", 1)[1] for n in files[0].files if n.startswith(part + "/")]
        probs = {n: np.mean([f[f"{part}/{n}"] for f in files], 0) for n in names}
        labels = data[f"{part}_labels"] if part == "test" else data["val_by_seed"][seed]
        res[part] = {**accuracy_table(probs, labels), "balanced clean": balanced_accuracy(probs["clean"], labels)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mstar", choices=["mstar", "opensarship"])
    ap.add_argument("--data", default=None, help="the data set's folder (default: its place in ../shared/data)")
    ap.add_argument("--test-scenes", nargs="+", default=OPENSARSHIP_TEST,
                    help="opensarship: products (a part of their folder name) whose chips are the test part")
    ap.add_argument("--encoders", nargs="+", default=[], help="name=package (or name=none for random init)")
    ap.add_argument("--modes", nargs="+", default=["head"], choices=["head", "lr", "full", "auto"],
                    help="rows run per encoder (head: quick mode; lr: plain logistic regression on the frozen "
                         "mean-pooled embedding; full; auto: finetune --mode auto, ViT route or small CNN)")
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
    ap.add_argument("--standardise", default="auto", choices=["auto", "median", "iqr", "none"],
                    help="per-chip input standardisation in dB (every row, the small CNN's too; see finetune "
                         "--standardise; auto: median for 8-bit chips such as MSTAR's, none for calibrated ones)")
    ap.add_argument("--smooth", type=float, default=None,
                    help="Gaussian low-pass (px) of each standardised chip, every row (finetune --smooth; default: "
                         "finetune's); rows of another setting are kept apart in results.json")
    ap.add_argument("--out", default=None, help="default: runs/eval_mstar_shifts, runs/eval_opensarship")
    a = ap.parse_args()
    import torch

    from engine.package import load_package
    from training.acquisition import DEFAULT_SHIFTS, parse_shift
    from training.finetune.classify import class_folders, finetune_classifier, load_tensors, split
    from training.finetune.config import FinetuneConfig

    a.shift_list = DEFAULT_SHIFTS if a.shifts is None else [parse_shift(t) for t in a.shifts]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    shared = ROOT / ".." / "shared" / "data"
    data_dir = Path(a.data) if a.data else shared / ("mstar_soc10/train_17deg" if a.dataset == "mstar" else "opensarship")
    out = Path(a.out or ROOT / "runs" / ("eval_mstar_shifts" if a.dataset == "mstar" else "eval_opensarship"))
    out.mkdir(parents=True, exist_ok=True)
    a.out = str(out)
    pool, test = (make_split(data_dir, out / "split") if a.dataset == "mstar"
                  else scene_split(data_dir, out / "split", a.test_scenes))
    pool_chips, test_chips = class_folders(pool), class_folders(test)
    if pool_chips.classes != test_chips.classes:
        raise SystemExit(f"the pool's classes {pool_chips.classes} differ from the test part's {test_chips.classes}")
    if a.standardise == "auto":  # finetune's rule: median for 8-bit display chips, none for calibrated values
        a.standardise = "median" if load_tensors(pool_chips.files[:1], 16, 1, [0.5], [0.5])[1] == "uint8" else "none"
    data = {"test_files": test_chips.files, "test_labels": test_chips.labels, "cache": {}, "val_by_seed": {}}
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    from training.finetune.classify import SMOOTH_DEFAULT

    smooth = SMOOTH_DEFAULT if a.smooth is None else a.smooth
    # the results' "standardise" label: the choice, plus the low-pass when there is one (older results: none)
    std = a.std_label = a.standardise + (f"-s{smooth:g}" if smooth and a.standardise != "none" else "")
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
                       else f"{name} {mode}" + (" acq" + tag if a.acq and mode != "lr" else ""))
                todo = [(row, False)] + ([(row + " +TTA", True)] if a.tta and mode == "cnn" else [])
                rows += [r for r, _ in todo if r not in rows]
                if all((r, shots, seed, std) in done for r, _ in todo):
                    continue
                t0, c0 = time.time(), time.process_time()
                if mode == "cnn":
                    model, contract, info = cnn_row(pool, shots, seed, a, acq=name == "cnn-acq", tag=row)
                else:
                    plain = {"pool": "mean", "augment": False} if mode == "lr" else {}  # the probe
                    cfg = FinetuneConfig(encoder="" if pkg == "none" else pkg, img_size=a.img_size, in_chans=1,
                                         shots=None if shots == "all" else int(shots), seed=seed, epochs=a.epochs,
                                         max_minutes=a.max_minutes, warmup_epochs=min(5.0, a.epochs / 8),
                                         batch_size=32, patience=12, mode="head" if mode == "lr" else mode, gain_db=a.gain_db, standardise=a.standardise,
                                         smooth=smooth if a.standardise != "none" else None,
                                         acquisition=a.acq and mode != "lr", acquisition_warp=a.acq_warp,
                                         **({"pool": a.pool} if a.pool else {}), **plain)
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
    print_table(results, rows, a.shots, std, a.dataset)
    top = int(np.bincount(pool_chips.labels).argmax())
    print(f"majority class of the pool ({pool_chips.classes[top]}): test accuracy "
          f"{100 * np.mean(test_chips.labels == top):.1f} %, balanced {100 / len(test_chips.classes):.1f} %; test chips "
          + ", ".join(f"{c} {int(np.sum(test_chips.labels == k))}" for k, c in enumerate(test_chips.classes)))


def print_table(results: list[dict], rows: list[str], shots_list: list[str], std: str, dataset: str = "mstar") -> None:
    """Test accuracy (%) per row: clean, each shift, the shifts' mean, the clean test's balanced
    accuracy; validation clean and shifted; mean +- std over seeds; training CPU minutes."""
    for shots in shots_list:
        rs = [r for r in results if r["shots"] == shots and r["standardise"] == std and r["row"] in rows]
        if not rs:
            continue
        cols = list(dict.fromkeys(c for r in rs for c in r["test"]))
        title = "MSTAR SOC-10" if dataset == "mstar" else "OpenSARShip cargo / tanker / other, test scenes held out"
        print(f"\n{title}, {shots} shots, standardise {std}: test accuracy %, mean +- std over seeds")
        print("| row | seeds | " + " | ".join(cols) + " | val clean | val shift mean | train CPU min |")
        print("|---" * (len(cols) + 5) + "|")
        for row in rows:
            got = [r for r in rs if r["row"] == row]
            if not got:
                continue

            def cell(vals: list[float]) -> str:
                return f"{100 * np.mean(vals):.1f} +- {100 * np.std(vals):.1f}" if len(vals) > 1 else f"{100 * vals[0]:.1f}"
            cells = [cell([r["test"][c] for r in got if c in r["test"]] or [float("nan")]) for c in cols]
            cells += [cell([r["val"]["clean"] for r in got]), cell([r["val"]["shift mean"] for r in got])]
            cpu = [r.get("train_cpu_minutes", 0) for r in got]
            print(f"| {row} | {len(got)} | " + " | ".join(cells) + f" | {np.mean(cpu):.1f} |")


if __name__ == "__main__":
    main()
