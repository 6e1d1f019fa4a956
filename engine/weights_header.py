"""model.json's sizes against the weights' shapes, read from the safetensors header alone.

A safetensors file starts with an 8-byte little-endian length and a JSON header giving every
tensor's dtype and shape; reading it costs a few kilobytes. ``check_card_shapes`` compares the
card's encoder (channels, patch, width, depth, input size) with the shapes of the encoder's patch
embedding, blocks and position table BEFORE any model is built, so a card saying ``img_size``
1,000,000 or another ``in_chans`` than the weights is refused with a sentence instead of torch
trying to allocate terabytes or failing deep inside ``load_state_dict``.
"""

from __future__ import annotations

import json
import re
import struct

from .errors import PackageError

MAX_HEADER = 100 << 20  # safetensors' own limit on the header's size
MAX_IMG_SIZE = 8192  # px: a ViT input side beyond this (262,144 tokens of 16 px) is not a SAR window


def read_safetensors_header(read_prefix, where: str) -> dict:
    """{tensor name: {"dtype", "shape"}} from ``read_prefix(n)`` (the file's first n bytes)."""
    head = read_prefix(8)
    if len(head) < 8:
        raise PackageError(f"{where}: the weights file is empty or truncated ({len(head)} bytes); re-copy the package")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER:
        raise PackageError(f"{where}: not a safetensors file (header of {n} bytes); re-copy or re-export the package")
    raw = read_prefix(8 + n)[8:]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PackageError(f"{where}: the weights file's header is damaged ({e}); re-copy or re-export the package") from e
    return {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _encoder_prefix(shapes: dict) -> str | None:
    """The prefix of the encoder's tensors ('' for an encoder package, 'encoder.' for a task model)."""
    names = [k[: -len("patch_embed.proj.weight")] for k in shapes if k.endswith("patch_embed.proj.weight")]
    return min(names, key=len) if names else None


def check_card_shapes(card, shapes: dict, where: str) -> None:
    """Refuse a card whose encoder does not describe these weights (every problem listed)."""
    enc = card.architecture.encoder
    if enc is None:
        return
    problems = []
    h, w = enc.input_size
    if not (0 < h <= MAX_IMG_SIZE and 0 < w <= MAX_IMG_SIZE) or h % enc.patch_size or w % enc.patch_size:
        problems.append(f"img_size {enc.img_size} must be a multiple of the patch size {enc.patch_size} between "
                        f"{enc.patch_size} and {MAX_IMG_SIZE} px")
    if enc.embed_dim % enc.num_heads:
        problems.append(f"embed_dim {enc.embed_dim} is not divisible by num_heads {enc.num_heads}")
    prefix = _encoder_prefix(shapes)
    if prefix is not None:
        got = shapes[prefix + "patch_embed.proj.weight"].get("shape", [])
        want = [enc.embed_dim, enc.in_chans, enc.patch_size, enc.patch_size]
        checks = ("embed_dim", "in_chans", "patch_size")
        if enc.extra.get("stem", "patch") == "conv":  # the stem's first conv sees the channels (vit.ConvStem)
            checks = ("embed_dim",)
            first = shapes.get(prefix + "patch_embed.stem.0.weight", {}).get("shape", [])
            if len(first) == 4 and first[1] != enc.in_chans:
                problems.append(f"in_chans is {enc.in_chans} but the weights have {first[1]}")
        for i, what in enumerate(checks):
            if len(got) == 4 and got[i] != want[i]:
                problems.append(f"{what} is {want[i]} but the weights have {got[i]}")
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
        if blocks and max(blocks) + 1 != enc.depth:
            problems.append(f"depth is {enc.depth} but the weights hold {max(blocks) + 1} blocks")
        pos = shapes.get(prefix + "pos_embed", {}).get("shape")
        tokens = (h // enc.patch_size) * (w // enc.patch_size) + 1 if enc.patch_size else None
        if pos and len(pos) == 3 and not problems and pos[1] != tokens:
            side = round((pos[1] - 1) ** 0.5) * enc.patch_size
            problems.append(f"img_size {enc.img_size} ({tokens - 1} patches) but the weights' position table is for "
                            f"{pos[1] - 1} patches (about {side} px)")
    if problems:
        raise PackageError(f"{where}: model.json does not describe the weights: " + "; ".join(problems)
                           + ". Fix model.json's 'architecture.encoder' or re-export the package")


def canonical_safetensors(blob: bytes) -> bytes:
    """``blob`` (a safetensors file) with its ``__metadata__`` keys in sorted order.

    safetensors keeps the metadata in a Rust ``HashMap``, whose order changes from one call to the
    next: the same tensors gave files with different sha256 (two identical fine-tuning runs looked
    different). The header is rewritten in place with the same length (the same compact JSON, keys
    sorted), so the tensors' offsets do not move; a header that would not fit is left as it was.
    """
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", None)
    if not meta:
        return blob
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")
    if len(text) > n:
        return blob
    return blob[:8] + text + b" " * (n - len(text)) + blob[8 + n:]
