"""Model packages as the plugin sees them: ``model.json`` read with :mod:`json`, nothing else.

The engine validates packages fully (schema, weights hash) when it loads them; the plugin only
needs the card to list installed models, show what a model does, and refuse an obviously wrong
choice early (a segmentation model in the detection algorithm, a 2-channel model on a 3-band
layer) with a message the user can act on. See DESIGN.md, "Model package format".
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from .errors import ModelCardError

CARD = "model.json"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"  # the int8 model for CPUs (``sarmae export --precision int8``)
TASKS = ("embed", "reconstruct", "classify", "segment", "detect", "zeroshot")  # zeroshot: CLIP (also runs textquery)
UNIT_LABELS = {"db": "dB", "linear_power": "linear power", "amplitude": "amplitude", "uint8": "8-bit"}


@dataclass(frozen=True)
class PackageCard:
    """What the plugin needs from a package's model.json."""

    path: str  # the package folder or .zip
    name: str
    task: str
    classes: tuple[tuple[str, str], ...] = ()  # (name, "#rrggbb") in class-index order
    bands: tuple[str, ...] = ()  # input channels, in model order
    units: str = "db"
    img_size: int = 224
    has_onnx: bool = False
    has_int8: bool = False  # model.int8.onnx is in the package (runs with precision int8, or auto on int8 CPUs)
    method: str = ""  # a method without a network (e.g. "cfar" for detect): no weights, one band, any size
    raw: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def in_chans(self) -> int:
        return 1 if self.method else len(self.bands)

    @property
    def class_names(self) -> list[str]:
        return [n for n, _ in self.classes]

    @property
    def int8_gate(self) -> dict:
        """The quality gate the int8 model passed at export (model.json ``onnx.int8.gate``: metric,
        value, threshold, windows, calibration, forced); {} when there is none."""
        onnx = self.raw.get("onnx")
        rec = onnx.get("int8") if isinstance(onnx, dict) else None
        gate = rec.get("gate") if isinstance(rec, dict) else None
        return gate if isinstance(gate, dict) else {}


def resolve_package(path: str | Path) -> Path:
    """A package folder, a package .zip, or the model.json inside a folder -> the package path."""
    p = Path(str(path)).expanduser()
    if p.name == CARD and p.is_file():
        return p.parent
    return p


def _read_raw(p: Path) -> tuple[dict, set[str]]:
    """(model.json, which of model.onnx / model.int8.onnx the package holds)."""
    if p.is_dir():
        card = p / CARD
        if not card.is_file():
            raise ModelCardError(f"{p}: no model.json in this folder; choose a SARMAE model package folder "
                                 "(made by 'sarmae init', 'convert' or fine-tuning) or its .zip")
        text, onnx = card.read_text(encoding="utf-8"), {n for n in (ONNX, ONNX_INT8) if (p / n).is_file()}
    elif p.is_file():
        if not zipfile.is_zipfile(p):
            raise ModelCardError(f"{p}: not a model package (neither a folder with model.json nor a .zip)")
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n.endswith(CARD)]
            if not names:
                raise ModelCardError(f"{p}: the zip holds no model.json; is it a SARMAE model package?")
            prefix = min(names, key=len)[: -len(CARD)]
            text = z.read(prefix + CARD).decode("utf-8")
            onnx = {n for n in (ONNX, ONNX_INT8) if prefix + n in z.namelist()}
    else:
        raise ModelCardError(f"{p}: model package not found; give a package folder (with model.json) or its .zip")
    try:
        return json.loads(text), onnx
    except ValueError as e:
        raise ModelCardError(f"{p}: model.json is not valid JSON ({e}); re-export the package") from e


