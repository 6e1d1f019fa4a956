"""Model packages: the contract between training, the engine and the plugin (DESIGN.md).

A package is a folder (or the same folder zipped) holding ``model.json`` (the model card: schema
and typed records in ``engine.card``), ``weights.safetensors`` (never a pickle) and optionally
``model.onnx`` and its int8 quantisation ``model.int8.onnx`` (both covered by sha256 in the card's
``onnx``); a package of a task without a network (CFAR) holds model.json alone. Loading validates
the card and the weights' sha256 and says exactly what is wrong; an ONNX file is checked against its
sha256 when a backend opens it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .card import (  # noqa: F401  (re-exported: the package API)
    DEFAULT_CLIP,
    FORMAT,
    FORMAT_VERSION,
    PALETTE,
    UNITS,
    ModelCard,
    default_classes,
    default_input,
    validate_card,
)
from .errors import PackageError

CARD = "model.json"
WEIGHTS = "weights.safetensors"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
ONNX_FILES = {"fp32": ONNX, "int8": ONNX_INT8}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Source:
    """Read files of a package folder or zip uniformly."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if not path.exists():
            raise PackageError(f"{path}: model package not found. Give a package folder (with model.json) or its .zip")
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise PackageError(f"{path}: not a model package (neither a folder nor a zip file)")
            self.zip = zipfile.ZipFile(path)
            names = [n for n in self.zip.namelist() if n.endswith(CARD)]
            if not names:
                raise PackageError(f"{path}: the zip holds no model.json; is it a sarmae model package?")
            self.prefix = min(names, key=len)[: -len(CARD)]

    def read(self, name: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(self.prefix + name)
            return (self.path / name).read_bytes()
        except (KeyError, FileNotFoundError) as e:
            raise PackageError(f"{self.path}: {name} is missing from the model package") from e

    def has(self, name: str) -> bool:
        if self.zip is not None:
            return (self.prefix + name) in self.zip.namelist()
        return (self.path / name).is_file()

    def names(self) -> list[str]:
        """Every file of the package, as a path relative to its top folder (``/``-separated)."""
        if self.zip is not None:
            n = len(self.prefix)
            return sorted(i.filename[n:] for i in self.zip.infolist()
                          if i.filename.startswith(self.prefix) and not i.is_dir() and len(i.filename) > n)
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())

    def sha256(self, name: str) -> str:
        """sha256 of one file, streamed in chunks (the file is never held whole in memory)."""
        digest = hashlib.sha256()
        try:
            with (self.zip.open(self.prefix + name) if self.zip is not None else open(self.path / name, "rb")) as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except (KeyError, FileNotFoundError) as e:
            raise PackageError(f"{self.path}: {name} is missing from the model package") from e
        return digest.hexdigest()


def read_card(path: str | os.PathLike) -> ModelCard:
    """Parse and validate model.json without touching the weights."""
    src = _Source(Path(path))
    raw = src.read(CARD)
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(f"{Path(path) / CARD}: malformed JSON ({e}). Re-export the package or fix the file") from e
    return validate_card(d, str(Path(path) / CARD))


