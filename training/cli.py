"""``sarmae`` commands of the training package (registered through the ``sarmae.commands``
entry point, so the engine's CLI never imports training). Heavy imports stay inside the commands."""

from __future__ import annotations

import argparse
import re
import sys


def cmd_pretrain(a: argparse.Namespace) -> int:
    import json
    import logging

    from tqdm import tqdm

    from .config import load_config
    from .pretrain import pretrain

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    overrides = list(a.overrides)
    if a.data:  # --data takes several paths: overrides written after it land there, move them back
        is_override = re.compile(r"^(model|sare|sarc|data|optim|run)\.\w+=")
        overrides += [d for d in a.data if is_override.match(d)]
        a.data = [d for d in a.data if not is_override.match(d)]
    if a.data:
        overrides.append("data.paths=" + json.dumps(a.data))
    if a.pairs:
        overrides.append("data.pairs=" + json.dumps(a.pairs))
    if a.output:
        overrides.append("run.output=" + json.dumps(a.output))
    config = a.config
    if config is None:  # --resume without --config continues with the run's own config.yaml
        from pathlib import Path

        own = Path(a.output) / "config.yaml" if a.output else None
        config = str(own) if a.resume and own is not None and own.is_file() else "cpu_vit_tiny"
    cfg = load_config(config, overrides)
    bar = None

    def progress(row: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=row["total_steps"], initial=row["step"], unit="step", file=sys.stderr, disable=a.quiet)
        bar.n = row["step"]
        bar.set_postfix(epoch=row["epoch"], loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                        img_s=f"{row['images_per_s']:.0f}")
        bar.refresh()

    try:
        summary = pretrain(cfg, resume=a.resume, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


def _finetune_config(a: argparse.Namespace):
    from .finetune.config import FinetuneConfig

    d = {"task": a.task, "encoder": a.encoder or "", "seed": a.seed, "linear_probe": a.linear_probe,
         "shots": a.shots, "max_minutes": a.max_minutes, "export_onnx": a.export_onnx,
         "baselines": bool(getattr(a, "baselines", False))}
    for k in ("epochs", "batch_size", "lr", "layer_decay", "img_size", "patience", "val_fraction", "device",
              "bands", "input_units", "class_weights", "max_chips", "mode", "seg_head", "gain_db",
              "standardise", "smooth", "pool", "arch", "acquisition"):
        v = getattr(a, k)
        if v is not None:
            d[k] = v
    return FinetuneConfig.from_dict(d)


METHODS = {"cfar_scored": "detect"}  # finetune --method: what it trains, for which task


def cmd_finetune(a: argparse.Namespace) -> int:
    import json
    import logging

    from engine.errors import SarmaeError

    from .finetune.common import progress_line

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if a.task == "clip":
        return _finetune_clip(a)
    if a.pairs or a.init:
        raise SarmaeError("--pairs and --init are for --task clip")
    cfg = _finetune_config(a)

    def progress(row: dict) -> None:
        if not a.quiet:
            print(progress_line(row), file=sys.stderr, flush=True)

    if a.method is not None and (a.task != "detect" or a.method not in METHODS):
        raise SarmaeError(f"--method {a.method}: fine-tuning knows the methods "
                          + ", ".join(f"{m} (--task {t})" for m, t in METHODS.items())
                          + "; leave --method out to fine-tune an encoder")
    if a.chips and a.raster:
        raise SarmaeError("give one kind of training data: --chips DIR, or --raster R with labels (not both)")
    if a.chips:
        if a.task != "classify":
            raise SarmaeError("--chips (class folders) is for --task classify; dense tasks take --raster with labels")
        from .finetune.classify import finetune_classifier

        r = finetune_classifier(a.chips, a.output, cfg, progress, overwrite=a.overwrite, colours=a.colours,
                                classes=a.classes)
    elif a.raster:
        if not (a.labels and a.class_field) and not a.label_raster:
            raise SarmaeError("with --raster give --labels VECTOR --class-field NAME, or --label-raster RASTER")
        kw = dict(labels=a.labels, class_field=a.class_field, classes=a.classes, colours=a.colours,
                  progress=progress, overwrite=a.overwrite)
        if a.task == "segment":
            from .finetune.segment import finetune_segmenter

            r = finetune_segmenter(a.raster, a.output, cfg, label_raster=a.label_raster, background=a.background, **kw)
        elif a.task == "detect":
            if a.label_raster:
                raise SarmaeError("detection learns boxes from polygons: give --labels VECTOR --class-field NAME")
            if a.method == "cfar_scored":
                from .finetune.cfar_scored import finetune_cfar_scored

                r = finetune_cfar_scored(a.raster, a.output, cfg, **kw)
            else:
                from .finetune.detect import finetune_detector

                r = finetune_detector(a.raster, a.output, cfg, **kw)
        else:
            from .finetune.classify import finetune_classifier

            r = finetune_classifier(None, a.output, cfg, rasters=a.raster, label_raster=a.label_raster,
                                    background=a.background, **kw)
    else:
        raise SarmaeError("give the training data: --chips DIR, or --raster R with --labels/--label-raster")
    r.pop("history", None)
    print(json.dumps(r, indent=2, default=str))
    return 0


def _finetune_clip(a: argparse.Namespace) -> int:
    import json

    from engine.errors import SarmaeError

    from .clip.config import ClipTrainConfig
    from .clip.train import train_clip

    if a.chips or a.raster:
        raise SarmaeError("--task clip trains on a caption table: give --pairs CSV (make one with 'sarmae captions')")
    d = {"pairs": a.pairs or "", "init": a.init or "", "encoder": a.encoder or "", "seed": a.seed,
         "max_minutes": a.max_minutes, "max_steps": a.max_steps}
    for k in ("epochs", "batch_size", "lr", "img_size", "device"):
        if getattr(a, k) is not None:
            d[k] = getattr(a, k)
    if a.bands:
        d["bands"] = [str(b) for b in a.bands]
    if a.templates:
        d["templates"] = a.templates
    if a.clip_loss:
        d["loss"] = a.clip_loss
    if a.clip_config:
        d["model"] = json.loads(a.clip_config)
    cfg = ClipTrainConfig.from_dict(d)

    def progress(row: dict) -> None:
        if not a.quiet and (row["step"] % 10 == 0 or row["step"] == row["total_steps"]):
            print(f"step {row['step']}/{row['total_steps']} epoch {row['epoch']} loss {row['loss']:.4f} "
                  f"lr {row['lr']:.2e} {row['pairs_per_s']:.0f} pairs/s", file=sys.stderr, flush=True)

    r = train_clip(cfg, a.output, resume=a.resume, overwrite=a.overwrite, progress=progress)
    if r:
        print(json.dumps(r, indent=2, default=str))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from engine.errors import SarmaeError
    from engine.package import read_card

    from .evaluate import (
        evaluate_chips,
        evaluate_chips_from_rasters,
        evaluate_detections,
        evaluate_raster,
    )

    png = Path(a.report) if a.report else Path("evaluation_confusion.png")
    task = read_card(a.package).task
    if task == "zeroshot":
        from .clip.evaluate import evaluate_zeroshot

        r = evaluate_zeroshot(a.package, png, chips=a.chips, pairs=a.pairs, split=a.split, classes=a.classes,
                              templates=a.templates, baselines=a.baselines)
        print(json.dumps(r, default=str))
        return 0
    if a.pairs or a.classes or a.templates:
        raise SarmaeError("--pairs, --classes and --templates evaluate zeroshot (CLIP) packages")
    if a.chips:
        r = evaluate_chips(a.package, a.chips, png)
    elif a.raster and task == "segment":
        if len(a.raster) > 1:
            raise SarmaeError("segmentation evaluation takes one --raster (run it once per raster)")
        options = {"bands": a.bands, "input_units": a.input_units}
        r = evaluate_raster(a.package, a.raster[0], png, a.labels, a.class_field, a.label_raster,
                            {k: v for k, v in options.items() if v}, baselines=a.baselines)
    elif a.raster and task == "detect":
        options = {"bands": a.bands, "input_units": a.input_units, "score_threshold": a.score_threshold}
        r = evaluate_detections(a.package, a.raster, png, a.labels, a.class_field,
                                {k: v for k, v in options.items() if v is not None}, cfar=_cfar_row(a))
    elif a.raster:
        r = evaluate_chips_from_rasters(a.package, a.raster, png, a.labels, a.class_field, a.label_raster, a.bands,
                                        a.input_units, a.background, a.max_chips or 2000)
    else:
        raise SarmaeError("give the evaluation data: --chips DIR, or --raster R with --labels/--label-raster")
    r.pop("confusion", None)
    print(json.dumps(r, default=str))
    return 0


def _cfar_row(a: argparse.Namespace) -> dict | None:
    """The CFAR settings of ``evaluate --cfar`` for a detection package: none; a CFAR package's;
    auto: a cfar_scored package's CFAR settings (its proposals at their threshold, without the extra
    proposal levels) ranked by CFAR's score (what its scorer adds), else
    the CFAR defaults (engine.cfar.CfarConfig)."""
    from engine.package import read_card

    if a.cfar == "none":
        return None
    if a.cfar != "auto":
        card = read_card(a.cfar)
        if card.architecture.name != "cfar":
            from engine.errors import SarmaeError

            raise SarmaeError(f"--cfar {a.cfar}: a '{card.architecture.name}' package; give a CFAR package "
                              "('sarmae init --task detect --method cfar'), auto or none")
        return dict(card.architecture.extra["cfar"])
    card = read_card(a.package)
    if card.architecture.name in ("cfar", "cfar_scored"):
        # CFAR alone at the package's settings (a scorer's extra proposal levels are not CFAR's)
        return {**card.architecture.extra["cfar"], "score_threshold": 0.0, "levels_db": []}
    return {"class_name": card.class_names[0]}


def cmd_captions(a: argparse.Namespace) -> int:
    import json
    import logging

    from engine.errors import SarmaeError

    from .clip.caption_sources import load_spec, make_captions

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if bool(a.spec) == bool(a.class_folders):
        raise SarmaeError("give the labelled data: --spec SPEC.yaml (several sources), or --class-folders DIR")
    sources = load_spec(a.spec) if a.spec else [
        {"kind": "chips", "name": a.name, "path": a.class_folders, "class_from": "folder", "sensor": a.sensor,
         "pol": a.pol, "phrase": a.phrase}]
    r = make_captions(sources, a.output, a.chips_dir, seed=a.seed, val_fraction=a.val_fraction,
                      overwrite=a.overwrite)
    print(json.dumps(r, indent=2))
    return 0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _templates(text: str) -> list[str]:
    """'a SAR image of {}.|a radar image of {}.': prompt templates, each with one {}."""
    out = [t.strip() for t in text.split("|") if t.strip()]
    bad = [t for t in out if t.count("{}") != 1]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"each template needs exactly one {{}} for the class name: {bad or text!r}")
    return out