def read_card(path: str | Path) -> PackageCard:
    """Read a package's card; :class:`ModelCardError` says what is wrong."""
    p = resolve_package(path)
    d, onnx = _read_raw(p)
    if not isinstance(d, dict) or d.get("format") != "sarmae-model":
        raise ModelCardError(f"{p}: model.json is not a SARMAE model card (no \"format\": \"sarmae-model\")")
    task = d.get("task")
    if task not in TASKS:
        raise ModelCardError(f"{p}: unknown task {task!r} in model.json (known: {', '.join(TASKS)})")
    arch = d.get("architecture") if isinstance(d.get("architecture"), dict) else {}
    method = str(arch.get("name") or "")
    if arch.get("encoder") is None and isinstance(arch.get(method), dict):  # e.g. CFAR: settings, no network
        inp = d.get("input") or {}
        classes = tuple((str(c.get("name")), str(c.get("colour") or "#808080")) for c in d.get("classes") or []
                        if isinstance(c, dict))
        return PackageCard(path=str(p), name=str(d.get("name") or p.stem), task=task, classes=classes,
                           bands=tuple(str(b) for b in inp.get("bands") or []), units=str(inp.get("units") or ""),
                           img_size=0, has_onnx=False, method=method, raw=d)
    try:
        enc = d["architecture"]["encoder"]
        size = enc["img_size"]
        img_size = int(size if isinstance(size, int) else size[0])
        inp = d.get("input") or {}
        bands = [str(b) for b in inp.get("bands") or []] or [f"band{i + 1}" for i in range(int(enc["in_chans"]))]
        classes = tuple((str(c["name"]), str(c.get("colour") or "#808080")) for c in d.get("classes") or [])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ModelCardError(f"{p}: model.json lacks {e} (architecture.encoder / input / classes); "
                             "re-export the package with this version of sarmae") from e
    return PackageCard(path=str(p), name=str(d.get("name") or p.stem), task=task, classes=classes,
                       bands=tuple(bands), units=str(inp.get("units") or "db"), img_size=img_size,
                       has_onnx=ONNX in onnx, has_int8=ONNX_INT8 in onnx, raw=d)


def card_or_none(path: str | Path | None) -> PackageCard | None:
    """The package's card, or None when there is no path or its card does not read."""
    if not path:
        return None
    try:
        return read_card(path)
    except ModelCardError:
        return None


def list_packages(folder: str | Path) -> list[PackageCard]:
    """Readable packages directly inside ``folder`` (sub-folders with model.json, and .zip files),
    sorted by name; unreadable ones are skipped."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return []
    cards = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not (p.is_dir() or p.suffix.lower() == ".zip"):
            continue
        try:
            cards.append(read_card(p))
        except ModelCardError:
            continue
    return sorted(cards, key=lambda c: (c.name.lower(), c.path))


def check_task(card: PackageCard, tasks: str | tuple[str, ...]) -> None:
    """Refuse a package whose task is not one of ``tasks``."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if card.task not in tasks:
        raise ModelCardError(f"model '{card.name}' ({card.path}) is a {card.task} model, not a "
                             f"{' or '.join(tasks)} model: choose a {'/'.join(tasks)} package, or use "
                             f"the SARMAE '{card.task}' algorithm for this one")


def check_precision(card: PackageCard, precision: str) -> None:
    """Refuse precision int8 for a package without an int8 model, saying how to make one (the
    engine refuses it too, with its command; this says it before a run starts)."""
    if precision == "int8" and not card.method and not card.has_int8:
        raise ModelCardError(f"model '{card.name}' ({card.path}) has no int8 model (model.int8.onnx): make one "
                             "with Models… > Make int8 model (or 'sarmae export PACKAGE --precision int8 --calibration "
                             "RASTER'), or choose precision auto or fp32")


TASK_ORDER = ("segment", "detect", "classify", "zeroshot", "embed", "reconstruct")  # what an analyst runs first


def fit_rank(card: PackageCard, band_names: list[str], byte_data: bool = False) -> tuple:
    """Sort key: packages whose input fits a layer come first (bands named like the layer's, or
    as many channels, and 8-bit models only for 8-bit data), task models before encoders, then by
    name. ``band_names`` are the layer's (e.g. ["VV", "VH"] or ["band 1"])."""
    upper = [n.upper() for n in band_names]
    named = bool(card.bands) and all(b.upper() in upper for b in card.bands)
    channels = bool(card.method) or named or len(band_names) == card.in_chans  # a method (CFAR) fits any layer
    units = bool(card.method) or (card.units == "uint8") == byte_data
    return (0 if channels and units else 1, 0 if named else 1,
            TASK_ORDER.index(card.task) if card.task in TASK_ORDER else len(TASK_ORDER), card.name.lower())


