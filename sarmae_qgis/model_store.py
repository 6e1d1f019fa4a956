"""The models folder as a store: import a package (folder or .zip), export one as a .zip, delete one.

Standard library only (no Qt, no QGIS), so that it can be tested and used anywhere; the Models
dialog (``gui/models_dialog.py``) calls these functions with the folder from
``toolbelt/settings.py: models_folder()``.

Every change is atomic: an import is copied or extracted into a hidden temporary folder inside the
models folder (``.<name>.import-*``, skipped by :func:`~sarmae_qgis.model_cards.list_packages`) and
renamed into place only once it is complete and its card reads; an export is written to a hidden
temporary file beside the destination and renamed. On failure nothing half-written is left.

Zips are untrusted input: every entry is checked before anything is written, and a zip holding an
absolute path, a ``..`` component, a drive letter, a symbolic link, or any name that would resolve
outside the package folder (zip-slip) is refused as a whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from .errors import ModelCardError, SarmaePluginError
from .model_cards import CARD, PackageCard, read_card, resolve_package

JUNK_PREFIXES = ("__MACOSX/",)  # Finder's resource forks beside a zipped folder: ignored
STORED_SUFFIXES = (".safetensors", ".onnx", ".png", ".zip")  # already dense: not worth deflating
RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_CHUNK = 1 << 20


class ModelStoreError(SarmaePluginError, ValueError):
    """A package cannot be imported, exported or deleted; the message says why and what to do."""


class PackageExistsError(ModelStoreError):
    """The import target already exists (``target``); import again with ``overwrite=True`` to replace it."""

    def __init__(self, message: str, target: Path) -> None:
        super().__init__(message)
        self.target = target


# ---- names ---------------------------------------------------------------------------------------
def safe_name(name: str, fallback: str = "model") -> str:
    """A folder name made from a package name: letters, digits, ``.``, ``_`` and ``-`` only, no leading
    dot (hidden) and no Windows device name; ``fallback`` when nothing is left."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._ -")[:80].rstrip("._ -")
    if not out:
        out = fallback
    if out.split(".")[0].upper() in RESERVED_NAMES:
        out = f"{out}_"
    return out


def target_name(card: PackageCard, source: Path) -> str:
    """The folder a package is installed as: its card's name, else the source's name without suffix."""
    stem = source.stem if source.suffix.lower() in (".zip", ".pkg") else source.name
    return safe_name(card.name or "", fallback=safe_name(stem))


