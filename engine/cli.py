"""The ``sarmae`` command line. It only translates arguments; the work lives in functions.

Heavy modules (torch, rasterio, onnxruntime) are imported inside the command functions so that
``sarmae --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import SarmaeError, describe_system_error

EPILOG = """examples:
  sarmae init --arch vit_tiny_patch16 --task segment --classes water,land --in-chans 2 --output water.pkg
  sarmae init --task detect --method cfar --pfa 1e-6 --guard 60 --background 400 --units m --classes ship -o cfar.pkg
  sarmae info water.pkg
  sarmae convert sarmae_vitb.pth --output sarmae_vitb_encoder
  sarmae infer --model water.pkg --input scene_VV.tif --input scene_VH.tif --output water.tif --vector
  sarmae export water.pkg
  sarmae export water.pkg --precision int8 --calibration scene.tif
"""


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. water,land")
    return items


def cmd_init(a: argparse.Namespace) -> int:
    """A randomly initialised package (for tests, demos and trying the pipeline)."""
    if a.method:
        return _init_method(a)
    if a.clip:
        return _init_clip(a)
    import torch

    from .models import create_model
    from .package import default_classes, default_input, new_card, save_package
    from .tasks import get_task

    task = get_task(a.task)
    needs_classes = task.needs_classes
    if needs_classes and not a.classes:
        raise SarmaeError(f"--task {a.task} needs --classes, e.g. --classes water,land")
    torch.manual_seed(a.seed)
    base = a.arch.replace("mae_", "")
    enc_model = create_model(base, in_chans=a.in_chans, img_size=a.img_size)
    decoder = {"embed_dim": a.decoder_dim, "depth": a.decoder_depth, "num_heads": max(1, a.decoder_dim // 32),
               "norm_pix_loss": False}
    arch = task.init_architecture({"name": base, "encoder": enc_model.cfg.to_dict()}, decoder)
    classes = default_classes(a.classes) if needs_classes else []
    bands = a.bands or None
    if bands and len(bands) != a.in_chans:
        raise SarmaeError(f"--bands names {len(bands)} band(s) but --in-chans is {a.in_chans}")
    card = new_card(a.name or f"{base}-{a.task}-random", a.task, arch, default_input(a.in_chans, a.units or "db", bands),
                    classes, provenance={"training": f"none: random initialisation (seed {a.seed})"})
    model = task.build_model(card)
    save_package(model.state_dict(), card, a.output, overwrite=a.overwrite)
    print(f"wrote {a.output}: {a.task} model {arch['name']}, {a.in_chans} channel(s), input {a.img_size}px"
          + (f", classes {', '.join(a.classes)}" if classes else "") + " (random weights)")
    return 0


def _init_clip(a: argparse.Namespace) -> int:
    """A CLIP (zeroshot) package with random weights: an open_clip model name, or --clip-config."""
    import torch

    from .clip import build_clip, clip_card, save_clip_package

    cfg = _clip_config(a.clip_config)
    name = None if a.clip == "custom" else a.clip
    torch.manual_seed(a.seed)
    card = clip_card(a.name or f"{a.clip}-clip-random", name, cfg, source=a.source, bands=a.bands,
                     provenance={"training": f"none: random initialisation (seed {a.seed})"})
    save_clip_package(build_clip(card), card, a.output, overwrite=a.overwrite)
    print(f"wrote {a.output}: zeroshot CLIP {a.clip}, bands {'+'.join(card.input.bands)}, input "
          f"{card.input_size[0]}px, {a.source} scaling (random weights)")
    return 0


def _init_method(a: argparse.Namespace) -> int:
    """A package of a task's method without a network (``--task detect --method cfar``): model.json alone."""
    from .package import save_package
    from .tasks import get_task, method_names

    task = get_task(a.task, a.method)
    if task.method != a.method:
        raise SarmaeError(f"--method {a.method}: task '{a.task}' has no such method (its methods: "
                          f"{', '.join(method_names(a.task)) or 'none'})")
    if a.method == "cfar_scored":
        raise SarmaeError("--method cfar_scored learns from labelled boxes: train its package with 'sarmae finetune "
                          "--task detect --method cfar_scored --raster R --labels V --class-field F -o PKG'")
    if a.method != "cfar":
        raise SarmaeError(f"--method {a.method} comes from a plug-in: write its package with that plug-in")
    from .cfar import CfarConfig
    from .tasks.cfar import cfar_card

    units = a.units or "px"
    if units not in ("px", "m"):
        raise SarmaeError(f"--units {units}: a CFAR detector's windows and sizes are in px or m")
    if units == "m" and (a.guard is None or a.background is None):
        raise SarmaeError("--units m needs --guard and --background in metres (e.g. --guard 60 --background 400)")
    if a.classes and len(a.classes) != 1:
        raise SarmaeError(f"--classes: a CFAR detector finds one class of objects (got {', '.join(a.classes)})")
    d = CfarConfig()
    cfg = CfarConfig(method=a.statistic, pfa=None if a.k_sigma is not None else a.pfa, k_sigma=a.k_sigma,
                     enl=a.looks, guard=d.guard if a.guard is None else a.guard,
                     background=d.background if a.background is None else a.background, window_units=units,
                     pixel_spacing_m=a.pixel_spacing, min_area=d.min_area if a.min_area is None else a.min_area,
                     max_area=a.max_area, max_length=a.max_length,
                     score_threshold=d.score_threshold if a.score_threshold is None else a.score_threshold)
    card = cfar_card(cfg, a.classes[0] if a.classes else "target", a.name)
    save_package(None, card, a.output, overwrite=a.overwrite)
    print(f"wrote {a.output}: {a.task} by {a.method} ({card.name}, class {card.classes[0]['name']}; no weights)")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import json

    from .card import describe
    from .package import read_card, verify_package

    card = read_card(a.package)
    if a.json:
        print(json.dumps(card.to_dict(), indent=2))
    else:
        print(describe(card))
    if a.verify:
        checked = verify_package(a.package, card)
        if not checked:
            print("weights:       none (no network): nothing to verify")
        for name, covered in checked.items():
            label = "weights:" if name.endswith(".safetensors") else name + ":"
            print(f"{label:<17}" + ("sha256 verified" if covered else
                  f"not covered by model.json (an older export): re-export with 'sarmae export {a.package}'"))
    return 0