def parse_bands(text: str | None) -> list[str] | None:
    """'VV,VH' or '2, 1' -> ['VV', 'VH'] / ['2', '1']; empty -> None (all bands, in file order)."""
    items = [t.strip() for t in (text or "").replace(";", ",").split(",")]
    items = [t for t in items if t]
    return items or None


def check_channels(card: PackageCard, band_names: list[str], bands: list[str] | None, layer: str,
                   can_choose_bands: bool = True) -> None:
    """The channels a run would feed the model must match its input contract in number, and the
    chosen bands must exist (by 1-based index, or by name among ``band_names``). The advice fits
    the case: choosing bands only helps when the layer has more than the model takes (and only
    where the caller offers a band choice, ``can_choose_bands``)."""
    want = card.in_chans
    have = len(band_names)
    listing = ", ".join(f"{i + 1}: {n}" for i, n in enumerate(band_names))
    if card.method and bands is None:  # a method without a network reads band 1 unless one is chosen
        return
    if bands is None:
        if have != want:
            head = (f"model '{card.name}' takes {want} channel(s) ({'+'.join(card.bands)}), layer '{layer}' has "
                    f"{have} band(s) ({listing})")
            if have < want or not can_choose_bands:
                raise ModelCardError(f"{head}: choose a model made for {have} band(s), or a raster with "
                                     f"{'+'.join(card.bands)}")
            named = all(b.upper() in (n.upper() for n in band_names) for b in card.bands)
            example = ",".join(card.bands) if named else ",".join(str(i + 1) for i in range(want))
            raise ModelCardError(f"{head}: choose {want} of its bands in the Bands field, e.g. {example}")
        return
    if len(bands) != want:
        raise ModelCardError(f"model '{card.name}' takes {want} channel(s) ({'+'.join(card.bands)}), "
                             f"{len(bands)} band(s) chosen ({','.join(bands)})")
    upper = [n.upper() for n in band_names]
    for b in bands:
        if b.isdigit():
            if not 1 <= int(b) <= have:
                raise ModelCardError(f"band {b} is not in layer '{layer}': it has {have} band(s) ({listing}); "
                                     "bands are numbered from 1")
        elif b.upper() not in upper:
            raise ModelCardError(f"band '{b}' is not in layer '{layer}': it has {listing}. Give band numbers "
                                 "or these names")


MIN_VAL_CHIPS = 4  # fewer validation chips than this: the score is noted as unreliable


def validation_doubts(record: dict, classes: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The reasons to doubt a validation score, as sentences, from a fine-tuning result or a package's
    provenance: training's ``warnings`` and, where ``validation`` (top level, or under ``metrics``
    as the package card stores it) says it is not reliable, its note. Results from before training
    wrote a ``validation`` record get what the plugin can see itself: very few validation chips,
    classes missing from validation."""
    out = [str(w) for w in record.get("warnings") or [] if str(w).strip()]
    metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    validation = record.get("validation") or metrics.get("validation")
    if isinstance(validation, dict) and validation:
        if validation.get("reliable") is False:
            note = str(validation.get("note") or "The validation set is too small or too one-sided to trust this "
                       "score.")
            if note not in out:
                out.append(note)
        return out
    chips = record.get("val_chips")
    if isinstance(chips, int) and chips < MIN_VAL_CHIPS:
        out.append(f"Validation used only {chips} chip(s): the score says little about the rest of the image.")
    per_class = record.get("val_iou") or record.get("val_per_class_accuracy")
    if isinstance(per_class, dict) and classes:
        missing = [c for c in classes if c not in per_class]
        if missing:
            out.append(f"The validation chips hold no {', '.join(missing)}: the score ignores "
                       f"{'that class' if len(missing) == 1 else 'those classes'}.")
    return out


COUNT_WORDS = ("epoch", "chips", "count", "steps", "windows", "shots")  # keys whose values are counts


def number(value, key: str = "") -> str:
    """Integers as integers ("5", not "5.000"): ints, and whole floats under a count key such as
    ``best_epoch``; other numbers (scores) with 3 decimals ("1.000")."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                  and any(w in key.lower() for w in COUNT_WORDS)):
        return str(int(value))
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def metric_name(key: str) -> str:
    """A metric key as words: "val_mean_iou" -> "mean IoU", "best_epoch" -> "best epoch"."""
    words = key.removeprefix("val_").split("_")
    return " ".join({"iou": "IoU", "map": "mAP", "ap": "AP"}.get(w, w) for w in words)


