"""The ``sarmae`` command line. It only translates arguments; the work lives in functions.

Heavy modules (torch, rasterio, onnxruntime) are imported inside the command functions so that
``sarmae --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import SarmaeError

EPILOG = """examples:
  sarmae init --arch vit_tiny_patch16 --task segment --classes water,land --in-chans 2 --output water.pkg
  sarmae info water.pkg
  sarmae convert sarmae_vitb.pth --output sarmae_vitb_encoder
"""


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. water,land")
    return items


def cmd_init(a: argparse.Namespace) -> int:
    """A randomly initialised package (for tests, demos and trying the pipeline)."""
    import torch

    from .models import build_from_architecture, create_model
    from .models.registry import TASKS
    from .package import default_classes, default_input, new_card, save_package

    if a.task not in TASKS:
        raise SarmaeError(f"unknown task '{a.task}'; use one of {', '.join(TASKS)}")
    needs_classes = a.task in ("classify", "segment", "detect")
    if needs_classes and not a.classes:
        raise SarmaeError(f"--task {a.task} needs --classes, e.g. --classes water,land")
    torch.manual_seed(a.seed)
    base = a.arch.replace("mae_", "")
    enc_model = create_model(base, in_chans=a.in_chans, img_size=a.img_size)
    arch = {"name": base, "encoder": enc_model.cfg.to_dict()}
    if a.task == "reconstruct":
        arch["name"] = "mae_" + base
        arch["decoder"] = {"embed_dim": a.decoder_dim, "depth": a.decoder_depth, "num_heads": max(1, a.decoder_dim // 32),
                           "norm_pix_loss": False}
    classes = default_classes(a.classes) if needs_classes else []
    model = build_from_architecture(arch, a.task, len(classes))
    bands = a.bands or None
    if bands and len(bands) != a.in_chans:
        raise SarmaeError(f"--bands names {len(bands)} band(s) but --in-chans is {a.in_chans}")
    card = new_card(a.name or f"{base}-{a.task}-random", a.task, arch, default_input(a.in_chans, a.units, bands),
                    classes, provenance={"training": f"none: random initialisation (seed {a.seed})"})
    save_package(model.state_dict(), card, a.output, overwrite=a.overwrite)
    print(f"wrote {a.output}: {a.task} model {arch['name']}, {a.in_chans} channel(s), input {a.img_size}px"
          + (f", classes {', '.join(a.classes)}" if classes else "") + " (random weights)")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import json

    from .package import describe, load_state_dict, read_card

    card = read_card(a.package)
    if a.json:
        print(json.dumps(card.to_dict(), indent=2))
    else:
        print(describe(card))
    if a.verify:
        load_state_dict(a.package, card)
        print("weights:       sha256 verified")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    report = convert_checkpoint(a.checkpoint, a.output, arch=a.arch, task=a.task, in_chans=a.in_chans,
                                img_size=a.img_size, units=a.units, bands=a.bands, name=a.name, overwrite=a.overwrite)
    print(report.summary())
    print(f"wrote {a.output}: {a.task} package {report.architecture['name']}")
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
    s.add_argument("--arch", default="vit_tiny_patch16", help="encoder: vit_{tiny,small,base,large}_patch16 (default: %(default)s)")
    s.add_argument("--task", default="segment", help="embed | reconstruct | classify | segment | detect (default: %(default)s)")
    s.add_argument("--classes", type=_csv, help="comma-separated class names (classify/segment/detect)")
    s.add_argument("--in-chans", type=int, default=2, help="input channels: 1 single pol, 2 VV+VH, 3 reference layout (default: %(default)s)")
    s.add_argument("--bands", type=_csv, help="channel names in order, e.g. VV,VH (default: VV,VH for 2 channels)")
    s.add_argument("--units", default="db", help="input units the model expects: db | linear_power | amplitude | uint8 (default: %(default)s)")
    s.add_argument("--img-size", type=int, default=224, help="model input size in pixels, a multiple of 16 (default: %(default)s)")
    s.add_argument("--decoder-dim", type=int, default=512, help="MAE decoder width for --task reconstruct (default: %(default)s)")
    s.add_argument("--decoder-depth", type=int, default=8, help="MAE decoder blocks for --task reconstruct (default: %(default)s)")
    s.add_argument("--name", help="model name shown in QGIS (default: derived from arch and task)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    s.add_argument("--output", "-o", required=True, help="package folder to write (or a .zip path)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing package")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("info", help="print a model package's card", description="Print the model card of a package.")
    s.add_argument("package", help="package folder or .zip")
    s.add_argument("--json", action="store_true", help="print model.json as JSON")
    s.add_argument("--verify", action="store_true", help="also check the weights' sha256")
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
    s.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except SarmaeError as e:
        print(f"sarmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sarmae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