class LoadedPackage:
    """A validated package: its card, where it is, whether it holds a model.onnx, and ``model``.

    ``model`` (the torch module in eval mode) is built from the weights the first time it is
    used, so that a run through onnxruntime never imports torch nor reads the weights into memory.
    """

    def __init__(self, card: ModelCard, model: Any, path: Path, has_onnx: bool, device: str = "cpu",
                 has_int8: bool = False):
        import threading

        self.card, self.path, self.has_onnx, self.device = card, Path(path), has_onnx, device
        self.has_int8 = has_int8  # model.int8.onnx (``sarmae export --precision int8``)
        self._model = model
        self._lock = threading.Lock()

    @property
    def model(self) -> Any:
        """The torch module (built on first use: imports torch, reads and checks the weights)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = build_model(self.path, self.card, self.device)
        return self._model

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    def read_onnx(self, precision: str = "fp32") -> bytes:
        return _Source(self.path).read(ONNX_FILES[precision])

    def onnx_model(self, precision: str = "fp32") -> Path | bytes:
        """What onnxruntime opens, checked against its sha256 in model.json: the file of a folder
        package (not copied through Python), the bytes of a zipped one."""
        verify_onnx(self.path, self.card, precision)
        return self.path / ONNX_FILES[precision] if self.path.is_dir() else self.read_onnx(precision)

    def __repr__(self) -> str:
        return (f"LoadedPackage({self.card.name!r}, task={self.card.task!r}, path={str(self.path)!r}, "
                f"has_onnx={self.has_onnx}, model_loaded={self.model_loaded})")


def _hash_mismatch(path: Path, digest: str, card: ModelCard) -> PackageError:
    return PackageError(
        f"{path}: the weights do not match model.json (sha256 {digest[:12]}... expected "
        f"{card.weights['sha256'][:12]}...). The package is corrupt or was modified: re-copy or re-export it"
    )


def require_network(path: Path, card: ModelCard) -> None:
    """Refuse to read weights from a package whose task has no network (a CFAR detector)."""
    from .tasks import task_for

    if not task_for(card).needs_weights:
        raise PackageError(f"{path}: '{card.name}' is a {card.task} package without a network "
                           f"({card.architecture.name}): it has no weights to load, fine-tune or export; "
                           "run it with 'sarmae infer', or choose a package with a model")


def verify_weights(path: str | os.PathLike, card: ModelCard | None = None) -> ModelCard:
    """Check the weights' sha256 against the card without loading them (streamed; no torch)."""
    path = Path(path)
    card = card or read_card(path)
    require_network(path, card)
    digest = _Source(path).sha256(card.weights.get("file", WEIGHTS))
    if digest != card.weights["sha256"]:
        raise _hash_mismatch(path, digest, card)
    return card


def verify_onnx(path: str | os.PathLike, card: ModelCard, precision: str = "fp32") -> bool:
    """Check an ONNX file of the package against its sha256 in model.json (streamed). Returns False
    for a model.onnx that the card does not cover (exported by an older sarmae); an int8 file must be
    covered (its record holds the quality gate it passed)."""
    path, name = Path(path), ONNX_FILES[precision]
    rec = card.onnx.get(precision)
    if rec is None:
        if precision == "fp32":
            return False
        raise PackageError(f"{path}: {name} is not recorded in model.json (no sha256, no quality gate); "
                           f"remake it with 'sarmae export {path} --precision int8'")
    digest = _Source(path).sha256(rec.get("file", name))
    if digest != rec["sha256"]:
        raise PackageError(f"{path}: {name} does not match model.json (sha256 {digest[:12]}... expected "
                           f"{rec['sha256'][:12]}...). The package is corrupt or was modified: re-copy it, or "
                           f"re-export with 'sarmae export {path}" + (" --precision int8'" if precision == "int8" else "'"))
    return True


def verify_package(path: str | os.PathLike, card: ModelCard) -> dict[str, bool | None]:
    """Every file a package uses against model.json, streamed (no torch): file name -> True (sha256
    verified), False (a model.onnx the card does not cover, from an older export); a package without
    a network (CFAR) has no weights to check and gives {}. Raises PackageError on a mismatch."""
    from .tasks import task_for

    if not task_for(card).needs_weights:
        return {}
    verify_weights(path, card)
    return {card.weights.get("file", WEIGHTS): True, **verify_onnx_files(path, card)}


def verify_onnx_files(path: str | os.PathLike, card: ModelCard) -> dict[str, bool]:
    """Check every ONNX file the package holds (``verify_onnx``): file name -> covered by model.json."""
    present = set(_Source(Path(path)).names())
    return {name: verify_onnx(path, card, prec) for prec, name in ONNX_FILES.items() if name in present}


def read_extra_files(path: str | os.PathLike, card: ModelCard | None = None) -> dict[str, bytes]:
    """Every file of a package that :func:`save_package` does not regenerate (all but model.json,
    the weights and model.onnx), e.g. a fine-tuned package's training_curves.png and
    confusion_matrix.png: what to pass as ``extra_files`` when rewriting it."""
    path = Path(path)
    card = card or read_card(path)
    src = _Source(path)
    own = {CARD, WEIGHTS, ONNX, ONNX_INT8, card.weights.get("file", WEIGHTS)}
    names = [n for n in src.names() if n not in own]
    for name in names:
        if name.startswith("/") or ".." in name.split("/"):
            raise PackageError(f"{path}: the package holds a file named '{name}', outside its folder; "
                               "remove it from the zip (or re-export the package) and try again")
    return {name: src.read(name) for name in names}