def _clip_config(text: str | None) -> dict | None:
    """--clip-config: JSON text or a JSON file (an open_clip config)."""
    import json
    from pathlib import Path

    if not text:
        return None
    try:
        return json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except json.JSONDecodeError as e:
        raise SarmaeError(f"--clip-config: neither a JSON file nor JSON text ({e}): give an open_clip config "
                          "such as {\"embed_dim\": 32, \"vision_cfg\": {...}, \"text_cfg\": {...}}") from e


def cmd_convert(a: argparse.Namespace) -> int:
    if a.clip:
        from .clip.convert import convert_clip_checkpoint

        report = convert_clip_checkpoint(a.checkpoint, a.output, a.clip, _clip_config(a.clip_config), a.source,
                                         a.bands, a.name, quick_gelu=a.quick_gelu, overwrite=a.overwrite)
        print(report.summary())
        print(f"wrote {a.output}: zeroshot package of open_clip {a.clip}")
        return 0
    from .convert import convert_checkpoint

    report = convert_checkpoint(a.checkpoint, a.output, arch=a.arch, task=a.task, in_chans=a.in_chans,
                                img_size=a.img_size, units=a.units, bands=a.bands, name=a.name, overwrite=a.overwrite)
    print(report.summary())
    print(f"wrote {a.output}: {a.task} package {report.architecture['name']}")
    return 0


