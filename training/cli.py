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
    cfg = load_config(a.config, overrides)
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


def register(sub) -> None:
    """Add the training commands to the ``sarmae`` sub-parsers."""
    s = sub.add_parser("pretrain", help="pretrain SARMAE (MAE + SARE + SARC) on SAR chips or rasters",
                       description="Pretrain a SARMAE encoder. One process, or many with "
                                   "'torchrun --nproc_per_node N .venv/bin/sarmae pretrain ...' (DDP).",
                       epilog="presets: cpu_vit_tiny (a laptop CPU), sarmae_vitb_reference (the paper's recipe). "
                              "Overrides: section.key=value, e.g. optim.epochs=5 model.decoder_depth=1 run.max_minutes=30",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", "-c", default="cpu_vit_tiny", help="preset name or YAML file (default: %(default)s)")
    s.add_argument("--data", nargs="+", help="chip folders and/or large rasters")
    s.add_argument("--pairs", help="paired SAR/optical index (JSON) for SARC")
    s.add_argument("--output", "-o", help="run folder (checkpoints, config.yaml, metrics.csv, PNGs)")
    s.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    s.set_defaults(func=cmd_pretrain)
