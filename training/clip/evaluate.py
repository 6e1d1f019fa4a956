"""``sarmae evaluate`` on a zeroshot (CLIP) package: zero-shot classification and retrieval.

- Zero-shot: each image against the prompt-ensemble embeddings of class names (the engine's
  ``text_embeddings``: mean of the normalised template embeddings): top-1, top-5 and mean per-class
  accuracy, confusion matrix. Class folders (``--chips``: sub-folder names, a leading ``<k>-``
  index dropped as ``sarmae captions`` drops it) or a caption table (``--pairs``: the ``class``
  column, scored per ``source`` among that source's classes, on the rows of ``--split``).
- Retrieval on a caption table's split: recall@1/5/10 image -> text and text -> image. Captions are
  made from templates, so several images share one caption text: the gallery is the UNIQUE
  captions; an image counts as found when its caption text is in the top k, a caption when any of
  its images is (as for COCO's five captions per image).
- Baselines (``baselines=True``, with a table): per source, chance (the most frequent class) and a
  logistic regression on the same image tower's frozen, normalised embedding, fitted on the
  table's training rows and scored on the same held-out rows: what the images alone give.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from engine.errors import SarmaeError

from ..finetune.metrics import classification_metrics, confusion_png
from .captions import read_table
from .images import read_for_clip


def embed_images(model, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(N, 3, S, S) prepared images -> (N, D) unit-norm embeddings (no gradient, eval mode kept by caller)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = [model.encode_image(x[i:i + batch].float().to(device), normalize=True).float().cpu()
               for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.zeros((0, 1))


def topk_metrics(logits: torch.Tensor, truth: np.ndarray, classes: list[str]) -> dict:
    """Top-1 / top-5 / mean per-class accuracy (over the classes that have rows; the confusion
    matrix too) of (N, K) scores."""
    k = min(5, len(classes))
    top = logits.topk(k, dim=1).indices.numpy()
    m = classification_metrics(truth, top[:, 0], classes)
    per_class = m["per_class_accuracy"]
    return {"top1": float((top[:, 0] == truth).mean()), "top5": float((top == truth[:, None]).any(1).mean()),
            "mean_per_class": float(np.mean([v for v in per_class.values() if v is not None])),
            "per_class": per_class,
            "n": int(len(truth)), "classes": list(classes), "confusion": m["confusion"]}


def zeroshot(clip, img: torch.Tensor, truth_names: list[str], classes: list[str],
             templates: list[str] | None = None) -> dict:
    """Zero-shot metrics of images (embedded) against ``classes`` by the prompt ensemble."""
    from engine.clip import text_embeddings

    cls_emb = text_embeddings(clip, classes, templates).float().cpu()
    truth = np.array([classes.index(c) for c in truth_names])
    return topk_metrics(img @ cls_emb.T, truth, classes)


def retrieval(img: torch.Tensor, txt_unique: torch.Tensor, caption_index: np.ndarray,
              ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Recall@k both ways with unique captions (module docstring). ``caption_index``: (N,) the
    unique caption of each image."""
    sim = img @ txt_unique.T  # (N images, U captions)
    out = {}
    order_i2t = sim.argsort(dim=1, descending=True).numpy()
    rank_i2t = np.argmax(order_i2t == caption_index[:, None], axis=1)
    order_t2i = sim.T.argsort(dim=1, descending=True).numpy()  # (U, N)
    first = np.full(len(txt_unique), np.iinfo(np.int64).max)
    for u in range(len(txt_unique)):
        hits = np.nonzero(caption_index[order_t2i[u]] == u)[0]
        if len(hits):
            first[u] = hits[0]
    has = first < np.iinfo(np.int64).max
    for k in ks:
        out[f"image_to_text_r{k}"] = float((rank_i2t < k).mean())
        out[f"text_to_image_r{k}"] = float((first[has] < k).mean())
        out[f"mean_r{k}"] = (out[f"image_to_text_r{k}"] + out[f"text_to_image_r{k}"]) / 2
    out["images"], out["unique_captions"] = int(len(img)), int(has.sum())
    return out


def table_metrics(clip, img: torch.Tensor, captions: list[str], classes: list[str], sources: list[str],
                  templates: list[str] | None = None) -> dict:
    """Zero-shot per source and retrieval on already-embedded rows of a caption table."""
    from engine.clip import encode_phrases

    unique = sorted(set(captions))
    cap_idx = np.array([unique.index(c) for c in captions])
    txt = torch.cat([encode_phrases(clip, unique[i:i + 512], "the caption table").float().cpu()
                     for i in range(0, len(unique), 512)])
    out = {"retrieval": retrieval(img, txt, cap_idx), "zeroshot": {}}
    for src in sorted(set(sources)):
        rows = [i for i, s in enumerate(sources) if s == src and classes[i]]
        names = sorted({classes[i] for i in rows})
        if len(names) >= 2:
            out["zeroshot"][src] = zeroshot(clip, img[rows], [classes[i] for i in rows], names, templates)
    return out