def _band(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def cmd_infer(a: argparse.Namespace) -> int:
    import json
    import logging
    import os

    from tqdm import tqdm

    from .inference import InferenceOptions, run_inference

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    opts = InferenceOptions(
        window=a.window, overlap=a.overlap, batch_size=a.batch_size, device=a.device, backend=a.backend,
        precision=a.precision,
        threads=a.threads, bands=[_band(b) for b in a.bands] if a.bands else None, input_units=a.input_units,
        complex_mode=a.complex_mode, vector=a.vector, min_area_px=a.min_area, probabilities=a.probabilities,
        score_threshold=a.score_threshold, nms_iou=a.nms_iou, mask_ratio=a.mask_ratio, cog=a.cog, overwrite=a.overwrite,
        extent=tuple(a.extent) if a.extent else None, water_mask=a.water_mask, water_class=a.water_class,
        classes=a.classes, templates=a.templates, query=a.query,
    )
    bar = None

    def progress(fraction: float, message: str) -> None:
        nonlocal bar
        if fraction < 0:
            if not a.quiet or message.startswith("warning"):  # --quiet drops log lines, not warnings
                (bar.write if bar is not None else print)(message, file=sys.stderr)
            return
        if bar is None:
            bar = tqdm(total=1000, unit="‰", disable=a.quiet or os.environ.get("RANK", "0") != "0", bar_format="{l_bar}{bar}| {elapsed}<{remaining}",
                       file=sys.stderr)
        bar.n = int(fraction * 1000)
        bar.set_description(message)
        bar.refresh()

    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: windows shared across ranks
            from .distributed import run_distributed_inference

            result = run_distributed_inference(a.input, a.output, a.model, opts, progress=progress)
            if result is None:  # not rank 0: rank 0 reports
                return 0
        else:
            result = run_inference(a.input, a.output, a.model, opts, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if a.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        for role, path in result.outputs.items():
            print(f"{role:>13}: {path}")
        stats = result.statistics
        for name, s in stats.get("per_class", {}).items():
            if isinstance(s, dict):
                print(f"{name:>13}: {100 * s['fraction']:.1f} % of valid pixels, area {s['area']:.6g} {stats.get('area_unit', '')}")
            else:
                print(f"{name:>13}: {s}")
        t = result.timings
        print(f"{'time':>13}: {t['total_s']:.1f} s (model {t['model_s']:.1f} s)")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    """Add model.onnx (and with --precision int8, model.int8.onnx) to a package; its other files are kept."""
    from .export import export_package

    report = export_package(a.package, a.output, a.opset, a.precision, a.calibration, a.int8_method,
                            a.calibration_windows, a.force, a.calibration_units,
                            log=lambda m: print(m, file=sys.stderr))
    print(report.summary())
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve import main as serve_main

    return serve_main(a.serve_args)


def cmd_similarity(a: argparse.Namespace) -> int:
    from .similarity import run_similarity

    if a.point:
        query = tuple(float(v) for v in a.point.split(","))
        if len(query) != 2:
            raise SarmaeError("--point needs X,Y in the raster's CRS, e.g. --point 500150.0,4649700.0")
    elif a.wkt:
        query = a.wkt
    else:
        raise SarmaeError("give a query: --point X,Y or --wkt 'POLYGON ((...))' (in the raster's CRS)")
    r = run_similarity(a.embedding, a.output, query, overwrite=a.overwrite, cog=a.cog)
    print(f"wrote {r['output']} (query from {r['query_cells']} embedding cell(s))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sarmae", description="SARMAE for SAR imagery: model packages, inference, training.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sarmae {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("init", help="write a randomly initialised model package",
                       description="Write a model package with random weights (for tests, demos, trying the pipeline).")
    s.add_argument("--arch", default="vit_tiny_patch16", help="encoder: vit_{tiny,small,base,large}_{patch,conv}{16,8} (conv: a per-patch conv stem; default: %(default)s)")
    s.add_argument("--task", default="segment", help="a registered task: embed | reconstruct | classify | segment | "
                   "detect, or one a plug-in adds (default: %(default)s)")
    s.add_argument("--classes", type=_csv, help="comma-separated class names (classify/segment/detect)")
    s.add_argument("--in-chans", type=int, default=2, help="input channels: 1 single pol, 2 VV+VH, 3 reference layout (default: %(default)s)")
    s.add_argument("--bands", type=_csv, help="channel names in order, e.g. VV,VH (default: VV,VH for 2 channels)")
    s.add_argument("--units", help="input units the model expects: db | linear_power | amplitude | uint8 (default: db); "
                   "with --method cfar the units of windows and sizes: px | m (default: px)")
    s.add_argument("--img-size", type=int, default=224, help="model input size in pixels, a multiple of 16 (default: %(default)s)")
    s.add_argument("--decoder-dim", type=int, default=512, help="MAE decoder width for --task reconstruct (default: %(default)s)")
    s.add_argument("--decoder-depth", type=int, default=8, help="MAE decoder blocks for --task reconstruct (default: %(default)s)")
    s.add_argument("--name", help="model name shown in QGIS (default: derived from arch and task)")
    g = s.add_argument_group("a CLIP package (task zeroshot): open_clip's model, tokenizer and prompts")
    g.add_argument("--clip", metavar="ARCH", help="open_clip architecture, e.g. ViT-B-32, RN50-quickgelu; custom: "
                   "--clip-config alone")
    g.add_argument("--clip-config", metavar="JSON", help="the open_clip config (JSON text or file), e.g. a tiny model")
    g.add_argument("--source", default="sarclip", choices=["sarclip", "sarvlm", "db"],
                   help="input scaling: sarclip (SARCLIP's dB ranges), sarvlm (min-max 8-bit, CLIP mean/std), "
                   "db (the project's dB clip) (default: %(default)s)")
    c = s.add_argument_group("a method without a network: --task detect --method cfar (constant false-alarm rate "
                             "on linear power; no weights, no training)")
    c.add_argument("--method", help="a method of the task instead of a network: cfar (with --task detect)")
    c.add_argument("--statistic", default="ca", choices=["ca", "os"],
                   help="CFAR clutter statistic: ca cell averaging, os order statistic (default: %(default)s)")
    c.add_argument("--pfa", type=float, default=1e-6, help="false-alarm probability per pixel, in (0, 1) (default: %(default)s)")
    c.add_argument("--k-sigma", type=float, help="instead of --pfa: detect above mean + k std of the background (ca)")
    c.add_argument("--looks", type=float, default=1.0, help="equivalent number of looks of the clutter (default: %(default)s)")
    c.add_argument("--guard", type=float, help="full side of the guard window around a pixel, in --units (default: 7 px)")
    c.add_argument("--background", type=float, help="full side of the background window, in --units (default: 41 px)")
    c.add_argument("--pixel-spacing", type=float, help="metres per pixel for rasters without georeferencing (--units m)")
    c.add_argument("--min-area", type=float, help="smallest object kept: px, or m^2 with --units m (default: 2, in "
                   "those units; objects are at least 1 px)")
    c.add_argument("--max-area", type=float, help="largest object: px, or m^2 with --units m (default: none)")
    c.add_argument("--max-length", type=float, help="longest object (major axis), in --units (default: none)")
    c.add_argument("--score-threshold", type=float, help="the package's box score threshold; score = S / (1 + S), S the sum "
                   "over the object's pixels of ln(pixel / CFAR threshold) (default: 0, every box at the pfa)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    s.add_argument("--output", "-o", required=True, help="package folder to write (or a .zip path)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing package")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("info", help="print a model package's card", description="Print the model card of a package.")
    s.add_argument("package", help="package folder or .zip")
    s.add_argument("--json", action="store_true", help="print model.json as JSON")
    s.add_argument("--verify", action="store_true", help="also check every file of the package against model.json "
                   "(sha256 of the weights, ONNX models and other files; each ONNX model's header against the card)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="convert an official SARMAE/MAE checkpoint into a package",
                       description="Convert a SARMAE / MAE .pth checkpoint into a model package. The pickle is read "
                                   "with torch.load(weights_only=True): no code from the file is ever run.")
    s.add_argument("checkpoint", help="the .pth/.pt checkpoint")
    s.add_argument("--output", "-o", required=True, help="package folder to write (or a .zip path)")
    s.add_argument("--arch", help="expected architecture, e.g. vit_base_patch16 (default: inferred from shapes)")
    s.add_argument("--task", default="embed", choices=["embed", "reconstruct"],
                   help="embed: encoder only (for fine-tuning/embeddings); reconstruct: keep the MAE decoder")
    s.add_argument("--in-chans", type=int, help="adapt the patch embedding to this many channels (e.g. 2 for VV+VH)")
    s.add_argument("--img-size", type=int, help="resample the position table to this input size")
    s.add_argument("--units", default="db", help="input units the converted model expects (default: %(default)s)")
    s.add_argument("--bands", type=_csv, help="channel names in order, e.g. VV,VH")
    s.add_argument("--name", help="model name (default: the checkpoint's file name)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing package")
    g = s.add_argument_group("a CLIP checkpoint (SARCLIP .safetensors, SARVLM epoch_N.pt) -> a zeroshot package")
    g.add_argument("--clip", metavar="ARCH", help="its open_clip architecture, e.g. ViT-B-32, RN50-quickgelu, ViT-L-14; "
                   "custom: --clip-config")
    g.add_argument("--clip-config", metavar="JSON", help="the open_clip config (JSON text or file) of a custom model")
    g.add_argument("--source", choices=["sarclip", "sarvlm", "db"], help="input scaling (default: the checkpoint's "
                   "format: sarclip for safetensors, sarvlm for epoch_N.pt)")
    g.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="override the config's QuickGELU (models fine-tuned from OpenAI weights use it)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("infer", help="run a model over SAR raster(s) of any size",
                       description="Run a model package over a raster (or several single-pol rasters on one grid) "
                                   "window by window; memory grows with the raster's width, not its area.")
    s.add_argument("--model", "-m", required=True, help="model package folder or .zip")
    s.add_argument("--input", "-i", required=True, action="append",
                   help="input raster; repeat for separate polarisation files on the same grid (e.g. VV then VH)")
    s.add_argument("--output", "-o", required=True,
                   help="main output: .tif (segment/embed/reconstruct) or .gpkg (detect/classify); extras go beside it")
    s.add_argument("--window", type=int, help="window size in px, at least 32 and a multiple of the model's patch size; "
                   "refused when a batch of them needs more memory than is free (default: the model's input size)")
    s.add_argument("--overlap", type=float, help="overlap between windows, 0..0.9 (default 0.25; classify 0)")
    s.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: %(default)s)")
    s.add_argument("--backend", default="auto", help="auto | torch | onnxruntime (default: %(default)s)")
    s.add_argument("--precision", default="auto", choices=["fp32", "int8", "auto"],
                   help="fp32, int8 (the package's model.int8.onnx, through onnxruntime on the CPU), or auto: int8 when "
                        "the package has it and the CPU has int8 dot products (VNNI / AMX), else fp32 (default: %(default)s)")
    s.add_argument("--threads", type=int, help="CPU threads for the model, at least 1 (default: all cores)")
    s.add_argument("--bands", type=_csv, help="bands in the model's order: 1-based indexes or names, e.g. VV,VH or 2,1")
    s.add_argument("--input-units", help="what the file holds, overriding detection: db | linear_power | amplitude | uint8")
    s.add_argument("--complex-mode", default="intensity", choices=["intensity", "amplitude"],
                   help="complex (SLC) bands become |z|^2 or |z| (default: %(default)s)")
    s.add_argument("--vector", action="store_true", help="segment: also write class polygons to a GeoPackage")
    s.add_argument("--min-area", type=int, default=0, help="segment vectors: drop regions below this many pixels")
    s.add_argument("--probabilities", action="store_true", help="segment: also write per-class probabilities")
    s.add_argument("--score-threshold", type=float, help="detect: minimum box score (default: the package's: 0.3 for "
                   "a model, a CFAR package's own, 0 = every box at its false-alarm probability)")
    s.add_argument("--nms-iou", type=float, default=0.5, help="detect: IoU for merging boxes (default: %(default)s)")
    s.add_argument("--mask-ratio", type=float, default=0.75, help="reconstruct: fraction of patches hidden (default: %(default)s)")
    s.add_argument("--water-mask", help="detect (CFAR): boxes only on water: a mask raster on the input's grid, or a "
                   "segmentation package run first")
    s.add_argument("--water-class", help="the mask's water: the package's class (default: water/sea/ocean), or the "
                   "raster's value(s), e.g. 1 or 1,2 (default: 1)")
    s.add_argument("--classes", type=_csv, help="zeroshot (CLIP package): class names, e.g. \"water,urban,forest\"")
    s.add_argument("--templates", action="append", help="zeroshot: a prompt template with {}, repeatable "
                   "(default: the package's)")
    s.add_argument("--query", action="append", help="CLIP package: a phrase (repeatable) -> a similarity raster")
    s.add_argument("--extent", type=int, nargs=4, metavar=("ROW", "COL", "HEIGHT", "WIDTH"),
                   help="process only this pixel region of the input")
    s.add_argument("--cog", action="store_true", help="write Cloud-Optimised GeoTIFFs")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.add_argument("--json", action="store_true", help="print the result record as JSON")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar or log lines")
    s.set_defaults(func=cmd_infer)

    s = sub.add_parser("export", help="add an ONNX export (model.onnx, optionally model.int8.onnx) to a package",
                       description="Export the package's model to ONNX (checked against torch on random input) and "
                                   "store it in the package with the model card as ONNX metadata; with --precision int8 "
                                   "also an int8 model for CPUs, behind a quality gate. Both are covered by sha256 in "
                                   "model.json. The package's other files (training curves, confusion matrix, ...) are kept.")
    s.add_argument("package", help="package folder or .zip")
    s.add_argument("--output", "-o", help="write a new package here instead of updating PACKAGE")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    s.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="fp32: model.onnx; int8: also model.int8.onnx (onnxruntime quantisation), refused when it "
                        "agrees with fp32 on fewer than 99 %% of calibration labels (0.99 cosine for embed) (default: %(default)s)")
    s.add_argument("--calibration", metavar="RASTER",
                   help="int8: a raster like those the model will process (the model's bands), read through its input "
                        "contract; its windows calibrate the quantisation and the quality gate")
    s.add_argument("--calibration-units", help="int8: the calibration raster's units, overriding detection")
    s.add_argument("--calibration-windows", type=int, default=32, help="int8: windows taken from RASTER (default: %(default)s)")
    s.add_argument("--int8-method", default="dynamic", choices=["dynamic", "static"],
                   help="int8: dynamic (MatMul/Gemm weights; activations per batch) or static (QDQ, activation ranges "
                        "calibrated on RASTER, convolutions too) (default: %(default)s)")
    s.add_argument("--force", action="store_true", help="int8: write the model even below the quality gate "
                   "(recorded in model.json as forced)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("similarity", help="cosine similarity of an embedding raster to a point or polygon",
                       description="Similarity search: cosine similarity of every cell of an embedding raster "
                                   "(from 'sarmae infer' with an embed model) to the feature at a point, or the mean "
                                   "feature inside a polygon, given in the raster's CRS.")
    s.add_argument("embedding", help="embedding GeoTIFF written by the embed task")
    s.add_argument("--output", "-o", required=True, help="similarity GeoTIFF to write")
    s.add_argument("--point", help="query point X,Y in the raster's CRS")
    s.add_argument("--wkt", help="query geometry as WKT (point or polygon) in the raster's CRS")
    s.add_argument("--cog", action="store_true", help="write a Cloud-Optimised GeoTIFF")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_similarity)

    s = sub.add_parser("serve", help="the engine worker for the QGIS plugin (JSON lines on stdin/stdout)",
                       description="Run the engine worker: JSON-lines protocol on stdin/stdout (see DESIGN.md). "
                                   "Options after 'serve' go to the worker: [--cache-size N] [--log-level LEVEL].")
    s.add_argument("serve_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)
    _load_extensions(sub)
    return p


def _load_extensions(sub) -> None:
    """Commands contributed by other packages through the ``sarmae.commands`` entry-point group
    (``training`` adds pretrain and finetune): the engine never imports them itself."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="sarmae.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except ImportError as e:  # a broken optional extension must not break the engine's CLI
            print(f"sarmae: command '{ep.name}' unavailable ({e})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    from .errors import TerminatedError, terminate_like_interrupt

    # a pip matplotlib beside Debian's mpl_toolkits warns on import; nothing here plots in 3-D
    warnings.filterwarnings("ignore", message="Unable to import Axes3D")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(terminate_like_interrupt(args.func, args) or 0)
    except TerminatedError:  # SIGTERM: partial outputs were removed on the way out
        print(f"sarmae {args.command}: terminated; partial outputs were removed", file=sys.stderr)
        return 143
    except SarmaeError as e:
        print(f"sarmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `sarmae info PKG | head`: the reader left, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, MemoryError) as e:  # a missing or locked file, a full disk, no memory: a sentence
        sentence = describe_system_error(e)
        if sentence is None:
            raise
        print(f"sarmae {args.command}: error: {sentence}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sarmae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