def load_state_dict(path: str | os.PathLike, card: ModelCard | None = None) -> tuple[ModelCard, dict]:
    """Validate the card and the weights' hash; return (card, state_dict of CPU tensors)."""
    from safetensors.torch import load as st_load

    path = Path(path)
    card = card or read_card(path)
    require_network(path, card)
    src = _Source(path)
    data = src.read(card.weights.get("file", WEIGHTS))
    digest = sha256_bytes(data)
    if digest != card.weights["sha256"]:
        raise _hash_mismatch(path, digest, card)
    try:
        return card, st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise PackageError(f"{path}: cannot read {WEIGHTS} ({e})") from e


def build_model(path: str | os.PathLike, card: ModelCard | None = None, device: str = "cpu") -> Any:
    """The package's torch model with its (hash-checked) weights, in eval mode on ``device``."""
    from .tasks import task_for

    card, sd = load_state_dict(path, card)
    model = task_for(card).build_model(card)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed")]  # fixed tables are rebuilt
    if missing or unexpected:
        raise PackageError(
            f"{path}: weights do not fit the architecture in model.json "
            f"({len(missing)} missing e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]})"
        )
    return model.to(device).eval()


def load_package(path: str | os.PathLike, device: str = "cpu", lazy: bool = False) -> LoadedPackage:
    """Load a package: validated card + the model built from it with its weights (eval mode).

    ``lazy=True`` checks the card and the weights' sha256 (streamed) now and builds the torch
    model only when ``.model`` is first used: what inference does, so that a run through
    onnxruntime needs neither torch nor the weights in memory.
    """
    from .tasks import task_for

    path = Path(path)
    card = read_card(path)
    if not task_for(card).needs_weights:
        model = None  # a task without a network (e.g. CFAR): its own backend, no weights file
    elif lazy:
        verify_weights(path, card)
        model = None
    else:
        model = build_model(path, card, device)
    src = _Source(path)
    return LoadedPackage(card, model, path, src.has(ONNX), device, has_int8=src.has(ONNX_INT8))


def new_card(name: str, task: str, architecture: dict, input_contract: dict, classes: list[dict] | None = None,
             provenance: dict | None = None) -> ModelCard:
    prov = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "software": f"sarmae {__version__}"}
    prov.update(provenance or {})
    return ModelCard(name=name, task=task, architecture=architecture, input=input_contract,
                     classes=classes or [], provenance=prov, weights={})


