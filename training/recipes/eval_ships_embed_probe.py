"""The other scorer the issue suggested for CFAR proposals, measured beside the small CNN: a logistic
regression on a frozen SARMAE encoder's pooled embedding of each proposal's chip (issue 14, item 2).

Same HRSID split, proposals and samples as ``eval_ships_learned.py`` (``training.finetune.
cfar_scored``: CFAR settings chosen on the training strip for coverage, IoU >= 0.5 positives, pieces
left out, 4 jittered copies of each labelled box), chips of ``--chip`` px in relative dB placed at
-20 dB and scaled by the encoder's input contract; embedding = mean of the final patch tokens and
the cls token (2 x D); scikit-learn's logistic regression (standardised, C = ``--c``). Test: every
proposal of the test strip scored, NMS 0.5, mAP@0.5 against the test ships (``score_detections``).

Usage: OMP_NUM_THREADS=1 .venv/bin/python training/recipes/eval_ships_embed_probe.py --encoder PKG
       [--seed 0] [--chip 64] [--out runs/eval_ships_embed_probe]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def embed(encoder, contract: dict, chips: np.ndarray, batch: int = 64) -> np.ndarray:
    """(n, 1, S, S) relative-dB chips (dB - median) / 10 -> (n, 2 D) pooled embeddings."""
    import torch

    lo, hi = contract["clip"]
    x = (np.clip(chips * 10.0 - 20.0, lo, hi) - lo) / (hi - lo)
    x = (x - contract["mean"][0]) / contract["std"][0]
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            f = encoder.forward_features(torch.from_numpy(x[i:i + batch].astype(np.float32)))
            out.append(torch.cat([f[:, 1:].mean(1), f[:, 0]], 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 2 * encoder.embed_dim), np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="an encoder package (e.g. from 'sarmae pretrain' + convert)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chip", type=int, default=64, help="chip size fed to the encoder (a multiple of its patch)")
    ap.add_argument("--c", type=float, default=0.1, help="inverse regularisation of the logistic regression")
    ap.add_argument("--out", default=str(ROOT / "runs" / "eval_ships_embed_probe"))
    a = ap.parse_args()
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from engine.cfar.objects import nms
    from engine.inference import InferenceOptions
    from training.cfar_baseline import cfar_boxes, truth_boxes
    from training.evaluate import score_detections
    from training.finetune.cfar_scored import CFAR_BASE, build_samples, choose_proposals
    from training.finetune.common import load_encoder
    from training.finetune.config import FinetuneConfig
    from training.recipes.eval_smoke import ships_data

    torch.manual_seed(a.seed)
    out = Path(a.out)
    d = ships_data(out / "hrsid")
    opts = InferenceOptions(bands=d["bands"], input_units=d["units"])
    names = ["ship"]
    t0 = time.time()
    truth = truth_boxes([d["train_raster"]], d["train_vector"], "class", names, opts)
    settings, _ = choose_proposals([d["train_raster"]], truth, names, opts, {**CFAR_BASE, "class_name": "ship"})
    _, props, _ = cfar_boxes([d["train_raster"]], settings, opts, names)
    data = build_samples([d["train_raster"]], truth, props, a.chip, opts, a.seed)
    enc = load_encoder(FinetuneConfig(encoder=a.encoder, img_size=a.chip, in_chans=1))
    model = enc.model.eval()
    x = embed(model, enc.input, data["chips"].numpy())
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=a.c, max_iter=2000))
    clf.fit(x, data["y"].numpy())
    train_s = time.time() - t0
    test_truth = truth_boxes([d["test_raster"]], d["test_vector"], "class", names, opts)
    _, (tp,), _ = cfar_boxes([d["test_raster"]], settings, opts, names)
    from engine.cfar.chips import read_chips
    from engine.cfar.scene import source_units
    from engine.reader import SarRaster

    with SarRaster.open(d["test_raster"], opts.bands) as src:
        from engine.cfar import CfarConfig

        units = source_units(src, CfarConfig(input_units=opts.input_units), [])
        chips = read_chips(src, units, tp[0], a.chip, "test", True)
    p = clf.predict_proba(embed(model, enc.input, chips))[:, 1]
    k = np.sort(nms(tp[0], p, 0.5))
    sc, _ = score_detections([(tp[0][k], p[k], tp[2][k])], test_truth, names, 0.5, (1.0, "Mpx"))
    r = {"seed": a.seed, "encoder": Path(a.encoder).name, "chip": a.chip, "c": a.c, "pfa": settings["pfa"],
         "samples": int(len(x)), "train_seconds": round(train_s, 1), "test_map_50": sc["map_50"], "test_map": sc["map"]}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