def logistic_baseline(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str],
                      classes: list[str], seed: int = 0) -> dict:
    """A class-balanced logistic regression on frozen embeddings: fitted on training rows, scored held out."""
    from sklearn.linear_model import LogisticRegression

    known = [c for c in classes if c in set(train_y)]
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    clf.fit(train_x, [known.index(c) for c in train_y])
    proba = torch.zeros((len(test_x), len(classes)))
    proba[:, [classes.index(c) for c in known]] = torch.from_numpy(clf.predict_proba(test_x)).float()
    return topk_metrics(proba, np.array([classes.index(c) for c in test_y]), classes)


def class_folder_names(root: Path) -> tuple[list[str], list[str]]:
    """(files, class name per file) of class folders, a leading '<k>-' index dropped from names."""
    from ..data.chips import find_chips

    if not root.is_dir():
        raise SarmaeError(f"{root}: class folder not found; give a folder with one sub-folder of chips per class")
    files, names = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            found = find_chips(d)
        except Exception:  # noqa: BLE001 - an empty folder
            found = []
        files += found
        names += [re.sub(r"^\d+[-_ ]", "", d.name)] * len(found)
    if len(set(names)) < 2:
        raise SarmaeError(f"{root}: zero-shot evaluation needs at least two class sub-folders with chips")
    return files, names


def evaluate_zeroshot(package: str, png: Path, chips: str | None = None, pairs: str | None = None,
                      split: str = "val", classes: list[str] | None = None, templates: list[str] | None = None,
                      baselines: bool = False) -> dict:
    """The zeroshot package on class folders and/or a caption table (module docstring); one dict."""
    from engine.clip import load_clip

    if not chips and not pairs:
        raise SarmaeError("give the evaluation data: --chips DIR (class folders) and/or --pairs CSV (caption table)")
    clip = load_clip(package)
    out: dict = {"task": "zeroshot", "package": str(package),
                 "templates": list(templates or clip.templates)}
    if chips:
        files, names = class_folder_names(Path(chips))
        im = read_for_clip(files, clip.card)
        names = [names[i] for i in im.keep]
        cls = list(classes) if classes else sorted(set(names))
        keep = [i for i, n in enumerate(names) if n in cls]
        m = zeroshot(clip, embed_images(clip.model, im.x[keep]), [names[i] for i in keep], cls, templates)
        confusion_png(np.asarray(m["confusion"]), cls, png, "zero-shot confusion matrix")
        out["chips"] = {**m, "unreadable": len(im.bad), "unknown_classes": sorted(set(names) - set(cls)),
                        "confusion_matrix_png": str(png)}
    if pairs:
        table = read_table(pairs)
        test = table.subset(split or None)
        if not len(test):
            raise SarmaeError(f"{pairs}: no row in split '{split}' (splits: {sorted(set(table.splits))})")
        im = read_for_clip(test.images, clip.card)
        pick = lambda v: [v[i] for i in im.keep]  # noqa: E731
        img = embed_images(clip.model, im.x)
        r = table_metrics(clip, img, pick(test.captions), pick(test.classes), pick(test.sources), templates)
        r.update(split=split, rows=len(im.keep), skipped=test.skipped, unreadable=len(im.bad))
        if baselines:
            r["baselines"] = _table_baselines(clip, table, split, img, pick(test.classes), pick(test.sources))
        out["pairs"] = r
    for part in ("chips",):
        out.get(part, {}).pop("confusion", None)
    for m in out.get("pairs", {}).get("zeroshot", {}).values():
        m.pop("confusion", None)
    return out


def _table_baselines(clip, table, split: str, test_img: torch.Tensor, test_cls: list[str],
                     test_src: list[str]) -> dict:
    train = table.subset("train" if split != "train" else None)
    im = read_for_clip(train.images, clip.card)
    tr_img = embed_images(clip.model, im.x).numpy()
    tr_cls, tr_src = [train.classes[i] for i in im.keep], [train.sources[i] for i in im.keep]
    rows = {}
    for src in sorted(set(test_src)):
        te = [i for i, s in enumerate(test_src) if s == src and test_cls[i]]
        tr = [i for i, s in enumerate(tr_src) if s == src and tr_cls[i]]
        names = sorted({test_cls[i] for i in te} | {tr_cls[i] for i in tr})
        if len(names) < 2 or len({tr_cls[i] for i in tr}) < 2:
            continue
        majority = max(names, key=lambda c: sum(tr_cls[i] == c for i in tr))
        truth = np.array([names.index(test_cls[i]) for i in te])
        logit = logistic_baseline(tr_img[tr], [tr_cls[i] for i in tr], test_img.numpy()[te],
                                  [test_cls[i] for i in te], names)
        logit.pop("confusion", None)
        rows[src] = {"chance_top1": float((truth == names.index(majority)).mean()),
                     "logistic_regression_on_image_embedding": logit, "train_rows": len(tr)}
    return rows