def save_package(state_dict: dict | None, card: ModelCard, dest: str | os.PathLike, onnx_bytes: bytes | None = None,
                 extra_files: dict[str, bytes] | None = None, overwrite: bool = False,
                 int8_bytes: bytes | None = None) -> Path:
    """Write a package folder (or ``.zip`` when ``dest`` ends with .zip) atomically; ``state_dict``
    None: a package without weights (a task without a network, e.g. CFAR: model.json alone).

    ``card.onnx`` is rewritten to cover exactly the ONNX files written (their sha256); the int8
    record keeps what the caller put in ``card.onnx["int8"]`` (method, quality gate).

    Everything is written into a temporary sibling first and renamed on success, so an existing
    package is never left half-written.
    """
    from .tasks import task_for

    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise PackageError(f"{dest} already exists; choose another output or pass --overwrite")
    if (state_dict is None) == task_for(card).needs_weights:
        raise PackageError(f"{dest}: a '{card.task}' package of '{card.architecture.name}' "
                           + ("needs weights" if state_dict is None else "has no network: it takes no weights"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    if state_dict is not None:
        from safetensors.torch import save as st_save

        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        files[WEIGHTS] = blob = st_save(tensors, metadata={"format": FORMAT, "name": card.name, "task": card.task})
        card.weights = {"file": WEIGHTS, "sha256": sha256_bytes(blob), "format": "safetensors"}
    else:
        card.weights = {}
    if int8_bytes is not None and onnx_bytes is None:
        raise PackageError(f"{dest}: an int8 model needs its fp32 model.onnx in the same package")
    onnx_records = {}
    if onnx_bytes is not None:
        onnx_records["fp32"] = {"file": ONNX, "sha256": sha256_bytes(onnx_bytes)}
    if int8_bytes is not None:
        onnx_records["int8"] = {**card.onnx.get("int8", {}), "file": ONNX_INT8, "sha256": sha256_bytes(int8_bytes)}
    card.onnx = onnx_records
    validate_card(json.loads(json.dumps(card.to_dict())), str(dest / CARD))
    files = {CARD: (json.dumps(card.to_dict(), indent=2) + "\n").encode(), **files}
    if onnx_bytes is not None:
        files[ONNX] = onnx_bytes
    if int8_bytes is not None:
        files[ONNX_INT8] = int8_bytes
    files.update(extra_files or {})
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        if dest.suffix.lower() == ".zip":
            out = tmp / dest.name
            with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
                for name, data in files.items():
                    z.writestr(f"{dest.stem}/{name}", data)
            _replace(out, dest)
        else:
            out = tmp / "pkg"
            out.mkdir()
            for name, data in files.items():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(data)
            _replace(out, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _replace(src: Path, dest: Path) -> None:
    """Rename src over dest; an existing dest is moved aside first and removed only on success."""
    backup = None
    if dest.exists():
        backup = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(backup, ignore_errors=True) if backup.is_dir() else backup.unlink(missing_ok=True)
        os.replace(dest, backup)
    try:
        os.replace(src, dest)
    except OSError:
        if backup is not None:
            os.replace(backup, dest)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True) if backup.is_dir() else backup.unlink(missing_ok=True)


def describe(card: ModelCard) -> str:
    """A human-readable model card for ``sarmae info``."""
    from .tasks import task_for

    enc = card.architecture.encoder
    inp = card.input
    lines = [f"name:          {card.name}", f"task:          {card.task}"]
    if enc is not None:
        lines.append(f"architecture:  {card.architecture.name} (width {enc.embed_dim}, depth {enc.depth}, "
                     f"heads {enc.num_heads}, patch {enc.patch_size}, input {card.input_size[0]}x{card.input_size[1]})")
    else:
        lines.append(f"method:        {card.architecture.name} (no network, no weights)")
    if inp is not None:
        clip = (", ".join(f"{b} {r[0]}..{r[1]}" for b, r in zip(inp.bands, inp.band_clip, strict=True))
                if inp.band_clip else f"{inp.clip[0]}..{inp.clip[1]}")
        derived = (f" from bands {'+'.join(inp.bands)} (channels {'+'.join(inp.channels)})" if inp.channels
                   else f" {'+'.join(inp.bands)}")
        lines.append(f"input:         {card.in_chans} channel(s){derived}, units {inp.units}, clip {clip}"
                     + (f", {inp.stretch} stretch per window" if inp.stretch else "")
                     + f", mean {inp.mean}, std {inp.std}")
    lines += task_for(card).summary(card)
    lines.append(f"output:        {card.output}")
    if card.classes:
        lines.append("classes:       " + ", ".join(f"{c['name']} ({c.get('colour', '-')})" for c in card.classes))
    for k, v in card.provenance.items():
        lines.append(f"{k + ':':<15}{json.dumps(v) if isinstance(v, (dict, list)) else v}")
    if card.weights.get("sha256"):
        lines.append(f"weights:       {card.weights.get('file')} sha256 {card.weights['sha256'][:16]}...")
    for prec, rec in card.onnx.items():
        gate = rec.get("gate")
        lines.append(f"{'onnx ' + prec + ':':<15}{rec['file']} sha256 {rec['sha256'][:16]}..."
                     + (f"; {gate['metric']} with fp32 {gate['value']:.4f} on {gate['windows']} window(s)"
                        + (" (forced below the gate)" if gate.get("forced") else "") if gate else ""))
    return "\n".join(lines)