def _bands(text: str) -> list[int | str]:
    """'VV,VH' or '2,1' (1-based indexes), as ``sarmae infer --bands``."""
    return [int(t) if t.isdigit() else t for t in _csv(text)]


def _class_weights(text: str) -> str | list[float]:
    """'auto' (inverse pixel frequency), 'sqrt' (its square root), 'none', or one number per class: '1,3.5'."""
    if text.strip().lower() in ("auto", "inverse", "sqrt", "none"):
        return text.strip().lower()
    try:
        return [float(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': use auto, sqrt, none, or one number per class, e.g. 1,3.5") from None


def _data_options(s) -> None:
    """The options that read rasters the way ``sarmae infer`` does."""
    s.add_argument("--bands", type=_bands, help="raster bands in the model's order, 1-based indexes or names, "
                                                "e.g. VV,VH or 2,1 (as sarmae infer --bands)")
    s.add_argument("--input-units", help="what the data holds, overriding detection: db | linear_power | "
                                         "amplitude | uint8 (as sarmae infer --input-units)")
    s.add_argument("--max-chips", type=int, help="at most this many chips sampled from the rasters (default 2000)")


def register(sub) -> None:
    """Add the training commands to the ``sarmae`` sub-parsers."""
    s = sub.add_parser("pretrain", help="pretrain SARMAE (MAE + SARE + SARC) on SAR chips or rasters",
                       description="Pretrain a SARMAE encoder. One process, or many with "
                                   "'torchrun --nproc_per_node N .venv/bin/sarmae pretrain ...' (DDP).",
                       epilog="presets: cpu_vit_tiny (a laptop CPU), sarmae_vitb_reference (the paper's recipe). "
                              "Overrides: section.key=value, e.g. optim.epochs=5 model.decoder_depth=1 run.max_minutes=30",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", "-c", help="preset name or YAML file (default: cpu_vit_tiny; with --resume: the "
                   "run's own config.yaml in --output)")
    s.add_argument("--data", nargs="+", help="chip folders and/or large rasters")
    s.add_argument("--pairs", help="paired SAR/optical index (JSON) for SARC")
    s.add_argument("--output", "-o", help="run folder (checkpoints, config.yaml, metrics.csv, PNGs)")
    s.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("finetune", help="fine-tune an encoder: classify / segment / detect",
                       description="Fine-tune a SARMAE encoder package on your labels and write a model package "
                                   "that 'sarmae infer' and the QGIS plugin run unchanged.")
    s.add_argument("--task", required=True, choices=["classify", "segment", "detect", "clip"],
                   help="clip: a CLIP (zeroshot) package trained contrastively on --pairs")
    s.add_argument("--encoder", help="encoder package (from 'sarmae pretrain'/'convert'); omit for random init. "
                                     "clip: the SARMAE image tower, with open_clip's small text tower")
    s.add_argument("--pairs", help="clip: caption table (CSV: image, caption[, class, source, split]) from "
                                   "'sarmae captions'")
    s.add_argument("--init", help="clip: a CLIP (zeroshot) package to start from (default: the small CPU "
                                  "model with random weights)")
    s.add_argument("--templates", type=_templates, help="clip: prompt templates stored in the package, separated "
                                                        "by '|', each with one {} (default: the engine's)")
    s.add_argument("--clip-config", help="clip, random start: JSON overriding the small open_clip config, e.g. "
                                         "'{\"embed_dim\": 256}'")
    s.add_argument("--resume", action="store_true", help="clip: continue the run in <output>.run from its last.pt")
    s.add_argument("--max-steps", type=int, help="clip: stop after this many steps")
    s.add_argument("--clip-loss", choices=["pairs", "captions"], help="clip: pairs = open_clip's ClipLoss (default); "
                   "captions = rows with the same caption are positives of each other (template captions repeat)")
    s.add_argument("--method", choices=sorted(METHODS),
                   help="detect: cfar_scored = CFAR proposals scored by a small CNN trained on the labels (no "
                        "encoder; learns in about a minute on a CPU and runs through onnxruntime); default: the "
                        "encoder's Faster R-CNN head")
    s.add_argument("--output", "-o", required=True, help="model package to write")
    s.add_argument("--chips", help="classification: folder with one sub-folder of chips per class")
    s.add_argument("--raster", action="append", help="raster to train on (repeat for several); with --labels or "
                                                     "--label-raster")
    s.add_argument("--labels", help="vector file (GeoPackage/Shapefile/GeoJSON) with labelled polygons")
    s.add_argument("--class-field", help="the attribute holding the class name in --labels")
    s.add_argument("--label-raster", help="segment/classify: a class raster on the raster's grid (instead of --labels)")
    s.add_argument("--classes", type=_csv, help="class names in order (default: sorted values found)")
    s.add_argument("--colours", type=_csv, help="one #rrggbb per class, in --classes order (default: a palette)")
    s.add_argument("--background", help="segment: class of unlabelled pixels; classify: class of chips touching no "
                                        "polygon (default: none, unlabelled areas are ignored)")
    _data_options(s)
    s.add_argument("--class-weights", type=_class_weights,
                   help="segment: auto (inverse pixel frequency), sqrt (its square root), none, or one weight "
                        "per class (default: none)")
    s.add_argument("--export-onnx", action="store_true", help="also write model.onnx into the package "
                                                              "(segment, classify; as 'sarmae export')")
    s.add_argument("--shots", type=int, help="classification: N training chips per class")
    s.add_argument("--mode", choices=["auto", "head", "full"],
                   help="classify/segment: head = quick, a light head fitted on the frozen encoder in seconds "
                        "(few labels); full = fine-tune the whole model; auto (default) = quick below a few dozen "
                        "training chips, else quick then full, keeping the better validation score; classify: "
                        "also trains the small CNN and keeps whichever scores better on the validation chips, as they "
                        "are and under simulated acquisition shifts")
    s.add_argument("--arch", help="classify: cnn = a small CNN (0.55 M parameters) trained from scratch, no encoder; "
                                  "without --encoder and --arch: a random vit_tiny_patch16 (--mode auto also trains "
                                  "the small CNN and keeps the better on validation)")
    s.add_argument("--seg-head", choices=["light", "upernet"],
                   help="segment, full fine-tune: light (per-pixel head, fast on CPUs; the default) or upernet "
                        "(simple pyramid + UPerNet, for GPUs)")
    s.add_argument("--gain-db", type=float, help="classify/segment: random radiometric gain per training chip within "
                   "+-this many dB, so the model does not key on one acquisition's brightness (default 2; 0: off)")
    s.add_argument("--acquisition-jitter", dest="acquisition", action="store_true", default=None,
                   help="classify: also random changes of acquisition on the training chips (8-bit stretch, fresh "
                        "speckle, resolution 0.87-1.15x, +-10 degrees, +-4 px; training/acquisition.py), for models "
                        "that must hold on another sensor or collection")
    s.add_argument("--standardise", choices=["auto", "median", "iqr", "none"],
                   help="classify: each chip in dB minus its own median, over 10 dB (median) or over its interquartile "
                        "range (iqr), so that another sensor's or acquisition's brightness does not change the answer; "
                        "recorded in the package, the engine applies it to every window; none: off; auto (default): "
                        "median for 8-bit display chips, none for calibrated dB / power / amplitude")
    s.add_argument("--smooth", type=float, metavar="PX",
                   help="classify, with --standardise: a Gaussian low-pass of sigma PX pixels on each standardised "
                        "chip, in training and in the engine (a multilook: the model keys less on one processing "
                        "chain's speckle, which another sensor, fresh speckle or resampling changes); 0: off "
                        "(default: 1)")
    s.add_argument("--pool", choices=["mean", "blocks"],
                   help="classify: the embedding the head sees: blocks (the mean and the max of the tokens of the last 4 "
                        "blocks; the default) or mean (of the last block's tokens)")
    s.add_argument("--baselines", action="store_true",
                   help="classify: also train a small CNN from scratch on the same chips, split and budget, and "
                        "report its validation accuracy beside the model's (a warning when it wins)")
    s.add_argument("--linear-probe", action="store_true", help="freeze the encoder, train the head only")
    s.add_argument("--epochs", type=int, help="maximum epochs (default 50)")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 x batch / 256; detect: 3e-4)")
    s.add_argument("--layer-decay", type=float, help="layer-wise lr decay (default: classify 0.75, dense 0.9)")
    s.add_argument("--img-size", type=int, help="model input size (default: the encoder's)")
    s.add_argument("--patience", type=int, help="early stopping patience in epochs (default 10)")
    s.add_argument("--val-fraction", type=float, help="validation share (default 0.2)")
    s.add_argument("--max-minutes", type=float, help="time budget: the best model found in time is kept")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help="auto | cpu | cuda")
    s.add_argument("--overwrite", action="store_true", help="replace an existing package")
    s.add_argument("--quiet", "-q", action="store_true")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("captions", help="caption table (CSV) for SARCLIP training from labelled SAR data",
                       description="Make a caption table (image, caption, class, source, split) from labelled data, "
                                   "the way SARCLIP-1M / SARVLM-1M were built: class folders, polygons over a raster, "
                                   "flood / water masks, ship instance masks; templates name the class, the sensor "
                                   "and the polarisation. Window chips are written as GeoTIFF.",
                       epilog="spec: a YAML list of sources, see training/recipes/sarclip_captions.yaml and "
                              "training/clip/caption_sources.py")
    s.add_argument("--output", "-o", required=True, help="caption table to write (CSV)")
    s.add_argument("--spec", help="YAML list of sources (kind: chips | masks | instances | polygons)")
    s.add_argument("--class-folders", help="one source: a folder with one sub-folder of chips per class")
    s.add_argument("--name", default="chips", help="with --class-folders: the source column (default %(default)s)")
    s.add_argument("--sensor", default="Sentinel-1", help="with --class-folders: sensor named in the captions")
    s.add_argument("--pol", default="VV", help="with --class-folders: polarisation named in the captions "
                                               "(auto: VV+VH for 2-band chips)")
    s.add_argument("--phrase", default="{cls}", help="with --class-folders: how a class reads, e.g. 'a {cls} vehicle'")
    s.add_argument("--chips-dir", help="where window chips go (default: <output stem>_chips beside the table)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="held-out share per class (whole groups; "
                                                                    "default %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace an existing table")
    s.set_defaults(func=cmd_captions)

    s = sub.add_parser("evaluate", help="metrics of a model package on held-out data (JSON)",
                       description="Evaluate a package on data it never saw; prints one JSON object.")
    s.add_argument("package")
    s.add_argument("--chips", help="classification: class folders (matched to the model's classes by name); "
                                   "zeroshot: class folders whose names are the classes (a leading '<k>-' dropped)")
    s.add_argument("--pairs", help="zeroshot: caption table: zero-shot per source and retrieval recall@1/5/10")
    s.add_argument("--split", default="val", help="zeroshot with --pairs: the rows scored (default %(default)s; "
                                                  "'' = all)")
    s.add_argument("--classes", type=_csv, help="zeroshot with --chips: the class names to choose among "
                                                "(default: the folder names)")
    s.add_argument("--templates", type=_templates, help="zeroshot: prompt templates separated by '|' "
                                                        "(default: the package's)")
    s.add_argument("--raster", action="append", help="raster to evaluate on (segment: one; classify/detect: repeat "
                                                     "for several)")
    s.add_argument("--labels", help="vector labels (classes matched to the model's by name)")
    s.add_argument("--class-field", help="class attribute of --labels")
    s.add_argument("--label-raster", help="class raster on the raster's grid (segment, classify)")
    s.add_argument("--background", help="classify with --labels: the model's class for chips touching no polygon")
    s.add_argument("--baselines", action="store_true",
                   help="zeroshot with --pairs: also chance and a logistic regression on the frozen image "
                        "embedding (fitted on the table's train rows); segment: also the classical rows (best threshold per band, Otsu per band, random forest on "
                        "per-pixel features), fitted on the package's own training labels and scored on the same "
                        "pixels")
    _data_options(s)
    s.add_argument("--score-threshold", type=float, help="detect: the score of the reported operating point "
                                                          "(precision / recall / F1; default 0.3 as sarmae infer)")
    s.add_argument("--cfar", default="auto", help="detect: the CFAR row beside the model, on the same rasters: auto "
                   "(a cfar_scored package: its own CFAR proposals ranked by CFAR's score; other detectors: the CFAR "
                   "defaults), a CFAR package (its settings), or none")
    s.add_argument("--report", help="PNG path: confusion matrix, or detect: precision-recall curves "
                                    "(default: evaluation_confusion.png)")
    s.set_defaults(func=cmd_evaluate)
