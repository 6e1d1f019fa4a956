"""Convert SARCLIP and SARVLM checkpoints into CLIP (zeroshot) packages.

Formats (the file decides; nothing in it is ever run):

- SARCLIP (CAESAR-Radi/SARCLIP): a ``.safetensors`` file holding an open_clip state dict
  (``vit_b_32_model.safetensors``); a ``.pt``/``.pth`` holding the bare state dict reads the same.
- SARVLM (KlayMa527/SARVLM): open_clip's training checkpoint ``epoch_N.pt``, a dict with
  ``state_dict`` (keys prefixed ``module.`` under DDP), read with ``torch.load(weights_only=True)``
  (``engine.convert.safe_load_checkpoint``).

Keys are matched to the open_clip model of ``--clip ARCH``; a tensor of another shape counts as
missing. The report (``engine.convert.ConversionReport``) lists loaded, missing and unexpected keys,
and a checkpoint that fills less than 90 % of the model's tensors is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from ..convert import MIN_LOADED_FRACTION, ConversionReport, safe_load_checkpoint
from ..errors import ConversionError

FORMATS = {"sarclip": "SARCLIP safetensors (an open_clip state dict)",
           "sarvlm": "SARVLM / open_clip training checkpoint (epoch_N.pt, 'state_dict')"}


def read_clip_checkpoint(path: str | Path) -> tuple[dict, str, str]:
    """(state dict with ``module.`` stripped, format "sarclip" | "sarvlm", the prefix stripped)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj, fmt = load_file(str(path)), "sarclip"
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        obj = safe_load_checkpoint(path)
        fmt = "sarvlm" if isinstance(obj.get("state_dict"), Mapping) else "sarclip"
        obj = obj["state_dict"] if fmt == "sarvlm" else obj
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    prefix = "module." if sd and all(k.startswith("module.") for k in sd) else ""
    sd = {k[len(prefix):]: v for k, v in sd.items()}
    if not any(k.startswith("visual.") for k in sd) or "token_embedding.weight" not in sd:
        raise ConversionError(
            f"{path}: matches neither checkpoint format ({'; '.join(FORMATS.values())}): it holds "
            f"{len(sd)} tensors but no open_clip image tower ('visual.*') and text tower ('token_embedding.weight')"
            + (f", e.g. {', '.join(list(sd)[:3])}" if sd else "") + ". Give a CLIP checkpoint")
    return sd, fmt, prefix


def match_state_dict(model_sd: Mapping, sd: Mapping, prefix: str = "") -> tuple[dict, ConversionReport]:
    """The checkpoint's tensors that fit the model (logit_scale reshaped as open_clip does) and the report."""
    report = ConversionReport(prefix=prefix, architecture={})
    fitted = {}
    for k, ref in model_sd.items():
        v = sd.get(k)
        if v is not None and v.numel() == ref.numel() and k in ("logit_scale", "logit_bias") and v.shape != ref.shape:
            v = v.reshape(ref.shape)
            report.adapted.append(k)
        if v is not None and v.shape == ref.shape:
            fitted[k] = v
            report.loaded.append(k)
        else:
            report.missing.append(k)
    report.unexpected = [k for k in sd if k not in model_sd and k != "position_ids"]
    return fitted, report


def convert_clip_checkpoint(checkpoint: str | Path, output: str | Path, arch: str, config: Mapping | None = None,
                            source: str | None = None, bands: list[str] | None = None, name: str | None = None,
                            templates: list[str] | None = None, quick_gelu: bool | None = None,
                            overwrite: bool = False) -> ConversionReport:
    """Write a zeroshot package from a SARCLIP / SARVLM checkpoint of the open_clip model ``arch``
    (an open_clip name, or "custom" with ``config``); ``source`` (the input scaling) defaults to the
    checkpoint's format."""
    import torch

    from .card import clip_card, model_config
    from .model import build_clip, save_clip_package

    checkpoint = Path(checkpoint)
    sd, fmt, prefix = read_clip_checkpoint(checkpoint)
    model_name = None if arch == "custom" else arch
    cfg = model_config(model_name, config)
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:  # streamed: a ViT-L checkpoint is GBs
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    digest = digest.hexdigest()
    card = clip_card(name or checkpoint.stem, model_name, cfg, source=source or fmt, bands=bands, templates=templates,
                     provenance={"converted_from": checkpoint.name, "checkpoint_sha256": digest,
                                 "checkpoint_format": FORMATS[fmt]})
    model = build_clip(card)
    fitted, report = match_state_dict(model.state_dict(), sd, prefix)
    report.architecture = card.architecture.to_dict()
    if report.fraction < MIN_LOADED_FRACTION:
        raise ConversionError(
            f"{checkpoint}: fills only {100 * report.fraction:.1f} % of open_clip {arch}'s tensors "
            f"({len(report.loaded)} loaded, {len(report.missing)} missing e.g. {report.missing[:3]}, "
            f"{len(report.unexpected)} unexpected e.g. {report.unexpected[:3]}); at least "
            f"{100 * MIN_LOADED_FRACTION:.0f} % is needed. Is --clip the architecture it was trained with?")
    with torch.no_grad():
        model.load_state_dict(fitted, strict=False)
    card.provenance["conversion"] = {"loaded": len(report.loaded), "missing": report.missing,
                                     "unexpected": report.unexpected[:50]}
    save_clip_package(model.eval(), card, output, overwrite=overwrite)
    return report

