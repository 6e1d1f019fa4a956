"""Caption tables for SARCLIP training: the CSV format, caption templates and the train/val split.

A caption table is a CSV with one row per image: ``image`` (path, relative to the table's folder
when it lies below it), ``caption``, ``class`` (the class name the caption was made from, for
zero-shot evaluation), ``source`` (which labelled data set it came from) and ``split``
(``train`` | ``val``). ``image`` and ``caption`` are the only columns training needs; any CSV with
them (and ``filepath``/``title`` as open_clip's own CSVs name them) is read.

Captions are made the way SARCLIP-1M / SARVLM-1M were: a template filled with the class phrase,
the sensor and the polarisation (``TEMPLATES``), drawn per image from a seeded generator, so the
same spec and seed always give the same table. The split holds whole GROUPS out (a group is one
image, or a spatial block of windows / tiles where the data have a place): ``assign_split``.

Reading (``read_table``) checks every row: missing images and empty captions are counted and
skipped, or refused with ``strict``; a table with no usable row is refused, naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import SarmaeError

log = logging.getLogger("sarmae.captions")

COLUMNS = ("image", "caption", "class", "source", "split")
IMAGE_ALIASES = ("image", "filepath", "path", "file")  # open_clip's CSVs use filepath / title
CAPTION_ALIASES = ("caption", "title", "text")

# {phrase}: the class phrase ("a T72 tank", "flooded land"); {sensor}: "Sentinel-1", "X-band MSTAR";
# {pol}: "VV", "VV+VH", "HH". Written like the SARCLIP/SARVLM captions (sensor and polarisation named).
TEMPLATES = (
    "a SAR image of {phrase}.",
    "a {sensor} SAR image of {phrase}.",
    "a {pol} polarised {sensor} radar image of {phrase}.",
    "a synthetic aperture radar image of {phrase}, {pol} polarisation.",
    "{phrase} seen by {sensor} SAR.",
    "a radar image of {phrase}.",
)


class CaptionError(SarmaeError, ValueError):
    """A caption spec or table that cannot be used (says which file and what to do)."""


@dataclass
class CaptionRow:
    image: str
    caption: str
    klass: str
    source: str
    group: str = ""  # split unit: rows of one group go to the same split
    split: str = "train"


@dataclass
class CaptionTable:
    """Rows read from a table, with what was skipped and why."""

    path: Path
    images: list[str]  # absolute paths
    captions: list[str]
    classes: list[str]  # per row ("" when the table has no class column)
    sources: list[str]
    splits: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, split: str | None) -> CaptionTable:
        """The rows of one split (all rows when None)."""
        keep = [i for i, s in enumerate(self.splits) if split is None or s == split]
        pick = lambda v: [v[i] for i in keep]  # noqa: E731
        return CaptionTable(self.path, pick(self.images), pick(self.captions), pick(self.classes),
                            pick(self.sources), pick(self.splits), dict(self.skipped))


def caption_for(phrase: str, sensor: str, pol: str, rng: np.random.Generator,
                templates: tuple[str, ...] = TEMPLATES) -> str:
    """One caption: a seeded draw among ``templates`` filled with the phrase, sensor and polarisation."""
    t = templates[int(rng.integers(len(templates)))]
    text = t.format(phrase=phrase, sensor=sensor, pol=pol)
    return text[0].upper() + text[1:] if text else text


def hash_unit(seed: int, group: str) -> float:
    """A number in [0, 1) that depends on (seed, group) only: the group's place in the split order."""
    h = hashlib.blake2b(f"{seed}/{group}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def assign_split(rows: list[CaptionRow], val_fraction: float, seed: int) -> None:
    """Send whole groups to ``val``, per class, until about ``val_fraction`` of each class's rows.

    Groups are ordered by a hash of (seed, group), so adding a source does not reshuffle the
    others. A class with one group stays in training (nothing to hold out) and a class with
    several always keeps at least one group in training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CaptionError(f"val_fraction must be in [0, 1), not {val_fraction}")
    by_class: dict[tuple[str, str], dict[str, list[CaptionRow]]] = {}
    for r in rows:
        by_class.setdefault((r.source, r.klass), {}).setdefault(r.group or r.image, []).append(r)
    for groups in by_class.values():
        total = sum(len(v) for v in groups.values())
        order = sorted(groups, key=lambda g: hash_unit(seed, g))
        held = 0
        for g in order[:-1]:  # the last group always trains
            if held + len(groups[g]) / 2 > val_fraction * total:
                break
            for r in groups[g]:
                r.split = "val"
            held += len(groups[g])


def _relative(image: str, table_dir: Path) -> str:
    p = Path(image).resolve()
    try:
        return str(p.relative_to(table_dir.resolve()))
    except ValueError:
        return os.path.relpath(p, table_dir.resolve()) if p.anchor == table_dir.resolve().anchor else str(p)


def write_table(rows: list[CaptionRow], path: str | Path, overwrite: bool = False) -> Path:
    """Write the CSV atomically (temporary sibling, then rename); image paths relative to its folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CaptionError(f"{path} exists; pass --overwrite to replace it or choose another output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_relative(r.image, path.parent), r.caption, r.klass, r.source, r.split])
    os.replace(tmp, path)
    return path


def _column(header: list[str], aliases: tuple[str, ...], what: str, path: Path) -> int:
    low = [h.strip().lower() for h in header]
    for a in aliases:
        if a in low:
            return low.index(a)
    raise CaptionError(f"{path}: no {what} column (looked for {', '.join(aliases)}); the header is "
                       f"{', '.join(header) or 'empty'}. Make the table with 'sarmae captions' or add the column")


def read_table(path: str | Path, strict: bool = False, max_skipped_fraction: float = 0.5) -> CaptionTable:
    """Read and check a caption table (module docstring). Relative image paths are taken from the
    table's folder. ``strict``: refuse any missing image or empty caption instead of skipping it."""
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"caption table not found: {path}; make one with 'sarmae captions'")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise CaptionError(f"{path} is empty; it needs a header with image and caption columns")
    header, body = rows[0], [r for r in rows[1:] if any(c.strip() for c in r)]
    ci, ct = _column(header, IMAGE_ALIASES, "image", path), _column(header, CAPTION_ALIASES, "caption", path)
    low = [h.strip().lower() for h in header]
    opt = {k: (low.index(k) if k in low else None) for k in ("class", "source", "split")}
    out = CaptionTable(path, [], [], [], [], [])
    missing, empty, examples = 0, 0, []
    for n, r in enumerate(body, start=2):
        get = lambda i, r=r: r[i].strip() if i is not None and i < len(r) else ""  # noqa: E731
        image, caption = get(ci), get(ct)
        full = Path(image) if Path(image).is_absolute() else path.parent / image
        if not caption:
            empty += 1
            examples.append(f"line {n}: empty caption")
            continue
        if not image or not full.is_file():
            missing += 1
            examples.append(f"line {n}: image not found: {full}")
            continue
        out.images.append(str(full))
        out.captions.append(caption)
        out.classes.append(get(opt["class"]))
        out.sources.append(get(opt["source"]))
        out.splits.append(get(opt["split"]) or "train")
    out.skipped = {k: v for k, v in (("missing_image", missing), ("empty_caption", empty)) if v}
    bad = missing + empty
    if bad and strict:
        raise CaptionError(f"{path}: {missing} row(s) with a missing image and {empty} with an empty caption "
                           f"({'; '.join(examples[:3])}); fix the table or run without strict checking")
    if not out.images:
        raise CaptionError(f"{path}: no usable row ({len(body)} rows: {missing} missing images, {empty} empty "
                           f"captions{'; ' + '; '.join(examples[:3]) if examples else ''})")
    if bad > max_skipped_fraction * len(body):
        raise CaptionError(f"{path}: {bad} of {len(body)} rows unusable ({missing} missing images, {empty} empty "
                           f"captions; {'; '.join(examples[:3])}); are the image paths relative to the table's folder?")
    if bad:
        log.warning("%s: skipped %d row(s) with a missing image and %d with an empty caption (%s)",
                    path, missing, empty, "; ".join(examples[:3]))
    return out
