"""Does a model.onnx belong to its package? Its header against the model card, without loading it.

A package's ONNX file is checked twice (``engine.package.verify_onnx`` for the sha256 first):

1. ``read_onnx_header``: the model's opsets and metadata read straight from the protobuf wire
   format, skipping the graph (its weights) by seeking past it, so ``sarmae info --verify`` costs
   a few reads, not the model's size in memory. A file that is not an ONNX model (garbage, a
   truncated copy, another format) is refused here with a sentence instead of onnxruntime's
   ``INVALID_PROTOBUF``.
2. ``check_onnx_header``: the task ``sarmae export`` writes into the metadata against the card's;
   for a model.onnx the card does not cover by sha256 (an older export), also the weights' sha256
   in the metadata's card, so another model's valid model.onnx copied into it is refused. A
   recorded ``opset`` must match too.
3. ``check_onnx_signature`` (when a backend opens it): one input (batch, in_chans, H, W) with the
   card's channel count and input size, one output of the task's rank whose static class or feature
   dimension is the card's.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import BinaryIO

from .errors import PackageError

# ModelProto fields (onnx.proto3): ir_version 1, opset_import 8, graph 7, metadata_props 14
_IR_VERSION, _GRAPH, _OPSET_IMPORT, _METADATA = 1, 7, 8, 14
_OUTPUT_RANK = {"segment": 4, "embed": 4, "classify": 2}


def _varint(f: BinaryIO) -> int | None:
    """One base-128 varint, or None at the end of the stream."""
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise ValueError("truncated varint")
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def _fields(f: BinaryIO, end: int):
    """(field number, wire type, value) of each field up to ``end``; length-delimited values are
    (offset, length) and skipped, so that the caller reads only the ones it wants."""
    while f.tell() < end:
        tag = _varint(f)
        if tag is None:
            return
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            yield number, wire, _varint(f)
        elif wire == 1 or wire == 5:
            f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            yield number, wire, None
        elif wire == 2:
            n = _varint(f)
            start = f.tell()
            if n is None or start + n > end:
                raise ValueError("a field runs past the end of the file (truncated?)")
            f.seek(start + n)
            yield number, wire, (start, n)
        else:
            raise ValueError(f"wire type {wire}")


def _submessage(f: BinaryIO, span: tuple[int, int]) -> dict[int, int | bytes]:
    """The scalar and string fields of a small embedded message (an opset or a metadata entry)."""
    start, n = span
    here = f.tell()
    f.seek(start)
    out: dict[int, int | bytes] = {}
    for number, wire, value in _fields(f, start + n):
        if wire == 0:
            out[number] = value
        elif wire == 2:
            pos = f.tell()
            f.seek(value[0])
            out[number] = f.read(value[1])
            f.seek(pos)
    f.seek(here)
    return out


def read_onnx_header(model: str | os.PathLike | bytes, where: str) -> dict:
    """{"ir_version", "opsets" {domain: version}, "metadata" {key: value}} of an ONNX model, read
    without its graph. Raises PackageError naming ``where`` when the file is not an ONNX model."""
    try:
        f: BinaryIO = io.BytesIO(model) if isinstance(model, bytes) else open(model, "rb")  # noqa: SIM115
    except OSError as e:
        raise PackageError(f"{where}: cannot read it ({e.strerror})") from e
    with f:
        end = f.seek(0, os.SEEK_END)
        f.seek(0)
        header: dict = {"ir_version": None, "opsets": {}, "metadata": {}}
        graph = False
        try:
            for number, wire, value in _fields(f, end):
                if number == _IR_VERSION and wire == 0:
                    header["ir_version"] = value
                elif number == _GRAPH and wire == 2:
                    graph = True
                elif number == _OPSET_IMPORT and wire == 2:
                    o = _submessage(f, value)
                    header["opsets"][o.get(1, b"").decode("utf-8", "replace")] = o.get(2)
                elif number == _METADATA and wire == 2:
                    m = _submessage(f, value)
                    header["metadata"][m.get(1, b"").decode("utf-8", "replace")] = m.get(2, b"").decode("utf-8", "replace")
        except ValueError as e:
            raise PackageError(f"{where}: not a valid ONNX model ({e}); the file is damaged or is not ONNX: re-copy "
                               "the package or re-export it with 'sarmae export'") from e
    if not graph or not header["ir_version"] or "" not in header["opsets"]:
        raise PackageError(f"{where}: not a valid ONNX model (no graph, IR version or opset); the file is damaged or "
                           "is not ONNX: re-copy the package or re-export it with 'sarmae export'")
    return header


def check_onnx_header(header: dict, card, where: str, record: dict | None = None) -> None:
    """Refuse an ONNX model exported from other weights or for another task than ``card``'s, or
    with another opset than its model.json ``record`` says."""
    fix = "re-export it with 'sarmae export' (or remove it to run the package's weights with torch)"
    task = header["metadata"].get("sarmae_task")
    if task is not None and task != card.task:
        raise PackageError(f"{where}: this ONNX model is a '{task}' model but the package is a '{card.task}' "
                           f"package; {fix}")
    meta = header["metadata"].get("sarmae_model_card")
    if meta is not None and record is None:  # a file model.json covers by sha256 is the one export wrote
        # there (earlier exports re-saved the weights after it, so its card's sha256 may differ)
        try:
            theirs = (json.loads(meta).get("weights") or {}).get("sha256")
        except (ValueError, AttributeError):
            theirs = None
        ours = card.weights.get("sha256")
        if theirs and ours and theirs != ours:
            raise PackageError(f"{where}: this ONNX model was exported from other weights (sha256 {theirs[:12]}...) "
                               f"than the package's ({ours[:12]}...): it is another model's export; {fix}")
    want = (record or {}).get("opset")
    if want is not None and header["opsets"].get("") != want:
        raise PackageError(f"{where}: opset {header['opsets'].get('')} but model.json records opset {want}; {fix}")


def expected_channels(card) -> int | None:
    """The static size of the output's second dimension for the card's task (classes or features)."""
    if card.task in ("segment", "classify"):
        return len(card.classes)
    if card.task == "embed" and card.architecture.encoder is not None:
        return card.architecture.encoder.embed_dim
    return None


def check_onnx_signature(session, card, where: str) -> None:
    """The inputs and outputs of an onnxruntime session against the card (shape dimensions given as
    names, e.g. ``batch``, match anything)."""
    fix = "re-export it with 'sarmae export'"
    ins, outs = session.get_inputs(), session.get_outputs()
    if len(ins) != 1 or len(ins[0].shape) != 4:
        shapes = ", ".join(f"{i.name} {i.shape}" for i in ins)
        raise PackageError(f"{where}: the model takes {shapes or 'no input'}; sarmae feeds one (batch, channels, "
                           f"height, width) input; {fix}")
    _, c, h, w = ins[0].shape
    want = (card.in_chans, *card.input_size)
    for got, exp, what in zip((c, h, w), want, ("channels", "height", "width"), strict=True):
        if isinstance(got, int) and got != exp:
            raise PackageError(f"{where}: the model's input has {got} {what} but model.json says {exp} "
                               f"(input {card.in_chans} x {want[1]} x {want[2]}); it belongs to another model; {fix}")
    rank, channels = _OUTPUT_RANK.get(card.task), expected_channels(card)
    if rank is not None and (len(outs) != 1 or len(outs[0].shape) != rank):
        shapes = ", ".join(f"{o.name} {o.shape}" for o in outs)
        raise PackageError(f"{where}: the model returns {shapes or 'nothing'}; a {card.task} model returns one "
                           f"output of rank {rank}; {fix}")
    got = outs[0].shape[1] if outs and len(outs[0].shape) > 1 else None
    if channels is not None and isinstance(got, int) and got != channels:
        raise PackageError(f"{where}: the model returns {got} channels but model.json has {channels} "
                           f"({'classes' if card.task != 'embed' else 'features'}); it belongs to another model; {fix}")


def onnx_where(path: Path, name: str) -> str:
    return f"{path / name}" if path.is_dir() else f"{path} ({name})"
