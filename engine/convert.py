"""Convert official SARMAE / MAE checkpoints (SARMAE_SPEC 6) into sarmae model packages.

Safety: checkpoints are read with ``torch.load(weights_only=True)``; the only non-tensor class
allowed in addition is ``argparse.Namespace`` (the reference stores its ``args`` that way), whose
reconstruction runs no user code. A pickle that needs anything else is refused, never executed.

Key handling: the encoder prefix is found by where ``patch_embed.proj.weight`` lives, preferring
``sar_encoder.`` over ``optical_encoder.``; ``module.`` (DDP), ``encoder.`` and ``backbone.`` also
work. Encoder packages drop the decoder and mask token; reconstruct packages keep them.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConversionError
from .models.registry import SIZES, vit_name
from .models.vit import ViTConfig, tokeniser_from_shapes

MIN_LOADED_FRACTION = 0.9
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_DEC_BLOCK = re.compile(r"^decoder_blocks\.(\d+)\.")


@dataclass
class ConversionReport:
    prefix: str  # the prefix stripped from the checkpoint's encoder keys
    architecture: dict  # {"name", "encoder", ["decoder"]}
    loaded: list[str] = field(default_factory=list)  # model keys filled from the checkpoint
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys (after stripping) not used
    adapted: list[str] = field(default_factory=list)  # keys reshaped (channels, position table)

    @property
    def fraction(self) -> float:
        total = len(self.loaded) + len(self.missing)
        return len(self.loaded) / total if total else 0.0

    def summary(self) -> str:
        s = (f"prefix '{self.prefix}': loaded {len(self.loaded)} / {len(self.loaded) + len(self.missing)} "
             f"tensors ({100 * self.fraction:.1f} %), missing {len(self.missing)}, unexpected {len(self.unexpected)}")
        if self.adapted:
            s += f", adapted {', '.join(self.adapted)}"
        return s


def safe_load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True (+ argparse.Namespace); refuse anything else."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty (0 bytes): not a checkpoint; copy it again from its source")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(
            f"{path}: refused: loading this checkpoint would need to run code from its pickle ({first}). "
            "sarmae only reads tensors and plain data; re-save the state dict with torch.save(model.state_dict()) "
            "in a trusted environment"
        ) from e
    except Exception as e:  # torch.load raises many types on non-checkpoints (KeyError, RuntimeError, ...)
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({reason}); it may be truncated: copy it "
                              "again from its source") from e
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


def extract_state_dict(ckpt: dict) -> dict:
    """The tensors dict of a checkpoint: ckpt['model'] / ['state_dict'] / the dict itself."""
    import torch

    for key in ("model", "state_dict", "model_state"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    sd = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ConversionError("the checkpoint holds no tensors (expected a 'model' state dict)")
    return sd


def find_encoder_prefix(keys) -> str:
    """Prefix in front of ``patch_embed.proj.weight`` (SAR encoder preferred over optical)."""
    hits = [k[: -len("patch_embed.proj.weight")] for k in keys if k.endswith("patch_embed.proj.weight")]
    if not hits:
        raise ConversionError("no ViT encoder in the checkpoint: no key ends with 'patch_embed.proj.weight'")
    hits.sort(key=lambda p: ("optical" in p or "teacher" in p, "sar" not in p, len(p)))
    return hits[0]


def infer_architecture(shapes: dict[str, tuple], arch: str | None = None, with_decoder: bool = False) -> dict:
    """Encoder (and decoder) config from tensor SHAPES alone (no weights needed).

    Width from ``patch_embed.proj.weight`` (D, ...); stem, channels and patch from the patch
    embedding's tensors (``vit.tokeniser_from_shapes``: a plain or a conv stem); depth from the
    block count; the input size from ``pos_embed`` (1, 1 + (S/p)^2, D); heads from the named size
    with that width and depth (else D / 64); decoder heads = decoder width / 32 (MAE's 512 / 16).
    The name is the registry's for that size, stem and patch (``registry.vit_name``), else 'custom'.
    """
    try:
        d = shapes["patch_embed.proj.weight"][0]
        stem, p, c = tokeniser_from_shapes(shapes)
    except KeyError as e:
        raise ConversionError("missing patch_embed.proj.weight") from e
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))), default=-1)
    if depth < 1:
        raise ConversionError("no transformer blocks ('blocks.N.*') in the checkpoint")
    n_tok = shapes.get("pos_embed", (1, 197, d))[1] - 1
    side = int(round(n_tok**0.5))
    if side * side != n_tok:
        raise ConversionError(f"pos_embed has {n_tok} patch tokens: not a square grid")
    size = next((n for n, s in SIZES.items() if s["embed_dim"] == d and s["depth"] == depth), None)
    heads = SIZES[size]["num_heads"] if size else max(1, d // 64)
    mlp = shapes.get("blocks.0.mlp.fc1.weight", (4 * d,))[0] / d
    encoder = dict(img_size=[side * p, side * p], patch_size=int(p), in_chans=int(c), embed_dim=int(d), depth=depth,
                   num_heads=heads, mlp_ratio=float(mlp), qkv_bias="blocks.0.attn.qkv.bias" in shapes,
                   norm_eps=1e-6, drop_path_rate=0.0, **({"stem": stem} if stem != "patch" else {}))
    name = arch or vit_name(ViTConfig.from_dict(encoder))
    if arch:
        want = arch.replace("mae_", "").split("_")
        if len(want) >= 2 and want[1] in SIZES:
            s = SIZES[want[1]]
            if (s["embed_dim"], s["depth"]) != (d, depth):
                raise ConversionError(f"--arch {arch} expects width {s['embed_dim']} / depth {s['depth']}, "
                                      f"but the checkpoint has width {d} / depth {depth}")
            encoder["num_heads"] = s["num_heads"]
    out = {"name": name.replace("mae_", ""), "encoder": encoder}
    if with_decoder:
        if "decoder_embed.weight" not in shapes:
            raise ConversionError("a reconstruct package needs the MAE decoder, but the checkpoint has no decoder_embed")
        dd = shapes["decoder_embed.weight"][0]
        ddepth = 1 + max((int(m.group(1)) for k in shapes if (m := _DEC_BLOCK.match(k))), default=-1)
        out["decoder"] = dict(embed_dim=int(dd), depth=ddepth, num_heads=max(1, dd // 32), norm_pix_loss=False)
        out["name"] = "mae_" + out["name"]
    return out


def adapt_patch_embed(weight, in_chans: int):
    """(D, C0, p, p) -> (D, in_chans, p, p) keeping the response to replicated gray input
    (timm's adapt_input_conv): mean over C0, repeated, scaled by C0 / in_chans."""
    c0 = weight.shape[1]
    if c0 == in_chans:
        return weight
    return weight.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (c0 / in_chans)


def convert_state_dict(sd: dict, arch: str | None = None, task: str = "embed", in_chans: int | None = None,
                       img_size: int | None = None, known_architecture: dict | None = None) -> tuple[dict, ConversionReport]:
    """Map a checkpoint state dict onto a sarmae model; returns (model state dict, report)."""
    from .models import build_from_architecture
    from .models.mae import is_decoder_key
    from .models.pos_embed import resample_pos_embed
    from .models.vit import input_conv_key

    prefix = find_encoder_prefix(sd.keys())
    stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    others = [k for k in sd if not k.startswith(prefix)]
    # the decoder may live beside the encoder prefix (e.g. 'sar_encoder.decoder_*' or top level)
    architecture = infer_architecture({k: tuple(v.shape) for k, v in stripped.items()}, arch, task == "reconstruct")
    if known_architecture:  # sarmae's own checkpoints describe themselves (heads cannot be read from shapes)
        architecture["encoder"] = dict(known_architecture["encoder"])
        if task == "reconstruct" and known_architecture.get("decoder"):
            architecture["decoder"] = dict(known_architecture["decoder"])
        name = known_architecture.get("name", architecture["name"]).replace("mae_", "")
        architecture["name"] = ("mae_" + name) if task == "reconstruct" else name
    enc = architecture["encoder"]
    adapted = []
    if in_chans and in_chans != enc["in_chans"]:
        key = input_conv_key(enc.get("stem", "patch"))
        stripped[key] = adapt_patch_embed(stripped[key], in_chans)
        adapted.append(f"patch_embed {enc['in_chans']}->{in_chans} channels")
        enc["in_chans"] = in_chans
        if task == "reconstruct":
            raise ConversionError("changing the channel count of a reconstruct package is not supported "
                                  "(the decoder predicts the original channels); convert with --task embed")
    if img_size and img_size != enc["img_size"][0]:
        old = enc["img_size"][0] // enc["patch_size"]
        new = img_size // enc["patch_size"]
        for key in ("pos_embed", "decoder_pos_embed"):
            if key in stripped:
                stripped[key] = resample_pos_embed(stripped[key], (new, new), (old, old))
        adapted.append(f"position table {old}x{old}->{new}x{new}")
        enc["img_size"] = [img_size, img_size]
    model = build_from_architecture(architecture, task)
    target = model.state_dict()
    if task != "reconstruct":
        stripped = {k: v for k, v in stripped.items() if not is_decoder_key(k)}
    report = ConversionReport(prefix=prefix, architecture=architecture, adapted=adapted)
    out = {}
    for k, v in target.items():
        src = stripped.get(k)
        if src is not None and tuple(src.shape) == tuple(v.shape):
            out[k] = src.to(v.dtype)
            report.loaded.append(k)
        else:
            out[k] = v
            report.missing.append(k)
    report.unexpected = [k for k in stripped if k not in target] + [k for k in others if _is_interesting(k)]
    return out, report


def _is_interesting(key: str) -> bool:
    """Keys outside the encoder prefix that a user should hear about (not the optical teacher)."""
    return not key.startswith(("optical_encoder.", "sar_alignment_ffn.", "module.optical_encoder."))


def plain(v):
    """JSON-safe copy of checkpoint metadata (argparse.Namespace -> dict, tensors -> lists)."""
    if isinstance(v, argparse.Namespace):
        v = vars(v)
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def convert_checkpoint(path: str | Path, output: str | Path, arch: str | None = None, task: str = "embed",
                       in_chans: int | None = None, img_size: int | None = None, units: str = "db",
                       bands: list[str] | None = None, name: str | None = None, overwrite: bool = False) -> ConversionReport:
    """Checkpoint file -> model package (encoder 'embed' or MAE 'reconstruct')."""
    from .package import default_input, new_card, save_package

    if task not in ("embed", "reconstruct"):
        raise ConversionError(f"convert makes 'embed' (encoder) or 'reconstruct' packages, not '{task}'")
    path = Path(path)
    ckpt = safe_load_checkpoint(path)
    sd = extract_state_dict(ckpt)
    own = ckpt.get("architecture") if isinstance(ckpt.get("architecture"), dict) else None
    state, report = convert_state_dict(sd, arch, task, in_chans, img_size, own)
    if report.fraction < MIN_LOADED_FRACTION:
        raise ConversionError(
            f"{path}: refused: only {len(report.loaded)} of {len(report.loaded) + len(report.missing)} model tensors "
            f"({100 * report.fraction:.0f} %) were found in the checkpoint (need {100 * MIN_LOADED_FRACTION:.0f} %). "
            f"Missing e.g. {report.missing[:4]}. Is this a SARMAE/MAE ViT checkpoint? Check --arch"
        )
    enc = report.architecture["encoder"]
    contract = default_input(enc["in_chans"], units, bands)
    own_input = ckpt.get("sarmae_input")
    if isinstance(own_input, dict) and not in_chans and own_input.get("units"):
        contract = {**own_input, "bands": bands or own_input["bands"]}  # the training data's scaling
    from .package import sha256_stream

    with open(path, "rb") as f:
        source_sha256 = sha256_stream(f)
    prov = {"converted_from": path.name, "source_sha256": source_sha256, "conversion": report.summary()}
    if isinstance(ckpt.get("config"), dict):
        prov["pretraining_config"] = plain(ckpt["config"])
    if "step" in ckpt:
        prov["step"] = plain(ckpt["step"])
    if "epoch" in ckpt:
        prov["epoch"] = plain(ckpt["epoch"])
    if "args" in ckpt:
        prov["source_args"] = plain(ckpt["args"])
    card = new_card(name or path.stem, task, report.architecture, contract, provenance=prov)
    save_package(state, card, output, overwrite=overwrite)
    return report