# ---- checks --------------------------------------------------------------------------------------
def is_package(path: str | Path) -> bool:
    """Whether ``path`` looks like a package (a folder with model.json, or a zip holding one); the card
    itself may still be unreadable (such a package can be deleted, not used)."""
    p = Path(path)
    if p.is_dir():
        return (p / CARD).is_file()
    if p.is_file() and p.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(p) as z:
                return any(PurePosixPath(n).name == CARD for n in z.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return False


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def _entry_parts(info: zipfile.ZipInfo, archive: Path) -> tuple[str, ...]:
    """The path components of a zip entry; :class:`ModelStoreError` for any name that could land
    outside the extraction folder or is not a plain file or folder."""
    name = info.filename
    refuse = f"{archive}: refused, the zip entry {name!r} "
    fix = "; this zip was not made by sarmae (or was tampered with): export the package again"
    if "\x00" in name:
        raise ModelStoreError(refuse + "holds a NUL character" + fix)
    if "\\" in name:
        raise ModelStoreError(refuse + "uses backslashes (a Windows path)" + fix)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ModelStoreError(refuse + "is an absolute path" + fix)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ModelStoreError(refuse + "climbs out of its folder with '..'" + fix)
    if any(":" in p for p in parts):
        raise ModelStoreError(refuse + "holds a ':' (a drive or stream name)" + fix)
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no file type (DOS, writestr)
    if kind == stat.S_IFLNK:
        raise ModelStoreError(refuse + "is a symbolic link" + fix)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ModelStoreError(refuse + "is not a plain file or folder" + fix)
    if info.flag_bits & 0x1:
        raise ModelStoreError(refuse + "is encrypted; give an unencrypted zip")
    return parts


def _zip_plan(z: zipfile.ZipFile, archive: Path, dest: Path) -> list[tuple[zipfile.ZipInfo, Path | None]]:
    """Check every entry and map each to where it goes under ``dest`` (``None``: a folder entry or an
    ignored one). Nothing is written; any bad entry refuses the whole zip."""
    infos = z.infolist()
    checked = [(info, _entry_parts(info, archive)) for info in infos]  # every entry, ignored ones too
    cards = [parts for _, parts in checked if parts and parts[-1] == CARD and len(parts) <= 2]
    if not cards:
        deeper = any(parts and parts[-1] == CARD for _, parts in checked)
        where = "deeper than one folder" if deeper else "nowhere"
        raise ModelStoreError(f"{archive}: model.json is {where} in this zip; a package zip holds model.json at "
                              "its root or inside one top folder (export it again from the Models dialog or "
                              "'sarmae export')")
    prefix = min(cards, key=len)[:-1]  # () or ("top",); a root model.json wins
    root = Path(os.path.normpath(os.path.abspath(dest)))
    plan: list[tuple[zipfile.ZipInfo, Path | None]] = []
    total = 0
    for info, parts in checked:
        if not parts or info.filename.startswith(JUNK_PREFIXES):
            plan.append((info, None))
            continue
        if parts[: len(prefix)] != prefix:
            raise ModelStoreError(f"{archive}: the zip holds {info.filename!r} outside its package folder "
                                  f"'{prefix[0]}/'; a package zip holds one package: re-zip only that folder")
        rel = parts[len(prefix):]
        if not rel:
            plan.append((info, None))
            continue
        out = Path(os.path.normpath(root.joinpath(*rel)))
        if out == root or not _is_inside(out, root):  # cannot happen after the checks above: belt and braces
            raise ModelStoreError(f"{archive}: refused, the zip entry {info.filename!r} would be written outside "
                                  "the package folder; export the package again")
        plan.append((info, out))
        total += 0 if info.is_dir() else info.file_size
    free = shutil.disk_usage(dest.parent if not dest.exists() else dest).free
    if total > free:
        raise ModelStoreError(f"{archive}: unpacking needs {total / 1e6:.0f} MB, only {free / 1e6:.0f} MB are free "
                              f"in {dest.parent}; free some space or choose another models folder")
    return plan


def _check_weights(folder: Path, card: PackageCard, source: Path) -> None:
    """The weights file named by the card is there and (when the card gives one) matches its sha256."""
    weights = card.raw.get("weights") if isinstance(card.raw, dict) else None
    if not isinstance(weights, dict) or not weights.get("file"):
        return
    name = str(weights["file"])
    path = folder / name
    if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts or not path.is_file():
        raise ModelStoreError(f"{source}: the package lacks its weights file '{name}' (named in model.json); "
                              "copy the complete package folder, or export it again")
    want = str(weights.get("sha256") or "").lower()
    if not want:
        return
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    if h.hexdigest() != want:
        raise ModelStoreError(f"{source}: '{name}' does not match the sha256 in model.json (a damaged or "
                              "incomplete copy); copy or download the package again")


# ---- import --------------------------------------------------------------------------------------
def _extract(source: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(source) as z:
            plan = _zip_plan(z, source, dest)
            dest.mkdir()
            for info, out in plan:
                if out is None:
                    continue
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(out, "xb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, RuntimeError, NotImplementedError) as e:
        raise ModelStoreError(f"{source}: the zip cannot be read ({e}); copy or download it again") from e


def _place(new: Path, target: Path, work: Path) -> None:
    """Rename ``new`` to ``target``; an existing target is first renamed into ``work`` (deleted with it),
    and put back if the rename fails."""
    old = None
    if target.exists() or target.is_symlink():
        old = work / "old"
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise


def import_package(source: str | Path, models_folder: str | Path, overwrite: bool = False,
                   name: str | None = None) -> Path:
    """Install the package ``source`` (a folder with model.json, its model.json, or a .zip) into
    ``models_folder`` as ``<folder>/<name>``, ``name`` defaulting to the card's name made safe.

    Raises :class:`~sarmae_qgis.errors.ModelCardError` when the card does not read,
    :class:`PackageExistsError` when the target exists and ``overwrite`` is false, and
    :class:`ModelStoreError` for anything else (unsafe zip, missing weights, disk errors). Returns
    the installed folder.
    """
    src = resolve_package(source)
    card = read_card(src)
    root = Path(models_folder).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelStoreError(f"cannot create the models folder {root} ({e.strerror or e}); choose another "
                              "one in SARMAE Settings") from e
    target = root / (safe_name(name) if name else target_name(card, src))
    is_zip = src.is_file()
    if not is_zip and _is_inside(root.resolve(), src.resolve()):
        raise ModelStoreError(f"{src}: the models folder {root} lies inside this package folder; "
                              "choose another models folder in SARMAE Settings")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise PackageExistsError(f"{target} already exists: import with overwrite to replace it, or delete "
                                     "that package first", target)
        if not is_package(target):
            raise ModelStoreError(f"{target} exists and is not a model package; it was left alone: move it "
                                  "away or rename the package")
    if is_zip:  # check every entry before anything is written
        try:
            with zipfile.ZipFile(src) as z:
                _zip_plan(z, src, root / ".check")
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelStoreError(f"{src}: the zip cannot be read ({e}); copy or download it again") from e
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.import-", dir=root))
    except OSError as e:
        raise ModelStoreError(f"cannot write into the models folder {root} ({e.strerror or e}); check its "
                              "permissions or choose another one in SARMAE Settings") from e
    new = work / "pkg"
    try:
        if is_zip:
            _extract(src, new)
        else:
            shutil.copytree(src, new)
        try:
            installed = read_card(new)
        except ModelCardError as e:
            raise ModelStoreError(f"{src}: the copied package does not read ({e})") from e
        _check_weights(new, installed, src)
        _place(new, target, work)
    except OSError as e:
        raise ModelStoreError(f"{src}: import into {root} failed ({e.strerror or e}); nothing was changed") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# ---- export --------------------------------------------------------------------------------------
def export_package(card_or_path: PackageCard | str | Path, destination_zip: str | Path,
                   overwrite: bool = False) -> Path:
    """Write the package (a :class:`PackageCard` or a package path) as a .zip holding one top folder
    named after the zip; ``.zip`` is appended to a destination without it. A package that is already a
    zip is copied. Returns the zip written."""
    src = Path(card_or_path.path) if isinstance(card_or_path, PackageCard) else resolve_package(card_or_path)
    if not is_package(src):
        raise ModelStoreError(f"{src}: not a model package (no model.json); nothing to export")
    dest = Path(destination_zip).expanduser()
    if dest.suffix.lower() != ".zip":
        dest = dest.with_name(dest.name + ".zip")
    if src.is_dir() and _is_inside(dest.resolve(), src.resolve()):
        raise ModelStoreError(f"{dest}: cannot export a package into its own folder; choose a zip elsewhere")
    if dest.resolve() == src.resolve():
        raise ModelStoreError(f"{dest} is the package itself; choose another file name")
    if dest.is_dir():
        raise ModelStoreError(f"{dest} is a folder; choose a .zip file name")
    if dest.exists() and not overwrite:
        raise PackageExistsError(f"{dest} already exists: export with overwrite to replace it, or choose "
                                 "another file name", dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise ModelStoreError(f"cannot write into {dest.parent} ({e.strerror or e}); choose another folder") from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            if src.is_file():
                with src.open("rb") as s:
                    shutil.copyfileobj(s, f, _CHUNK)
            else:
                top = safe_name(dest.stem, fallback=safe_name(src.name))
                with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                    for dirpath, dirnames, filenames in os.walk(src):
                        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                        for fname in sorted(filenames):
                            path = Path(dirpath) / fname
                            arc = PurePosixPath(top, *path.relative_to(src).parts)
                            stored = path.suffix.lower() in STORED_SUFFIXES
                            z.write(path, str(arc), zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a package zip is meant to be shared
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ModelStoreError(f"{src}: export to {dest} failed ({e.strerror or e}); nothing was written") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


# ---- delete --------------------------------------------------------------------------------------
def delete_package(path: str | Path, models_folder: str | Path) -> None:
    """Delete the installed package ``path``: only a package directly inside ``models_folder`` (a
    folder with model.json or a package .zip); a symbolic link is removed, not what it points to."""
    root = Path(models_folder).expanduser()
    p = resolve_package(path)
    if not root.is_dir():
        raise ModelStoreError(f"the models folder {root} does not exist; nothing was deleted")
    if not p.exists() and not p.is_symlink():
        raise ModelStoreError(f"{p}: no such package; nothing was deleted (refresh the list)")
    parent = Path(os.path.abspath(p)).parent
    if parent.resolve() != root.resolve():
        raise ModelStoreError(f"{p} is not inside the models folder {root}; the Models dialog only deletes "
                              "installed packages: delete it with your file manager if you mean to")
    if not is_package(p):
        raise ModelStoreError(f"{p} is not a model package (no model.json); it was left alone")
    try:
        if p.is_symlink():
            p.unlink()
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{p.name}.delete-", dir=parent))
        os.replace(p, trash / p.name)  # gone from the list at once, even if removing takes a while
        shutil.rmtree(trash, ignore_errors=True)
    except OSError as e:
        raise ModelStoreError(f"{p}: cannot delete ({e.strerror or e}); check its permissions") from e