def int8_text(card: PackageCard, brief: bool = False) -> str:
    """Whether the package has an int8 model and the figure of the gate it passed at export, as HTML:
    "yes (pixel label agreement with fp32 0.9984)" (not ``brief``: on how many windows of what),
    "no", or a warning when the gate was forced or model.json does not record the file."""
    if not card.has_int8:
        return "no"
    gate = card.int8_gate
    try:
        figure = f"{escape(str(gate['metric']))} with fp32 {float(gate['value']):.4f}"
    except (KeyError, TypeError, ValueError):
        return ("<span style='color:#a15c00'>model.int8.onnx without a record in model.json: the engine refuses "
                "it; make it again</span>")
    if not brief and gate.get("windows"):
        figure += f" on {gate['windows']} window(s)" + (f" of {escape(str(gate['calibration']))}"
                                                        if gate.get("calibration") else "")
    forced = (f" <span style='color:#a15c00'>forced below the gate of {escape(str(gate.get('threshold')))}</span>"
              if gate.get("forced") else "")
    return f"yes ({figure}){forced}"


def describe_html(card: PackageCard, brief: bool = False) -> str:
    """A short card for dialogs: name, task, classes with their colours, input contract.
    ``brief`` (the pickers of the Run and Fine-tune forms, where the card sits between fields):
    doubts about the validation score in a few words, the reasons in the Models dialog's card; no
    path (the picker's tooltip)."""
    rows = [f"<b>{escape(card.name)}</b> &mdash; {escape(card.task)}"]
    if card.classes:
        swatches = " ".join(f'<span style="color:{escape(c)}">&#9632;</span>&nbsp;{escape(n)}' for n, c in card.classes)
        rows.append(f"Classes: {swatches}")
    if card.method:
        rows.append(f"Method: {escape(card.method.upper())}, no network and no training: one band (band 1 unless "
                    "chosen), any units (converted to linear power), the whole raster")
    else:
        rows.append(f"Input: {card.in_chans} channel(s) {escape('+'.join(card.bands))}, "
                    f"{escape(UNIT_LABELS.get(card.units, card.units))}, {card.img_size} px windows")
        rows.append("ONNX export: " + ("yes" if card.has_onnx else "no") + "; int8 model: " + int8_text(card, brief))
    prov = card.raw.get("provenance") or {}
    metrics = prov.get("metrics") if isinstance(prov, dict) else None
    if isinstance(metrics, dict):
        shown = [f"{metric_name(k)} {number(v, k)}" for k, v in metrics.items() if isinstance(v, (int, float))]
        shown = shown[:1] if brief else shown[:3]
        if shown:
            rows.append("Validation: " + escape(", ".join(shown)))
    doubts = validation_doubts(prov if isinstance(prov, dict) else {})
    if doubts and brief:
        rows.append("<span style='color:#a15c00'>Validation not reliable (Models… says why)</span>")
    elif doubts:
        rows.append("<span style='color:#a15c00'>Validation not reliable: " + escape(" ".join(doubts)) + "</span>")
    if not brief:  # the pickers show the path as the card's tooltip: one wrapped line less between fields
        rows.append(f"<small>{escape(card.path).replace('/', '/&#8203;')}</small>")  # breaks after each /
    return "<br>".join(rows)
